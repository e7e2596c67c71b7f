"""The memory estimate of the first version a process loads: what ONNX Runtime allocates once per process is paid
when the engine starts, not counted against that version. In a fresh process, as a service starts; the engine with
a real ONNX Runtime session of a real file and, in place of the registry's gRPC API, the resolver's interface."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fixtures.onnx_models import build_identity, write_model

_FIRST_LOAD = """
import asyncio, sys
from pathlib import Path
import numpy as np
from modelforge._refs import ModelRef
from modelforge_inference.domain import ResolvedModel, Signature, TensorSpec
from modelforge_inference.engine import InferenceEngine
from modelforge_inference.settings import InferenceSettings
from tests.unit.test_inference_engine_eviction import Files, Registry

async def main() -> None:
    spec = TensorSpec("x", np.dtype(np.float32), (-1, 4))
    signature = Signature(inputs=(spec,), outputs=(TensorSpec("y", spec.dtype, spec.shape),))
    registry, files = Registry(ResolvedModel("m", 1, "tiny", 100, signature)), Files(Path(sys.argv[1]))
    engine = InferenceEngine(InferenceSettings(intra_op_threads=1), resolver=registry, files=files)
    await engine.start()
    try:
        print((await engine.load(ModelRef("m", version=1))).memory_bytes)
    finally:
        await engine.aclose()

asyncio.run(main())
"""


def test_the_first_version_a_process_loads_is_not_charged_for_onnx_runtimes_own_start(tmp_path: Path) -> None:
    path = write_model(build_identity(), tmp_path / "identity.onnx")
    loaded = subprocess.run(
        [sys.executable, "-c", _FIRST_LOAD, str(path)], capture_output=True, text=True, timeout=120, check=True
    )
    # An identity of a few bytes: ONNX Runtime's first session of a process took about 5 MiB more than later ones.
    assert int(loaded.stdout) < 2 * 1024 * 1024, loaded.stdout
