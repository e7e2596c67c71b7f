"""tritonclient[grpc] from PyPI, unmodified, drives the V2 endpoint of a real inference server.

tritonclient and ModelForge both register the ``inference.*`` protobuf symbols, which cannot share one
descriptor pool. So the server runs in the test process and the client in a child interpreter: this file,
run as a script (see the bottom), performs one scenario with tritonclient and prints what it saw as JSON,
with tensors in an .npz file. Nothing at module level imports either side's generated code.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CLIENT_TIMEOUT = 120.0


# --- the client side: runs in a child interpreter --------------------------------------------------------------


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=True) as data:
        return {key: data[key] for key in data.files}


def _infer_inputs(tc: Any, arrays: dict[str, np.ndarray], datatypes: dict[str, str]) -> list[Any]:
    inputs = []
    for name, array in arrays.items():
        tensor = tc.InferInput(name, list(array.shape), datatypes[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _error(exc: Any) -> dict[str, str]:
    return {"status": str(exc.status()), "message": str(exc.message())}


def _scenario_server(client: Any, tc: Any, args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "metadata": client.get_server_metadata(as_json=True),
    }


def _scenario_model(client: Any, tc: Any, args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    name, version = args["model"], args.get("version", "")
    return {
        "metadata": client.get_model_metadata(name, version, as_json=True),
        "config": client.get_model_config(name, version, as_json=True)["config"],
    }


def _scenario_infer(client: Any, tc: Any, args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from tritonclient.utils import InferenceServerException

    arrays = _load_arrays(workdir / "inputs.npz")
    classes = args.get("class_count", {})
    outputs = [tc.InferRequestedOutput(name, class_count=classes.get(name, 0)) for name in args.get("outputs", [])]
    try:
        result = client.infer(
            args["model"],
            _infer_inputs(tc, arrays, args["datatypes"]),
            model_version=args.get("version", ""),
            outputs=outputs or None,
            request_id=args.get("id", ""),
            priority=args.get("priority", 0),
            timeout=args.get("timeout"),
        )
    except InferenceServerException as exc:
        return {"error": _error(exc)}
    response = result.get_response(as_json=True)
    names = [o["name"] for o in response.get("outputs", [])]
    np.savez(workdir / "outputs.npz", **{name: result.as_numpy(name) for name in names})
    return {"response": {k: v for k, v in response.items() if k != "raw_output_contents"}}


def _scenario_stream(client: Any, tc: Any, args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import queue

    arrays = _load_arrays(workdir / "inputs.npz")
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for request in args["requests"]:
            inputs = {name: arrays[key] for name, key in request["inputs"].items()}
            client.async_stream_infer(
                request["model"],
                _infer_inputs(tc, inputs, request["datatypes"]),
                request_id=request["id"],
                outputs=[tc.InferRequestedOutput(name) for name in request.get("outputs", [])] or None,
            )
        seen: dict[str, Any] = {}
        saved: dict[str, np.ndarray] = {}
        for _ in args["requests"]:
            result, error = answers.get(timeout=60)
            if error is not None:
                seen[f"error-{len(seen)}"] = {"error": str(error.message())}
                continue
            response = result.get_response(as_json=True)
            names = [o["name"] for o in response.get("outputs", [])]
            for name in names:
                saved[f"{response['id']}/{name}"] = result.as_numpy(name)
            final = response.get("parameters", {}).get("triton_final_response", {}).get("bool_param", False)
            seen[response["id"]] = {"model_version": response["model_version"], "outputs": names, "final": final}
    finally:
        client.stop_stream()
    np.savez(workdir / "outputs.npz", **saved)
    return {"answers": seen}


def _scenario_repository(client: Any, tc: Any, args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from tritonclient.utils import InferenceServerException

    name = args["model"]
    steps: dict[str, Any] = {"ready_before": client.is_model_ready(name, args["version"])}
    client.load_model(name)
    steps["ready_after_load"] = client.is_model_ready(name, args["version"])
    steps["index_after_load"] = client.get_model_repository_index(as_json=True).get("models", [])
    steps["ready_index"] = client.get_model_repository_index(as_json=True).get("models", [])
    client.unload_model(name)
    steps["ready_after_unload"] = client.is_model_ready(name, args["version"])
    steps["index_after_unload"] = client.get_model_repository_index(as_json=True).get("models", [])
    try:
        client.load_model("no-such-model")
    except InferenceServerException as exc:
        steps["load_unknown"] = _error(exc)
    return steps


def _scenario_statistics(client: Any, tc: Any, args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    return {
        "one": client.get_inference_statistics(args["model"], as_json=True),
        "all": client.get_inference_statistics(as_json=True),
    }


def _scenario_unserved(client: Any, tc: Any, args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from tritonclient.utils import InferenceServerException

    seen: dict[str, Any] = {}
    for name, call in (
        ("system_shared_memory", client.get_system_shared_memory_status),
        ("cuda_shared_memory", lambda: client.register_cuda_shared_memory("gpu", b"\0" * 64, 0, 1024)),
        ("cuda_shared_memory_status", client.get_cuda_shared_memory_status),  # none: as perf_analyzer ends
        ("cuda_shared_memory_unregister", client.unregister_cuda_shared_memory),
        ("trace_settings", client.get_trace_settings),
        ("log_settings", client.get_log_settings),
    ):
        try:
            call()
            seen[name] = None
        except InferenceServerException as exc:
            seen[name] = _error(exc)
    return seen


def _scenario_shared_memory(client: Any, tc: Any, args: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The input and the output of one request in system shared memory, as tritonclient's examples do it."""
    import tritonclient.utils.shared_memory as shm

    array = _load_arrays(workdir / "inputs.npz")["input"]
    out_bytes = array.shape[0] * 8 * 4
    key = f"/mf-triton-{args['tag']}"
    inputs = shm.create_shared_memory_region("inputs", key + "-in", array.nbytes)
    outputs = shm.create_shared_memory_region("outputs", key + "-out", out_bytes)
    try:
        shm.set_shared_memory_region(inputs, [array])
        client.register_system_shared_memory("inputs", key + "-in", array.nbytes)
        client.register_system_shared_memory("outputs", key + "-out", out_bytes)
        status = client.get_system_shared_memory_status(as_json=True)
        tensor = tc.InferInput("input", list(array.shape), "FP32")
        tensor.set_shared_memory("inputs", array.nbytes)
        requested = tc.InferRequestedOutput("output")
        requested.set_shared_memory("outputs", out_bytes)
        result = client.infer(args["model"], [tensor], outputs=[requested])
        described = result.get_output("output")  # as_json=True answers None in tritonclient 2.73
        parameters = {
            "region": described.parameters["shared_memory_region"].string_param,
            "byte_size": described.parameters["shared_memory_byte_size"].int64_param,
            "shape": list(described.shape),
        }
        output = shm.get_contents_as_numpy(outputs, np.float32, [array.shape[0], 8])
        np.savez(workdir / "outputs.npz", output=output)
        client.unregister_system_shared_memory()
        after = client.get_system_shared_memory_status(as_json=True)
    finally:
        shm.destroy_shared_memory_region(inputs)
        shm.destroy_shared_memory_region(outputs)
    return {"status": status, "output": parameters, "after": after}


