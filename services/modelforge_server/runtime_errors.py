"""ONNX Runtime's error messages as ModelForge passes them on: the registry's check of an upload, the inference
service's loads and runs."""

from __future__ import annotations

import re

__all__ = ["describe_error"]

# "[ONNXRuntimeError] : 1 : FAIL : " before every message, and "Load model from /the/server's/path failed:" before
# those of session creation: boilerplate to a client, and the second names where this server keeps its files.
_BOILERPLATE = re.compile(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : (Load model from .*? failed:)?")


def describe_error(exc: BaseException) -> str:
    """ONNX Runtime's message without its status-code boilerplate or the path of the model file."""
    return _BOILERPLATE.sub("", str(exc), count=1).strip()
