# ruff: noqa: F811  (pytest fixtures imported from conftest modules are parameters here)
"""Client and AsyncClient: one handle on the suite, against real registry, inference and jobs servers."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort

import modelforge
from tests.fixtures.onnx_models import ModelFile
from tests.integration.jobs.conftest import (  # noqa: F401
    InProcessWorker,
    RunningInference,
    RunningJobs,
    inference,
    jobs_api,
    jobs_settings,
    onnx_dir,
    registry,
    registry_settings,
    start_inference,
    worker,
)


async def test_async_client_uploads_predicts_lists_and_runs_a_job(
    inference: RunningInference, jobs_api: RunningJobs, worker: InProcessWorker, mlp: ModelFile
) -> None:
    x = np.random.default_rng(1).standard_normal((6, 64), dtype=np.float32)
    expected = ort.InferenceSession(mlp.data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    async with modelforge.AsyncClient(
        registry=inference.registry.address, inference=inference.address, jobs=f"127.0.0.1:{jobs_api.port}"
    ) as mf:
        version = await mf.upload_model(mlp.data, name="scorer", alias="production")
        assert (version.model, version.version) == ("scorer", 1)
        assert [m.name async for m in mf.list_models()] == ["scorer"]
        outputs = await mf.predict("scorer@production", {"input": x})
        np.testing.assert_allclose(outputs["output"], expected, rtol=1e-5)
        job = await mf.submit_job("scorer@production", {"input": x}, batch_size=4)
        await job.wait(timeout=60)
        result = await job.result()
        np.testing.assert_allclose(result["output"], expected, rtol=1e-5)


async def test_sync_client_predicts_through_the_same_servers(inference: RunningInference, mlp: ModelFile) -> None:
    x = np.ones((2, 64), dtype=np.float32)

    def scenario() -> dict[str, np.ndarray]:
        with modelforge.Client(registry=inference.registry.address, inference=inference.address) as mf:
            mf.upload_model(mlp.data, name="scorer")
            assert [m.name for m in mf.list_models()] == ["scorer"]
            return mf.predict("scorer", {"input": x})

    outputs = await asyncio.to_thread(scenario)
    assert outputs["output"].shape == (2, 8)