_SCENARIOS: dict[str, Callable[[Any, Any, dict[str, Any], Path], dict[str, Any]]] = {
    "server": _scenario_server,
    "model": _scenario_model,
    "infer": _scenario_infer,
    "stream": _scenario_stream,
    "repository": _scenario_repository,
    "statistics": _scenario_statistics,
    "unserved": _scenario_unserved,
    "shared_memory": _scenario_shared_memory,
}


def _client_main(address: str, scenario: str, workdir: str) -> None:
    import tritonclient.grpc as tc

    directory = Path(workdir)
    args = json.loads((directory / "args.json").read_text())
    with tc.InferenceServerClient(address) as client:
        print(json.dumps(_SCENARIOS[scenario](client, tc, args, directory)))


if __name__ == "__main__":
    _client_main(*sys.argv[1:4])
    sys.exit(0)


# --- the test side: the server runs in this process ------------------------------------------------------------


@pytest.fixture(autouse=True)
def _tritonclient_installed() -> None:
    """Fails, never skips, without tritonclient: a CI that lacks it must not pass without these tests. The check
    finds the package without importing its generated code, which this interpreter cannot hold (see the top)."""
    if importlib.util.find_spec("tritonclient") is None or importlib.util.find_spec("tritonclient.grpc") is None:
        pytest.fail(
            "tritonclient[grpc] is not installed; it is a dev dependency: run `make venv` "
            "(or pip install -e '.[server,dev]')",
            pytrace=False,
        )


