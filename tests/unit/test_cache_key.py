"""The prediction cache's key and value layout: no Redis needed."""

from __future__ import annotations

import numpy as np
import pytest

from modelforge_inference.cache import (
    PredictionKey,
    decode_outputs,
    encode_outputs,
    prediction_digest,
)
from modelforge_inference.domain import ResolvedModel, Signature

SHA = "ab" * 32


def test_digest_is_32_bytes_and_deterministic() -> None:
    inputs = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert len(prediction_digest(SHA, inputs)) == 32
    assert prediction_digest(SHA, inputs) == prediction_digest(SHA, {"x": inputs["x"].copy()})


def test_digest_ignores_input_order_and_output_order_and_duplicates() -> None:
    a = np.ones(3, np.float32)
    b = np.zeros(2, np.int64)
    first = prediction_digest(SHA, {"a": a, "b": b}, ["y", "z"])
    second = prediction_digest(SHA, {"b": b, "a": a}, ["z", "y", "z"])
    assert first == second


def test_digest_ignores_memory_layout_and_byte_order() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    fortran = np.asfortranarray(array)
    big_endian = array.astype(">f4")
    wide = np.zeros((3, 8), np.float32)
    wide[:, ::2] = array
    strided = wide[:, ::2]
    expected = prediction_digest(SHA, {"x": array})
    assert prediction_digest(SHA, {"x": fortran}) == expected
    assert prediction_digest(SHA, {"x": big_endian}) == expected
    assert prediction_digest(SHA, {"x": strided}) == expected


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"x": np.arange(6, dtype=np.float32).reshape(3, 2)}, id="shape"),
        pytest.param({"x": np.arange(6, dtype=np.int32).reshape(2, 3)}, id="dtype-same-size"),
        pytest.param({"y": np.arange(6, dtype=np.float32).reshape(2, 3)}, id="name"),
        pytest.param({"x": np.arange(1, 7, dtype=np.float32).reshape(2, 3)}, id="bytes"),
        pytest.param(
            {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "z": np.zeros(0, np.float32)}, id="extra-input"
        ),
    ],
)
def test_digest_changes_with_every_part_of_an_input(other: dict[str, np.ndarray]) -> None:
    base = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert prediction_digest(SHA, base) != prediction_digest(SHA, other)


def test_digest_changes_with_model_file_and_requested_outputs() -> None:
    inputs = {"x": np.ones(4, np.float32)}
    base = prediction_digest(SHA, inputs)
    assert prediction_digest("cd" * 32, inputs) != base
    assert prediction_digest(SHA, inputs, ["y"]) != base
    assert prediction_digest(SHA, inputs, ["y"]) != prediction_digest(SHA, inputs, ["z"])


def test_string_inputs_are_framed_per_element() -> None:
    joined = {"s": np.array([b"ab", b"c"], dtype=object)}
    split = {"s": np.array([b"a", b"bc"], dtype=object)}
    as_str = {"s": np.array(["ab", "c"], dtype=object)}
    assert prediction_digest(SHA, joined) != prediction_digest(SHA, split)
    assert prediction_digest(SHA, joined) == prediction_digest(SHA, as_str)


def test_key_of_a_resolved_model_carries_its_name_and_version() -> None:
    model = ResolvedModel("mlp", 3, SHA, 10, Signature((), ()))
    inputs = {"x": np.ones(2, np.float32)}
    key = PredictionKey.of(model, inputs, ["y"])
    assert (key.model, key.version) == ("mlp", 3)
    assert key.digest == prediction_digest(SHA, inputs, ["y"])
    assert key.hex == key.digest.hex()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.arange(5, dtype=np.int64),
        np.array(3.5, dtype=np.float64),
        np.zeros((0, 7), dtype=np.float16),
        np.array([True, False, True]),
        np.arange(7, dtype=np.uint8),
        np.arange(12, dtype=np.float32).reshape(3, 4).T,
    ],
    ids=["f32-3d", "i64", "scalar", "empty", "bool", "u8-odd-length", "transposed"],
)
def test_outputs_round_trip(array: np.ndarray) -> None:
    decoded = decode_outputs(encode_outputs({"out": array, "other": np.ones(3, np.int8)}))
    assert list(decoded) == ["out", "other"]
    assert decoded["out"].dtype == array.dtype
    assert decoded["out"].shape == array.shape
    np.testing.assert_array_equal(decoded["out"], array)
    np.testing.assert_array_equal(decoded["other"], np.ones(3, np.int8))


def test_number_payloads_decode_as_aligned_views() -> None:
    value = encode_outputs({"a": np.ones(3, np.uint8), "b": np.arange(4, dtype=np.float64)})
    decoded = decode_outputs(value)
    assert decoded["b"].flags.aligned
    assert decoded["b"].base is not None  # a view over the value, not a copy


def test_string_outputs_round_trip_as_bytes() -> None:
    strings = np.array([["héllo", ""], ["x", "yz"]], dtype=object)
    decoded = decode_outputs(encode_outputs({"s": strings}))["s"]
    assert decoded.shape == (2, 2)
    assert decoded.tolist() == [["héllo".encode(), b""], [b"x", b"yz"]]


@pytest.mark.parametrize("value", [b"", b"XXXX\0\0\0\0", encode_outputs({"a": np.ones(8, np.float32)})[:-3]])
def test_corrupt_values_raise_value_error(value: bytes) -> None:
    with pytest.raises(ValueError):
        decode_outputs(value)
