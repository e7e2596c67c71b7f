"""Signature checks and serving labels, without servers."""

from __future__ import annotations

import numpy as np
import pytest

from modelforge_inference import convert, oip_convert, serving, wire
from modelforge_inference.domain import Prediction, ResolvedModel, Signature, TensorSpec, Timings
from modelforge_inference.errors import InvalidInput, InvalidServingConfig, RequestTooLarge, UnknownOutput
from modelforge_inference.settings import InferenceSettings
from modelforge_inference.signature import (
    answer_bytes,
    batch_key,
    batch_rows,
    check_inputs,
    check_outputs,
    output_views,
)

F32 = np.dtype(np.float32)
SIGNATURE = Signature(
    inputs=(
        TensorSpec("image", F32, (-1, 3, 8, 8), ort_type="tensor(float)"),
        TensorSpec("text", np.dtype(object), (-1,), ort_type="tensor(string)"),
    ),
    outputs=(TensorSpec("logits", F32, (-1, 10)), TensorSpec("label", np.dtype(object), (-1,))),
)


def good(**override: np.ndarray) -> dict[str, np.ndarray]:
    return {"image": np.zeros((2, 3, 8, 8), F32), "text": np.array([b"a", "b"], dtype=object)} | override


def test_good_inputs_come_back_in_signature_order_with_text_strings():
    feeds = check_inputs(SIGNATURE, {"text": good()["text"], "image": good()["image"]}, max_request_bytes=1 << 20)

    assert list(feeds) == ["image", "text"]
    assert feeds["text"].tolist() == ["a", "b"]


@pytest.mark.parametrize(
    ("inputs", "culprit", "words"),
    [
        ({"image": np.zeros((2, 3, 8, 8), F32)}, "text", "missing"),
        (good(extra=np.zeros(1, F32)), "extra", "no such input"),
        (
            good(image=np.zeros((2, 3, 8, 8), np.float64)),
            "image",
            "expected dtype float32, got float64; declared float32 [-1, 3, 8, 8]; send float32 (numpy: "
            "array.astype('float32'))",
        ),
        (good(image=np.zeros((2, 3, 8), F32)), "image", "rank 4"),
        (good(image=np.zeros((2, 3, 8, 9), F32)), "image", "dimension 3 must be 8"),
        (good(text=np.zeros(2, F32)), "text", "string"),
        (good(text=np.array([b"\xff"], dtype=object)), "text", "UTF-8"),
    ],
)
def test_each_bad_input_names_the_input(inputs, culprit, words):
    with pytest.raises(InvalidInput) as caught:
        check_inputs(SIGNATURE, inputs, max_request_bytes=1 << 20)

    assert caught.value.metadata["input"] == culprit
    assert words in str(caught.value)


def test_request_over_the_limit():
    with pytest.raises(RequestTooLarge):
        check_inputs(SIGNATURE, good(), max_request_bytes=100)


def test_outputs_default_to_all_and_refuse_unknown_names():
    assert check_outputs(SIGNATURE, None) == ("logits", "label")
    assert check_outputs(SIGNATURE, ["label", "label"]) == ("label",)
    with pytest.raises(UnknownOutput):
        check_outputs(SIGNATURE, ["nope"])


def test_batch_key_and_rows():
    assert batch_key(good()) == ((3, 8, 8), ())
    assert batch_rows(good()) == 2
    assert batch_rows(good(text=np.array(["a"], dtype=object))) is None
    assert SIGNATURE.batchable


@pytest.mark.parametrize(
    ("inputs", "outputs", "batchable"),
    [
        ((("batch", -1),), (("batch", -1),), True),
        ((("", -1),), (("", -1),), True),  # unnamed dynamic dimensions follow the inputs
        ((("batch", -1),), (("", -1),), True),
        ((("n", -1),), (("hits", -1),), False),  # NonZero: as many rows out as there are hits
        ((("n", -1), ("m", -1)), (("n", -1),), False),  # two inputs whose rows are independent
        ((("batch", -1),), (("batch", 1),), False),  # a fixed leading dimension
        ((), (("batch", -1),), False),  # no inputs to stack
    ],
)
def test_a_model_batches_only_when_every_leading_dimension_is_the_same_dynamic_one(inputs, outputs, batchable):
    def specs(prefix: str, dims: tuple[tuple[str, int], ...]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(f"{prefix}{i}", F32, (size, 4), dim_names=(name, "")) for i, (name, size) in enumerate(dims)
        )

    assert Signature(inputs=specs("in", inputs), outputs=specs("out", outputs)).batchable is batchable