class TritonClient:
    """Runs scenarios with tritonclient in a child interpreter against one server address."""

    def __init__(self, address: str, workdir: Path) -> None:
        self._address = address
        self._workdir = workdir
        self._runs = 0

    async def run(
        self, scenario: str, args: dict[str, Any] | None = None, inputs: dict[str, np.ndarray] | None = None
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._runs += 1
        directory = self._workdir / f"{self._runs:02d}-{scenario}"
        directory.mkdir()
        (directory / "args.json").write_text(json.dumps(args or {}))
        if inputs:
            np.savez(directory / "inputs.npz", **inputs)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            self._address,
            scenario,
            str(directory),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), CLIENT_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode == 0, stderr.decode()
        return json.loads(stdout), _load_arrays(directory / "outputs.npz")


@pytest.fixture
async def triton(inference: Any, tmp_path: Path) -> TritonClient:
    return TritonClient(inference.address, tmp_path)


async def _publish(inference: Any, name: str, model: Any, **labels: str) -> int:
    from tests.integration.inference.conftest import upload

    return (await upload(inference, name, model, labels=labels)).version


def _onnxruntime(model: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.data, providers=["CPUExecutionProvider"])
    feeds = {k: v.astype(str) if v.dtype == object else v for k, v in inputs.items()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


async def test_server_metadata_liveness_and_readiness(triton: TritonClient) -> None:
    seen, _ = await triton.run("server")
    assert seen["live"] is True
    assert seen["ready"] is True
    assert seen["metadata"]["name"] == "modelforge"
    assert set(seen["metadata"]["extensions"]) == {
        "classification",
        "model_repository",
        "model_repository(unload_dependents)",
        "model_configuration",
        "schedule_policy",
        "parameters",
        "statistics",
    }


async def test_model_metadata_and_config(triton: TritonClient, inference: Any, multi_io: Any) -> None:
    version = await _publish(inference, "multi", multi_io, **{"modelforge.io/max-batch-size": "8"})
    seen, _ = await triton.run("model", {"model": "multi"})
    metadata, config = seen["metadata"], seen["config"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["versions"] == [str(version)]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("features", "FP32", ["-1", "4"]),
        ("ids", "INT64", ["-1", "2"]),
    ]
    assert config["max_batch_size"] == 8
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("features", "TYPE_FP32", ["4"]),
        ("ids", "TYPE_INT64", ["2"]),
    ]
    assert "dynamic_batching" in config


async def test_infer_fp32_and_int64_with_requested_outputs(triton: TritonClient, inference: Any, multi_io: Any) -> None:
    version = await _publish(inference, "multi", multi_io)
    inputs = multi_io.sample(3)
    expected = _onnxruntime(multi_io, inputs)
    args = {"model": "multi", "datatypes": {"features": "FP32", "ids": "INT64"}, "id": "req-1"}

    seen, outputs = await triton.run("infer", args, inputs)
    assert seen["response"]["id"] == "req-1"
    assert seen["response"]["model_version"] == str(version)
    np.testing.assert_allclose(outputs["scores"], expected["scores"], rtol=1e-6)
    np.testing.assert_array_equal(outputs["id_sum"], expected["id_sum"])

    seen, outputs = await triton.run("infer", {**args, "outputs": ["id_sum"]}, inputs)
    assert [o["name"] for o in seen["response"]["outputs"]] == ["id_sum"]
    assert set(outputs) == {"id_sum"}
    np.testing.assert_array_equal(outputs["id_sum"], expected["id_sum"])


