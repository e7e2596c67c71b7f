"""The models and request shapes that `make bench` measures, and the pre-serialised requests for each API."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from modelforge import tensors
from modelforge.inference.v1 import inference_pb2
from modelforge.oip.v2 import grpc_service_pb2
from modelforge.registry.v1 import registry_pb2
from tests.fixtures import onnx_models

PREDICT = "/modelforge.inference.v1.InferenceService/Predict"
PREDICT_STREAM = "/modelforge.inference.v1.InferenceService/PredictStream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"

# The labels that turn a version's dynamic batching on (see modelforge_inference.serving).
MAX_BATCH_SIZE = "modelforge.io/max-batch-size"
MAX_QUEUE_DELAY_US = "modelforge.io/max-queue-delay-us"
CACHE = "modelforge.io/cache"
INTRA_OP_THREADS = "modelforge.io/intra-op-threads"


@dataclass(frozen=True)
class Workload:
    """One model as the benchmark uses it: its file, a batch-1 input, and the labels of its batched variant."""

    key: str
    title: str
    model: onnx.ModelProto
    item: dict[str, np.ndarray]
    batching: dict[str, str] = field(default_factory=dict)
    raw_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)

    @property
    def file(self) -> bytes:
        return onnx_models.model_bytes(self.model)

    def batch(self, size: int) -> dict[str, np.ndarray]:
        return {name: np.repeat(value, size, axis=0) for name, value in self.item.items()}

    @property
    def output_bytes_per_item(self) -> int:
        """Bytes of output one item produces (from the graph's output shapes, float32 or the like)."""
        total = 0
        for output in self.model.graph.output:
            dims = [d.dim_value for d in output.type.tensor_type.shape.dim[1:]]
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(output.type.tensor_type.elem_type).itemsize
            total += int(np.prod(dims)) * itemsize
        return total


def workloads() -> list[Workload]:
    rng = np.random.default_rng(7)
    mlp = onnx_models.build_mlp()
    cnn = onnx_models.build_cnn()
    gen = onnx_models.build_image_generator()
    return [
        Workload(
            "mlp",
            "MLP 64→256→256→8 (float32)",
            mlp,
            {input_names(mlp)[0]: rng.standard_normal((1, 64), dtype=np.float32)},
            {MAX_BATCH_SIZE: "64", MAX_QUEUE_DELAY_US: "500"},
        ),
        Workload(
            "cnn",
            "CNN [N,3,64,64] (float32)",
            cnn,
            {input_names(cnn)[0]: rng.standard_normal((1, 3, 64, 64), dtype=np.float32)},
            {MAX_BATCH_SIZE: "64", MAX_QUEUE_DELAY_US: "2000"},
        ),
        Workload(
            "gen",
            "Image generator [N,16] → [N,3,512,512] (float32, 3 MiB per item)",
            gen,
            {input_names(gen)[0]: rng.standard_normal((1, 16), dtype=np.float32)},
            {MAX_BATCH_SIZE: "8", MAX_QUEUE_DELAY_US: "2000"},
            raw_batch_sizes=(1, 2, 4, 8),
        ),
    ]


def input_names(model: onnx.ModelProto) -> list[str]:
    initializers = {init.name for init in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def predict_request(model: str, inputs: dict[str, np.ndarray], *, cache: bool = False) -> bytes:
    request = inference_pb2.PredictRequest(
        ref=registry_pb2.ModelRef(name=model),
        inputs=[tensors.to_tensor(value, name=name) for name, value in inputs.items()],
        cache_mode=inference_pb2.CACHE_MODE_USE if cache else inference_pb2.CACHE_MODE_BYPASS,
    )
    return request.SerializeToString()


def stream_request(model: str, inputs: dict[str, np.ndarray], *, sha256: bool = True) -> bytes:
    request = inference_pb2.PredictStreamRequest(
        ref=registry_pb2.ModelRef(name=model),
        inputs=[tensors.to_tensor(value, name=name) for name, value in inputs.items()],
        cache_mode=inference_pb2.CACHE_MODE_BYPASS,
        skip_sha256=not sha256,
    )
    return request.SerializeToString()


def model_infer_request(model: str, inputs: dict[str, np.ndarray]) -> bytes:
    request = grpc_service_pb2.ModelInferRequest(model_name=model, id="bench")
    for name, value in inputs.items():
        datatype = tensors.to_v2_datatype(tensors.from_numpy_dtype(value.dtype))
        request.inputs.add(name=name, datatype=datatype, shape=value.shape)  # bytes go in raw_input_contents
        request.raw_input_contents.append(np.ascontiguousarray(value).tobytes())
    return request.SerializeToString()


def server_live_request() -> bytes:
    return grpc_service_pb2.ServerLiveRequest().SerializeToString()
