"""Label keys and values of models and versions: Kubernetes-style keys, values of at most 256 characters, and
serving labels with values the inference service takes."""

from __future__ import annotations

import pytest

from modelforge_registry.registry import check_labels
from modelforge_server.labels import InvalidLabel

VALID_KEYS = [
    "team",
    "a",
    "Stage",
    "1",
    "v1.2_x-y",
    "modelforge.io/owner",  # under the prefix, but no serving label: any value
    "example.com/Owner",
    "a-b.c-d/e",
    "x" * 63,
    f"{'p' * 63}.{'q' * 63}.{'r' * 63}.{'s' * 61}/name",  # a prefix of 253 characters
]
INVALID_KEYS = [
    "",
    "/name",
    "modelforge.io/",
    "-team",
    "team-",
    "_team",
    "team.",
    "x" * 64,
    "has space",
    "ümlaut",
    "team\n",
    "Modelforge.io/cache",  # the prefix is a DNS subdomain: lowercase
    "modelforge..io/cache",
    "-modelforge.io/cache",
    "a/b/c",
    "under_score.io/name",
    f"{'p' * 63}.{'q' * 63}.{'r' * 63}.{'s' * 62}/name",  # a prefix of 254 characters
]


@pytest.mark.parametrize("key", VALID_KEYS)
def test_valid_keys_pass(key: str) -> None:
    assert check_labels({key: "value"}) == {key: "value"}


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_are_refused_by_name(key: str) -> None:
    with pytest.raises(InvalidLabel) as caught:
        check_labels({"fine": "ok", key: "value"}, "model.labels")
    assert repr(key) in str(caught.value)
    assert caught.value.metadata["label"] == key
    assert caught.value.field == "model.labels"


def test_values_up_to_256_characters_of_anything_pass() -> None:
    labels = {"empty": "", "long": "v" * 256, "free": "1.2.3-rc.1+build/ä ü?"}
    assert check_labels(labels) == labels


def test_a_longer_value_is_refused_naming_its_key() -> None:
    with pytest.raises(InvalidLabel) as caught:
        check_labels({"note": "v" * 257})
    assert "'note'" in str(caught.value) and "257" in str(caught.value)


def test_no_labels_is_fine() -> None:
    assert check_labels(None) is None
    assert check_labels({}) == {}


@pytest.mark.parametrize(
    ("key", "value", "takes"),
    [
        ("modelforge.io/max-batch-size", "lots", "an integer from 0 to 2147483647"),
        ("modelforge.io/max-batch-size", "99999999999999999999", "an integer from 0 to 2147483647"),
        ("modelforge.io/preferred-batch-sizes", "4,3000000000", "comma-separated integers from 1 to 2147483647"),
        ("modelforge.io/cache", "maybe", "true or false"),
        ("modelforge.io/priority-levels", "0", "an integer from 1 to 256"),
        ("modelforge.io/queue-timeout-seconds", "-1", 'a number of seconds > 0 and at most 86400, or "none"'),
        ("modelforge.io/queue-timeout-seconds", "inf", 'a number of seconds > 0 and at most 86400, or "none"'),
        ("modelforge.io/queue-timeout-seconds", "nan", 'a number of seconds > 0 and at most 86400, or "none"'),
        ("modelforge.io/queue-timeout-seconds", "1e300", 'a number of seconds > 0 and at most 86400, or "none"'),
        (
            "modelforge.io/cache-max-entry-bytes",
            "2047MiB",
            "a size in bytes from 1 to 536870912 (it may end in KiB, MiB, GiB, K, M or G)",
        ),
        (  # misspelt: it used to be taken, and the version ran on the CPU
            "modelforge.io/execution-providers",
            "CUDAExecutionProvder,CPUExecutionProvider",
            "comma-separated ONNX Runtime provider names, such as CUDAExecutionProvider,CPUExecutionProvider",
        ),
    ],
)
def test_a_serving_label_with_a_value_it_does_not_take_is_refused(key: str, value: str, takes: str) -> None:
    with pytest.raises(InvalidLabel) as caught:
        check_labels({"team": "vision", key: value}, "header.labels")
    assert str(caught.value) == f"label {key!r} is invalid: it configures serving and takes {takes}, not {value!r}"
    assert (caught.value.metadata["label"], caught.value.field) == (key, "header.labels")


def test_preferred_batch_sizes_past_the_versions_max_batch_size_are_refused() -> None:
    labels = {"modelforge.io/max-batch-size": "16", "modelforge.io/preferred-batch-sizes": "8,32"}
    with pytest.raises(InvalidLabel) as caught:
        check_labels(labels, "labels")
    assert str(caught.value) == (
        "label 'modelforge.io/preferred-batch-sizes' is invalid: it configures serving and takes batch sizes of at "
        "most its max-batch-size, 16, not '8,32'"
    )
    assert check_labels({**labels, "modelforge.io/preferred-batch-sizes": "8,16"}) is not None


def test_serving_labels_with_values_they_take_pass() -> None:
    labels = {
        "modelforge.io/max-batch-size": "8",
        "modelforge.io/cache": "true",
        "modelforge.io/queue-timeout-seconds": "none",
        # Known to ONNX Runtime though this build lacks it: a version may be pushed for replicas that have it.
        "modelforge.io/execution-providers": "TensorrtExecutionProvider, CUDAExecutionProvider,CPUExecutionProvider",
    }
    assert check_labels(labels) == labels


def test_the_cache_entry_size_label_takes_the_size_suffixes_the_settings_take() -> None:
    labels = {"modelforge.io/cache-max-entry-bytes": "4MiB"}
    assert check_labels(labels) == labels
    with pytest.raises(InvalidLabel, match="a size in bytes from 1 to"):
        check_labels({"modelforge.io/cache-max-entry-bytes": "4 lots"})
