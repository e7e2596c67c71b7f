"""The Open Inference Protocol (V2) front: translates GRPCInferenceService RPCs to InferenceEngine calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import metadata
from typing import Any

import grpc

from modelforge._refs import ModelRef
from modelforge.oip.v2 import grpc_service_pb2 as pb
from modelforge.oip.v2 import grpc_service_pb2_grpc
from modelforge_inference import oip_convert as convert
from modelforge_inference import wire
from modelforge_inference.engine import InferenceEngine
from modelforge_inference.errors import CudaSharedMemoryUnsupported, LogSettingsUnsupported, TraceSettingsUnsupported
from modelforge_inference.shm import SharedMemoryRegions
from modelforge_server.errors import NotFound, ServiceError

__all__ = ["SERVICE", "OipServicer", "add_oip_servicer_to_server"]

log = logging.getLogger("modelforge.inference.oip")

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


SERVER_NAME = "modelforge"


def _server_version() -> str:
    try:
        return metadata.version("modelforge")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class OipServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Translates Open Inference Protocol RPCs to InferenceEngine calls; holds no logic of its own.

    ``ready`` tells ServerReady whether the server takes requests (the composition root passes the
    server's health, e.g. ``lambda: server.serving``). ``max_message_bytes`` is the server's send limit: an
    answer that would exceed it is refused with RESOURCE_EXHAUSTED (in-band on a stream, which goes on) instead
    of failing in the transport. ``regions`` holds the clients' shared memory regions; by default the server
    takes none.
    """

    def __init__(
        self,
        engine: InferenceEngine,
        *,
        ready: Callable[[], bool] = lambda: True,
        max_message_bytes: int,
        stream_max_in_flight: int = 256,
        regions: SharedMemoryRegions | None = None,
    ) -> None:
        if stream_max_in_flight < 1:
            raise ValueError(f"stream_max_in_flight must be at least 1, not {stream_max_in_flight}")
        self._engine = engine
        self._ready = ready
        self._stream_max_in_flight = stream_max_in_flight
        self._max_message_bytes = max_message_bytes
        self._regions = regions if regions is not None else SharedMemoryRegions(enabled=False)
        extensions: tuple[str, ...] = convert.EXTENSIONS
        if self._regions.enabled:
            extensions += (convert.SHARED_MEMORY_EXTENSION,)
        self._metadata = pb.ServerMetadataResponse(name=SERVER_NAME, version=_server_version(), extensions=extensions)

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            ref = convert.named_ref(request.name, request.version)
        except convert.NoSuchV2Model:
            return pb.ModelReadyResponse(ready=False)  # as for any model or version the server lacks
        if ref.version is None:
            # An alias or "newest" names a version only once the registry resolves it.
            try:
                model, _ = await self._engine.describe(ref)
            except NotFound:
                return pb.ModelReadyResponse(ready=False)
            ref = ModelRef(model.name, version=model.version)
        return pb.ModelReadyResponse(ready=self._engine.is_ready(ref))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return self._metadata

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model, _ = await self._engine.describe(convert.named_ref(request.name, request.version))
        return convert.model_metadata(model)

    # ModelInfer and ModelStreamInfer answer with pre-serialised messages (see wire.py).
    async def ModelInfer(  # type: ignore[override]
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        return wire.join(await self._infer(request, context))

    async def ModelStreamInfer(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse | bytes]:
        # Requests run concurrently, so that a client streaming many of them fills the batcher; the answers go
        # out in the order of their requests, as Triton sends them for models that are not decoupled (clients
        # that set no `id` pair answers with requests by order). A failed request is answered in-band, unless
        # the client opened the stream with Triton's header `triton_grpc_error: true`: then the first failure
        # ends the stream with its status, after the answers before it. At most stream_max_in_flight requests
        # run or wait to be sent; past that the stream stops reading.
        in_band = not _asks_for_grpc_errors(context)
        answers: asyncio.Queue[asyncio.Task[pb.ModelStreamInferResponse | bytes] | None] = asyncio.Queue()
        running: set[asyncio.Task[pb.ModelStreamInferResponse | bytes]] = set()
        room = asyncio.Semaphore(self._stream_max_in_flight)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await room.acquire()
                    task = asyncio.create_task(self._stream_answer(request, context, in_band=in_band))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    answers.put_nowait(task)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield await answer  # an error raised here (not in_band) ends the stream with its status
                room.release()  # sent: its place goes to the next request
            await reader  # surfaces a broken request stream
        finally:
            for task in (reader, *running):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, *running, return_exceptions=True)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        model, serving = await self._engine.describe(convert.named_ref(request.name, request.version))
        config = convert.model_config(model, serving, merging=self._engine.merges(model))
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        ref = convert.named_ref(request.name, request.version) if request.name else None
        stats = await self._engine.statistics(ref)
        return pb.ModelStatisticsResponse(model_stats=[convert.model_statistics(s) for s in stats])

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        convert.check_repository_name(request.repository_name)
        models = [convert.model_index(entry) for entry in await self._engine.repository_index()]
        if request.ready:
            models = [m for m in models if m.state == "READY"]
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        convert.check_repository_name(request.repository_name)
        convert.check_repository_parameters(request.parameters)
        ref = convert.repository_model_ref(request.model_name)
        await self._engine.load(ref, time_remaining=context.time_remaining())
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        convert.check_repository_name(request.repository_name)
        convert.check_unload_parameters(request.parameters)
        # As in Triton, the answer does not wait for the requests in flight, and unloading a model that is not
        # loaded (or not known, or that no model could be named) succeeds and changes nothing.
        with contextlib.suppress(NotFound):
            await self._engine.unload(convert.repository_model_ref(request.model_name), wait=False)
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        return convert.shared_memory_status(self._regions.status(request.name))

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._regions.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._regions.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # The protocol's methods for what this server does not do answer UNIMPLEMENTED saying what to do instead;
    # ServerMetadata does not list their extensions.

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        if request.name:
            raise CudaSharedMemoryUnsupported()
        return pb.CudaSharedMemoryStatusResponse()  # every region: none, as Triton answers without any

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise CudaSharedMemoryUnsupported()

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        # Nothing is registered, so there is nothing to drop: clients that unregister every region of both kinds
        # when they end (perf_analyzer --shared-memory system) succeed, as against Triton.
        return pb.CudaSharedMemoryUnregisterResponse()

    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: grpc.aio.ServicerContext
    ) -> pb.TraceSettingResponse:
        raise TraceSettingsUnsupported()

    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LogSettingsResponse:
        raise LogSettingsUnsupported()

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, *, streamed: bool = False
    ) -> wire.Parts:
        ref = convert.model_ref(request.model_name, request.model_version)
        began = time.perf_counter()
        try:
            convert.refuse_sequences(request.parameters)
            inputs = convert.decode_inputs(request, self._regions)
            outputs = convert.requested_outputs(request)
            classes = convert.classifications(request)
            if classes:  # refused before the run where the signature says so (the run would count as a success)
                convert.check_classifiable((await self._engine.describe(ref))[0].signature, classes)
            shared = convert.shared_memory_outputs(request, self._regions) if outputs else None
            priority = convert.priority(request.parameters)
            timeout = convert.timeout_seconds(request.parameters)
        except ServiceError as exc:  # counted as the engine counts the requests it refuses
            await self._engine.refused(ref, exc, began, context.time_remaining())
            raise
        prediction = await self._engine.predict(
            ref,
            inputs,
            outputs=outputs or None,
            priority=priority,
            timeout=timeout,
            time_remaining=context.time_remaining(),
            into={name: target.memory for name, target in shared.items()} if shared else None,
            answer_limit=self._max_message_bytes - len(request.id.encode()),  # the answer echoes the id
            summarized=classes.keys(),
        )
        answered = prediction.outputs
        if classes:
            answered = await self._classified(prediction.model, prediction.version, answered, classes)
        return convert.infer_response_parts(
            model=prediction.model,
            version=prediction.version,
            request_id=request.id,
            outputs=answered,
            signature=prediction.signature if convert.needs_signature(prediction.outputs) else None,
            shared=shared,
            placed=prediction.placed,
            final=streamed,
        )

    async def _classified(
        self, model: str, version: int, outputs: dict[str, Any], classes: dict[str, int]
    ) -> dict[str, Any]:
        """The outputs with those in `classes` classified, per batch item where the version's ModelConfig has a
        batch dimension (max_batch_size > 0), as Triton classifies them."""
        resolved, serving = await self._engine.describe(ModelRef(model, version=version))
        batched = convert.max_batch_size(resolved.signature, serving) > 0
        specs = {spec.name: spec for spec in resolved.signature.outputs}
        return {
            name: convert.classified(name, array, classes[name], batched=batched, spec=specs.get(name))
            if name in classes
            else array
            for name, array in outputs.items()
        }

    async def _stream_answer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, *, in_band: bool = True
    ) -> pb.ModelStreamInferResponse | bytes:
        try:
            return wire.join(convert.stream_infer_response(await self._infer(request, context, streamed=True)))
        except ServiceError as exc:
            if not in_band:
                raise
            message = str(exc)
        except Exception:
            if not in_band:
                raise  # the status mapping logs it and answers INTERNAL
            log.exception("unexpected error in a ModelStreamInfer request")
            message = "internal error; details are in the server log"
        return convert.stream_error_response(request, message)


# Triton's stream header (its 24.08 release on) asking for failures as the stream's gRPC status instead of in-band.
_GRPC_ERRORS_HEADER = "triton_grpc_error"


def _asks_for_grpc_errors(context: grpc.aio.ServicerContext) -> bool:
    metadata = context.invocation_metadata() or ()
    return any(key == _GRPC_ERRORS_HEADER and str(value).lower() == "true" for key, value in metadata)


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_oip_servicer_to_server(servicer: OipServicer, server: grpc.aio.Server) -> None:
    """Registers every method of GRPCInferenceService on ``server``.

    It stands in for the generated ``add_GRPCInferenceServiceServicer_to_server`` so that answers the servicer has
    already serialised (see `wire`) go out as they are.
    """
    handlers: dict[str, Any] = {}
    for method in SERVICE.methods:
        name = method.name
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        factory = _FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[name] = factory(
            getattr(servicer, name),
            request_deserializer=request_class.FromString,
            response_serializer=wire.passthrough(response_class.SerializeToString),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
