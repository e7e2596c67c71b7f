"""Translates modelforge.inference.v1.InferenceService RPCs to InferenceEngine calls; holds no logic of its own."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from modelforge import tensors
from modelforge.common.v1 import tensor_pb2
from modelforge.inference.v1 import inference_pb2 as pb
from modelforge.inference.v1 import inference_pb2_grpc
from modelforge_inference import convert, wire
from modelforge_inference.domain import ModelRef, Prediction
from modelforge_inference.engine import InferenceEngine
from modelforge_inference.signature import STRINGS_OFF_LOOP
from modelforge_server import paging
from modelforge_server.errors import ServiceError
from modelforge_server.settings import CHUNK_HEADROOM

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]

# Outputs at least this large are hashed on a worker thread while their chunks go out.
_HASH_OFF_LOOP_BYTES = 1 << 20
# The hashing thread checks between segments whether the stream still wants the digest (about 45 ms a segment).
# Each segment ends by taking the GIL back, which may wait the switch interval on a busy event loop: with 4 MiB
# segments batch-8 streams (25 MB) looked a tenth slower at c=1 (docs/PERFORMANCE.md, item 16), so outputs of up
# to 64 MiB hash in one call.
_HASH_SEGMENT_BYTES = 64 << 20


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """The InferenceService over an InferenceEngine."""

    def __init__(self, engine: InferenceEngine, *, chunk_bytes: int, max_message_bytes: int) -> None:
        self._engine = engine
        self._chunk_bytes = chunk_bytes
        self._max_message_bytes = max_message_bytes

    async def _predict(
        self,
        request: pb.PredictRequest | pb.PredictStreamRequest,
        context: grpc.aio.ServicerContext,
        answer_limit: int | None,
        *,
        element_limit: int | None = None,
    ) -> Prediction:
        ref = convert.model_ref(request.ref)
        assert ref is not None
        began = time.perf_counter()
        try:
            inputs = convert.inputs(request.inputs)
            timeout = convert.timeout(request)
            cache_mode = convert.cache_mode(request.cache_mode)
        except ServiceError as exc:  # counted as the engine counts the requests it refuses
            await self._engine.refused(ref, exc, began, context.time_remaining())
            raise
        return await self._engine.predict(
            ref,
            inputs,
            outputs=list(request.output_names) or None,
            priority=request.priority,
            timeout=timeout,
            cache_mode=cache_mode,
            time_remaining=context.time_remaining(),
            answer_limit=answer_limit,
            element_limit=element_limit,
        )

    # Predict and PredictStream answer with pre-serialised messages (see wire.py and add_inference_servicer_to_server).
    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[override]
        return convert.predict_response_bytes(await self._predict(request, context, self._max_message_bytes))

    async def PredictStream(  # type: ignore[override]
        self, request: pb.PredictStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictStreamResponse | bytes]:
        # Chunks: no output is too large to stream, but a string element travels whole in one message.
        prediction = await self._predict(request, context, None, element_limit=self._max_message_bytes - CHUNK_HEADROOM)
        yield convert.stream_header(prediction)
        meter = self._engine.stream_meter(prediction)
        hashed = not request.skip_sha256
        digests: dict[str, str] = {}
        hashing: dict[str, asyncio.Future[str]] = {}
        stop = threading.Event()  # tells the hashing threads that the stream ended early
        try:
            for name, array in prediction.outputs.items():
                # Each yield returns once the transport took the message, as flow control allows; a cancelled call
                # raises here, so no further chunk is built.
                if tensors.from_numpy_dtype(array.dtype) == tensor_pb2.DATA_TYPE_STRING:
                    # Encoded by the engine, which checked each element's size. Hashed on a thread when large: a
                    # loop busy with it would hold every other call.
                    large = array.size > STRINGS_OFF_LOOP
                    elements = prediction.encoded[name]
                    if hashed:
                        digest = convert.string_digest
                        digests[name] = await asyncio.to_thread(digest, elements) if large else digest(elements)
                    for message in convert.string_chunks(name, elements, self._chunk_bytes):
                        yield message
                        meter(message.ByteSize())
                    continue
                view = convert.raw_view(array)
                if hashed and len(view) >= _HASH_OFF_LOOP_BYTES:  # hashlib releases the GIL: hash while streaming
                    hashing[name] = asyncio.ensure_future(asyncio.to_thread(sha256, view, stop))
                elif hashed:
                    digests[name] = sha256(view, stop)
                for chunk in convert.raw_chunks(name, view, self._chunk_bytes):
                    yield chunk
                    meter(len(chunk))
            for name, future in hashing.items():
                digests[name] = await future
        finally:
            stop.set()
            for future in hashing.values():
                future.cancel()
        ordered = {name: digests[name] for name in prediction.outputs if name in digests}
        yield convert.stream_trailer(prediction.timings, ordered)

    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.LoadModelResponse:
        ref = convert.model_ref(request.ref)
        assert ref is not None
        loaded = await self._engine.load(ref, time_remaining=context.time_remaining())
        return pb.LoadModelResponse(loaded_model=convert.loaded_model(loaded))

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        ref = convert.model_ref(request.ref)
        assert ref is not None
        unloaded = await self._engine.unload(ref)
        return pb.UnloadModelResponse(unloaded_models=[convert.loaded_model(m) for m in unloaded])

    async def ListLoadedModels(
        self, request: pb.ListLoadedModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListLoadedModelsResponse:
        limit = paging.page_size(request.page_size, default=100, maximum=1000)
        # The listing's order, in which a version being unloaded may stand beside its reload: name, version, state.
        after = paging.decode(request.page_token, (str, int, str), request)
        models = [m for m in self._engine.loaded() if not request.model or m.name == request.model]
        if after is not None:
            models = [m for m in models if [m.name, m.version, m.state.value] > after]
        page = models[:limit]
        last = page[-1] if len(models) > limit else None
        token = paging.encode([last.name, last.version, last.state.value], request) if last is not None else ""
        return pb.ListLoadedModelsResponse(loaded_models=[convert.loaded_model(m) for m in page], next_page_token=token)

    async def GetModelStatistics(
        self, request: pb.GetModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelStatisticsResponse:
        ref: ModelRef | None = convert.model_ref(request.ref, required=False) if request.HasField("ref") else None
        statistics = await self._engine.statistics(ref)
        return pb.GetModelStatisticsResponse(
            model_statistics=[convert.model_statistics(s) for s in statistics],
            cache_status=convert.cache_status(self._engine.cache_degraded),
        )


def sha256(view: memoryview, stop: threading.Event) -> str:
    """The hex SHA-256 of `view`, taken a segment at a time so that a stream that ends early stops its hashing too.

    Raises:
        asyncio.CancelledError: `stop` was set before the last segment.
    """
    digest = hashlib.sha256()
    for start in range(0, len(view), _HASH_SEGMENT_BYTES):
        if stop.is_set():
            raise asyncio.CancelledError("the stream ended before its output was hashed")
        digest.update(view[start : start + _HASH_SEGMENT_BYTES])
    return digest.hexdigest()


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
}


def add_inference_servicer_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Registers InferenceService like the generated function does, with serialisers that send the
    pre-serialised responses of Predict and PredictStream as they are."""
    handlers: dict[str, Any] = {}
    for method in SERVICE.methods:
        response_class = getattr(pb, method.output_type.name)
        handlers[method.name] = _FACTORIES[(method.client_streaming, method.server_streaming)](
            getattr(servicer, method.name),
            request_deserializer=getattr(pb, method.input_type.name).FromString,
            response_serializer=wire.passthrough(response_class.SerializeToString),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