@pytest.mark.parametrize(
    ("inputs", "outputs", "batchable"),
    [
        ([("batch", 4)], [("batch", "batch")], False),  # x @ x.T: a merged run's rows mix requests
        ([("batch", "batch")], [("batch",)], False),  # a square input, its rows as long as the batch
        ([("batch", 4)], [("batch", 8, "batch")], False),
        ([("batch", "seq")], [("batch", "seq")], True),  # other dynamic dimensions are the requests' own
        ([("batch", 4)], [(-1, "batch")], False),  # the batch's name further in, the leading one unnamed
    ],
)
def test_a_model_whose_batch_dimension_recurs_further_in_is_not_batched(inputs, outputs, batchable):
    def specs(prefix: str, shapes: list[tuple[str | int, ...]]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(
                f"{prefix}{i}",
                F32,
                tuple(-1 if isinstance(d, str) else d for d in shape),
                dim_names=tuple(d if isinstance(d, str) else "" for d in shape),
            )
            for i, shape in enumerate(shapes)
        )

    assert Signature(inputs=specs("in", inputs), outputs=specs("out", outputs)).batchable is batchable


def test_labels_override_server_defaults():
    model = ResolvedModel(
        "m",
        1,
        "0" * 64,
        1,
        SIGNATURE,
        labels={
            "modelforge.io/max-batch-size": "32",
            "modelforge.io/preferred-batch-sizes": "8, 4",
            "modelforge.io/cache": "true",
            "modelforge.io/cache-max-entry-bytes": "2MiB",
            "modelforge.io/execution-providers": "CUDAExecutionProvider,CPUExecutionProvider",
            "team": "vision",
        },
    )

    config = serving.serving_config(serving.defaults(InferenceSettings(max_queue_size=7)), model)
    assert config.cache.max_entry_bytes == 2 * 1024 * 1024

    assert (config.batching.max_batch_size, config.batching.preferred_batch_sizes) == (32, (4, 8))
    assert config.batching.max_queue_size == 7
    assert config.cache.enabled
    assert config.session.execution_providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_bad_label_names_itself():
    model = ResolvedModel("m", 1, "0" * 64, 1, SIGNATURE, labels={"modelforge.io/priority-levels": "0"})

    with pytest.raises(InvalidServingConfig, match="modelforge.io/priority-levels"):
        serving.serving_config(serving.defaults(InferenceSettings()), model)


GENERATOR = Signature(
    inputs=(TensorSpec("latent", F32, (-1, 16)),),
    outputs=(TensorSpec("image", F32, (-1, 3, 4, 4)), TensorSpec("norm", np.dtype(np.int64), (-1, 1))),
)
LATENT = {"latent": np.zeros((2, 16), F32)}


def test_output_views_take_the_inputs_rows_for_a_dynamic_leading_dimension():
    memory = memoryview(bytearray(2 * 3 * 4 * 4 * 4 + 8))  # room to spare
    views = output_views(GENERATOR, LATENT, {"image": memory})

    assert views is not None and list(views) == ["image"]
    assert (views["image"].shape, views["image"].dtype) == ((2, 3, 4, 4), np.dtype("<f4"))
    views["image"][1, 2, 3, 3] = 7.0
    assert np.frombuffer(memory, np.float32)[2 * 48 - 1] == 7.0  # a view: writes land in the memory


def test_output_views_keep_fixed_shapes_of_a_model_that_does_not_batch():
    fixed = Signature(inputs=(TensorSpec("x", F32, (4,)),), outputs=(TensorSpec("y", F32, (2, 2)),))
    views = output_views(fixed, {"x": np.zeros(4, F32)}, {"y": memoryview(bytearray(16))})

    assert views is not None and views["y"].shape == (2, 2)


RAGGED = {"image": np.zeros((2, 3, 8, 8), F32), "text": np.array(["a"], dtype=object)}  # rows 2 and 1


@pytest.mark.parametrize(
    ("signature", "feeds", "memory", "why"),
    [
        (GENERATOR, LATENT, {"image": memoryview(bytearray(2 * 48 * 4 - 1))}, "one byte short"),
        (GENERATOR, LATENT, {"image": memoryview(bytearray(400)), "norm": memoryview(bytearray(8))}, "norm too big"),
        (GENERATOR, LATENT, {"image": memoryview(bytes(400))}, "read-only memory"),
        (GENERATOR, LATENT, {"image": memoryview(bytearray(401))[1:]}, "misaligned floats"),
        (SIGNATURE, RAGGED, {"logits": memoryview(bytearray(80))}, "inputs disagree on their rows"),
        (SIGNATURE, good(), {"label": memoryview(bytearray(80))}, "string output"),
        (
            Signature(inputs=(TensorSpec("x", F32, (-1, 2)),), outputs=(TensorSpec("y", F32, (-1, -1)),)),
            {"x": np.zeros((2, 2), F32)},
            {"y": memoryview(bytearray(80))},
            "a dynamic dimension past the first",
        ),
    ],
)
def test_output_views_are_none_unless_every_output_has_a_known_shape_and_fits(signature, feeds, memory, why):
    assert output_views(signature, feeds, memory) is None, why


