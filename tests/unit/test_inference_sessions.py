"""ONNX Runtime session options: pool threads do not spin unless a version's label asks them to."""

from __future__ import annotations

import numpy as np
import pytest

from modelforge_inference import serving
from modelforge_inference.domain import ResolvedModel, Signature, TensorSpec
from modelforge_inference.errors import InvalidServingConfig
from modelforge_inference.sessions import session_options
from modelforge_inference.settings import InferenceSettings

SPINNING = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def _model(labels: dict[str, str]) -> ResolvedModel:
    spec = TensorSpec("x", np.dtype("<f4"), (-1, 4))
    return ResolvedModel("m", 1, "ab" * 32, 10, Signature((spec,), (spec,)), labels=labels)


@pytest.mark.parametrize(("labels", "expected"), [({}, "0"), ({"modelforge.io/allow-spinning": "true"}, "1")])
def test_spinning_is_off_unless_the_version_label_turns_it_on(labels: dict[str, str], expected: str) -> None:
    config = serving.serving_config(serving.defaults(InferenceSettings()), _model(labels))
    options = session_options(config.session)
    assert [options.get_session_config_entry(key) for key in SPINNING] == [expected, expected]


def test_a_bad_allow_spinning_label_is_refused() -> None:
    with pytest.raises(InvalidServingConfig):
        serving.serving_config(serving.defaults(InferenceSettings()), _model({"modelforge.io/allow-spinning": "maybe"}))