@pytest.mark.parametrize("batching", [True, False])
async def test_infer_with_a_class_count_answers_the_top_classes(
    triton: TritonClient, inference: Any, mlp: Any, batching: bool
) -> None:
    labels = {"modelforge.io/max-batch-size": "8"} if batching else {}
    await _publish(inference, "scorer", mlp, **labels)
    inputs = mlp.sample(2)
    scores = _onnxruntime(mlp, inputs)["output"]  # [2, 8]
    args = {"model": "scorer", "datatypes": {"input": "FP32"}, "outputs": ["output"], "class_count": {"output": 3}}

    seen, outputs = await triton.run("infer", args, inputs)

    assert seen["response"]["outputs"][0]["datatype"] == "BYTES"
    # Per batch item where ModelConfig has a batch dimension; else over the whole output, flattened, as Triton does.
    ranked = scores if batching else scores.reshape(1, -1)
    top = [
        [f"{ranked[row, index]:f}:{index}".encode() for index in np.argsort(-ranked[row], kind="stable")[:3]]
        for row in range(len(ranked))
    ]
    assert outputs["output"].tolist() == (top if batching else top[0])


async def test_infer_fp16(triton: TritonClient, inference: Any, onnx_dir: Path) -> None:
    from onnx import TensorProto

    from tests.fixtures.onnx_models import ModelFile, build_identity, model_bytes

    data = model_bytes(build_identity(TensorProto.FLOAT16))
    await _publish(inference, "half", ModelFile("half", onnx_dir / "half.onnx", data))
    x = np.array([[0.5, -1.25, 3.0, 65504.0]], dtype=np.float16)
    seen, outputs = await triton.run("infer", {"model": "half", "datatypes": {"x": "FP16"}}, {"x": x})
    assert seen["response"]["outputs"][0]["datatype"] == "FP16"
    assert outputs["y"].dtype == np.float16
    np.testing.assert_array_equal(outputs["y"], x)


async def test_infer_bytes(triton: TritonClient, inference: Any, string_model: Any) -> None:
    await _publish(inference, "animals", string_model)
    text = np.array([b"dog", b"unicorn"], dtype=object)
    seen, outputs = await triton.run("infer", {"model": "animals", "datatypes": {"text": "BYTES"}}, {"text": text})
    assert {o["name"]: o["datatype"] for o in seen["response"]["outputs"]} == {"label_id": "INT64", "label": "BYTES"}
    assert outputs["label"].tolist() == [b"DOG", b"UNKNOWN"]
    assert outputs["label_id"].tolist() == [1, -1]


async def test_infer_with_priority_and_timeout(triton: TritonClient, inference: Any, mlp: Any) -> None:
    await _publish(inference, "mlp", mlp, **{"modelforge.io/priority-levels": "2"})
    inputs = mlp.sample(1)
    args = {"model": "mlp", "datatypes": {"input": "FP32"}, "priority": 1, "timeout": 5_000_000}
    _, outputs = await triton.run("infer", args, inputs)
    np.testing.assert_allclose(outputs["output"], _onnxruntime(mlp, inputs)["output"], rtol=1e-6)


