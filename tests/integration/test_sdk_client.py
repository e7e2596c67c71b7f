# ruff: noqa: F811  (pytest fixtures imported from conftest modules are parameters here)
"""Client and AsyncClient: one handle on the suite, against real registry, inference and jobs servers."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import onnxruntime as ort
import pytest

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


async def test_every_kind_of_call_on_a_closed_client_is_client_closed(
    inference: RunningInference, jobs_api: RunningJobs, worker: InProcessWorker, mlp: ModelFile, tmp_path
) -> None:
    x = np.ones((2, 64), dtype=np.float32)
    targets = {
        "registry": inference.registry.address,
        "inference": inference.address,
        "jobs": f"127.0.0.1:{jobs_api.port}",
    }

    def closed_sync() -> None:
        with modelforge.Client(**targets) as mf:
            mf.upload_model(mlp.data, name="scorer")
            job = mf.submit_job("scorer", {"input": x})
            job.wait(timeout=60)
        calls = {
            "unary": lambda: mf.predict("scorer", {"input": x}),
            "server stream": lambda: mf.inference.predict_stream("scorer", {"input": x}),
            "client stream": lambda: mf.upload_model(mlp.data, name="scorer"),
            "paged": lambda: list(mf.list_models()),
            "download": lambda: mf.registry.download("scorer", tmp_path / "m.onnx"),
            "events": lambda: next(iter(mf.registry.watch())),
            "job watch": lambda: list(job.watch()),
            "job result": job.result,
        }
        for kind, call in calls.items():
            with pytest.raises(modelforge.ClientClosedError, match="client is closed") as caught:
                call()
            assert caught.value.code == grpc.StatusCode.CANCELLED, kind

    await asyncio.to_thread(closed_sync)

    async with modelforge.AsyncClient(**targets) as mf:
        job = await mf.submit_job("scorer", {"input": x})
        await job.wait(timeout=60)
    async_calls = {
        "unary": lambda: mf.predict("scorer", {"input": x}),
        "server stream": lambda: mf.inference.predict_stream("scorer", {"input": x}),
        "client stream": lambda: mf.upload_model(mlp.data, name="scorer"),
        "paged": lambda: anext(mf.list_models()),
        "download": lambda: mf.registry.download("scorer", tmp_path / "a.onnx"),
        "events": lambda: anext(mf.registry.watch()),
        "job watch": lambda: anext(job.watch()),
        "job result": job.result,
    }
    for kind, call in async_calls.items():
        with pytest.raises(modelforge.ClientClosedError, match="client is closed") as caught:
            await call()
        assert caught.value.code == grpc.StatusCode.CANCELLED, kind
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "a.onnx").exists()


async def test_client_options_reach_all_three_clients(
    inference: RunningInference, jobs_api: RunningJobs, mlp: ModelFile
) -> None:
    targets = {
        "registry": inference.registry.address,
        "inference": inference.address,
        "jobs": f"127.0.0.1:{jobs_api.port}",
    }
    large = {"input": np.ones((1024, 64), dtype=np.float32)}  # 256 KiB

    def scenario() -> None:
        with modelforge.Client(**targets) as mf:
            assert (mf.registry.timeout, mf.inference.timeout, mf.jobs.timeout) == (30.0, 60.0, 30.0)
            mf.upload_model(mlp.data, name="scorer")
        with modelforge.Client(**targets, timeout=1e-6) as mf:
            calls = {
                "registry": lambda: list(mf.list_models()),
                "inference": lambda: mf.predict("scorer", {"input": np.ones((1, 64), dtype=np.float32)}),
                "jobs": lambda: list(mf.jobs.list_jobs()),
            }
            for service, call in calls.items():
                with pytest.raises(modelforge.DeadlineExceededError):
                    call()
                assert getattr(mf, service).timeout == 1e-6
        with modelforge.Client(**targets, timeout=None, max_message_bytes=64 * 1024) as mf:
            assert (mf.registry.timeout, mf.inference.timeout, mf.jobs.timeout) == (None, None, None)
            with pytest.raises(modelforge.ResourceExhaustedError, match="max_message_bytes= of the client"):
                mf.predict("scorer", large)
            with pytest.raises(modelforge.ResourceExhaustedError, match="max_message_bytes= of the client"):
                mf.submit_job("scorer", large)

    await asyncio.to_thread(scenario)

    async with modelforge.AsyncClient(**targets, timeout=1e-6) as amf:
        assert (amf.registry.timeout, amf.inference.timeout, amf.jobs.timeout) == (1e-6, 1e-6, 1e-6)
        with pytest.raises(modelforge.DeadlineExceededError):
            await amf.predict("scorer", {"input": np.ones((1, 64), dtype=np.float32)})
    async with modelforge.AsyncClient(**targets, max_message_bytes=64 * 1024) as amf:
        assert amf.inference.timeout == 60.0
        with pytest.raises(modelforge.ResourceExhaustedError, match="max_message_bytes= of the client"):
            await amf.predict("scorer", large)