def test_answer_bytes_bounds_both_apis_answers_from_above() -> None:
    name = "a-model-" + "x" * 200
    outputs = {
        "scores": np.random.default_rng(0).standard_normal((3, 7, 5)).astype(np.float32),
        "ids": np.arange(12, dtype=np.int64).reshape(2, 2, 3),
        "o" * 300: np.zeros((1, 1, 1, 1, 1, 1, 1, 1), np.float16),  # a long name and many dimensions
        "labels": np.array([b"", b"cat", "dög" * 50, b"x" * 300], dtype=object),
        "empty": np.zeros((0, 4), np.float32),
    }
    bound = answer_bytes(name, outputs)

    timings = Timings(queue=12345.678, compute=98765.4321, total=99999.999)
    v1 = convert.predict_response_bytes(
        Prediction(outputs=outputs, model=name, version=2**31 - 1, sha256="f" * 64, timings=timings, cache_hit=True)
    )
    v2 = wire.join(
        oip_convert.stream_infer_response(
            oip_convert.infer_response_parts(model=name, version=2**31 - 1, request_id="", outputs=outputs)
        )
    )
    assert len(v1) < bound and len(v2) < bound
    # and it is a close bound, not a guess far above: what it adds is framing, never the data twice
    data = sum(a.nbytes for a in outputs.values() if a.dtype != object) + sum(
        len(e if isinstance(e, bytes) else e.encode()) for e in outputs["labels"]
    )
    assert bound - data < 2048 + len(name) + sum(len(n) for n in outputs)


def test_inputs_that_name_a_dimension_alike_must_agree_on_its_size():
    i64 = np.dtype(np.int64)
    text = Signature(
        inputs=(
            TensorSpec("input_ids", i64, (-1, -1), dim_names=("batch", "seq")),
            TensorSpec("attention_mask", i64, (-1, -1), dim_names=("batch", "seq")),
            TensorSpec("lengths", i64, (-1,), dim_names=("n",)),
        ),
        outputs=(TensorSpec("logits", F32, (-1, 2), dim_names=("batch", "")),),
    )
    ids = np.zeros((2, 3), i64)
    good = {"input_ids": ids, "attention_mask": ids, "lengths": np.zeros(5, i64)}  # "n" is named once: free
    assert list(check_inputs(text, good, max_request_bytes=1 << 20)) == ["input_ids", "attention_mask", "lengths"]

    for mask, axis, name in [(np.zeros((2, 4), i64), 1, "seq"), (np.zeros((1, 3), i64), 0, "batch")]:
        with pytest.raises(InvalidInput) as caught:
            check_inputs(text, good | {"attention_mask": mask}, max_request_bytes=1 << 20)
        assert caught.value.metadata["input"] == "attention_mask"
        assert f"dimension {axis} ({name!r}) is" in str(caught.value) and "'input_ids'" in str(caught.value)


def test_inputs_that_differ_in_a_dimension_the_model_names_alike_are_refused_saying_where() -> None:
    pair = Signature(
        inputs=(
            TensorSpec("ids", F32, (-1, -1), dim_names=("batch", "seq")),
            TensorSpec("mask", F32, (-1, -1), dim_names=("batch", "seq")),
        ),
        outputs=(TensorSpec("y", F32, (-1,), dim_names=("batch",)),),
    )
    with pytest.raises(InvalidInput) as caught:
        check_inputs(pair, {"ids": np.zeros((2, 5), F32), "mask": np.zeros((2, 4), F32)}, max_request_bytes=1 << 20)
    assert "dimension 1 ('seq') is 4, but dimension 1 of input 'ids' is 5" in str(caught.value)

    square = Signature(inputs=(TensorSpec("m", F32, (-1, -1), dim_names=("n", "n")),), outputs=())
    with pytest.raises(InvalidInput) as caught:
        check_inputs(square, {"m": np.zeros((2, 3), F32)}, max_request_bytes=1 << 20)
    assert "dimension 1 ('n') is 3, but its dimension 0 is 2" in str(caught.value)


def test_an_input_sent_to_a_model_that_takes_none_is_told_so() -> None:
    constant = Signature(inputs=(), outputs=(TensorSpec("y", F32, (2,)),))
    with pytest.raises(InvalidInput) as caught:
        check_inputs(constant, {"x": np.zeros(1, F32)}, max_request_bytes=1 << 20)
    assert "the model has no such input; it takes no inputs: send none" in str(caught.value)