async def test_infer_errors_carry_the_status_code(triton: TritonClient, mlp: Any) -> None:
    seen, _ = await triton.run("infer", {"model": "no-such-model", "datatypes": {"input": "FP32"}}, mlp.sample(1))
    assert seen["error"]["status"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in seen["error"]["message"]


async def test_stream_infer_answers_each_request_and_reports_errors(
    triton: TritonClient, inference: Any, mlp: Any
) -> None:
    await _publish(inference, "mlp", mlp)
    inputs = {f"x{i}": mlp.sample(1, seed=i)["input"] for i in range(3)}
    requests = [
        {"model": "mlp", "id": f"r{i}", "inputs": {"input": f"x{i}"}, "datatypes": {"input": "FP32"}} for i in range(3)
    ]
    requests.insert(1, {"model": "nope", "id": "bad", "inputs": {"input": "x0"}, "datatypes": {"input": "FP32"}})
    seen, outputs = await triton.run("stream", {"requests": requests}, inputs)
    answers = seen["answers"]
    assert sorted(k for k in answers if not k.startswith("error-")) == ["r0", "r1", "r2"]
    errors = [v["error"] for k, v in answers.items() if k.startswith("error-")]
    assert len(errors) == 1
    assert "nope" in errors[0]
    for i in range(3):
        expected = _onnxruntime(mlp, {"input": inputs[f"x{i}"]})["output"]
        np.testing.assert_allclose(outputs[f"r{i}/output"], expected, rtol=1e-6)
        assert answers[f"r{i}"]["final"] is True  # what stream loops that read until the last answer wait for


async def test_repository_index_load_and_unload(triton: TritonClient, inference: Any, mlp: Any) -> None:
    version = await _publish(inference, "mlp", mlp)
    seen, _ = await triton.run("repository", {"model": "mlp", "version": str(version)})
    assert seen["ready_before"] is False
    assert seen["ready_after_load"] is True
    assert [(m["name"], m["version"], m["state"]) for m in seen["index_after_load"]] == [("mlp", str(version), "READY")]
    assert seen["ready_after_unload"] is False
    unloaded = [(m["name"], m["version"], m["state"], m["reason"]) for m in seen["index_after_unload"]]
    assert unloaded == [("mlp", str(version), "UNAVAILABLE", "unloaded")]  # still in the repository
    assert seen["load_unknown"]["status"] == "StatusCode.NOT_FOUND"


async def test_inference_statistics(triton: TritonClient, inference: Any, mlp: Any) -> None:
    version = await _publish(inference, "mlp", mlp)
    for seed in range(2):
        await triton.run("infer", {"model": "mlp", "datatypes": {"input": "FP32"}}, mlp.sample(1, seed=seed))
    seen, _ = await triton.run("statistics", {"model": "mlp"})
    [stats] = seen["one"]["model_stats"]
    assert (stats["name"], stats["version"]) == ("mlp", str(version))
    assert stats["inference_stats"]["success"]["count"] == "2"
    assert stats["inference_count"] == "2"
    assert [s["name"] for s in seen["all"]["model_stats"]] == ["mlp"]


async def test_unserved_extensions_are_unimplemented(triton: TritonClient) -> None:
    seen, _ = await triton.run("unserved")
    assert seen["cuda_shared_memory"]["status"] == "StatusCode.UNIMPLEMENTED"
    assert "system shared memory" in seen["cuda_shared_memory"]["message"]
    assert (seen["cuda_shared_memory_status"], seen["cuda_shared_memory_unregister"]) == (None, None)
    assert seen["trace_settings"]["status"] == "StatusCode.UNIMPLEMENTED"
    assert "MODELFORGE_OTLP_ENDPOINT" in seen["trace_settings"]["message"]
    assert seen["log_settings"]["status"] == "StatusCode.UNIMPLEMENTED"
    assert "MODELFORGE_LOG_LEVEL" in seen["log_settings"]["message"]
    # System shared memory is there, off unless the server is started with it.
    assert seen["system_shared_memory"]["status"] == "StatusCode.FAILED_PRECONDITION"
    assert "MODELFORGE_ALLOW_CLIENT_SHM" in seen["system_shared_memory"]["message"]


async def test_system_shared_memory_carries_the_input_and_the_output(
    start_inference: Any, tmp_path: Path, mlp: Any
) -> None:
    async with start_inference(allow_client_shm=True) as inference:
        await _publish(inference, "mlp", mlp)
        inputs = mlp.sample(4)
        triton = TritonClient(inference.address, tmp_path)
        seen, arrays = await triton.run("shared_memory", {"model": "mlp", "tag": tmp_path.name[-12:]}, inputs)
    regions = seen["status"]["regions"]
    key = f"/mf-triton-{tmp_path.name[-12:]}"
    assert {name: (r["key"], r["byte_size"]) for name, r in regions.items()} == {
        "inputs": (key + "-in", str(4 * 64 * 4)),
        "outputs": (key + "-out", str(4 * 8 * 4)),
    }
    assert seen["output"] == {"region": "outputs", "byte_size": 4 * 8 * 4, "shape": [4, 8]}
    assert not seen["after"].get("regions")
    np.testing.assert_allclose(arrays["output"], _onnxruntime(mlp, inputs)["output"], rtol=1e-6)
