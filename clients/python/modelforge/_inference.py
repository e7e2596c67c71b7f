"""InferenceClient and AsyncInferenceClient: predictions, streamed predictions, loading and statistics.

Same methods and arguments on both; the async one is awaited. Requests are built and answers read through
``_convert``, so only the I/O differs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
import numpy as np

from modelforge import _convert
from modelforge._channel import DEFAULT_MAX_MESSAGE_BYTES, INFERENCE, AsyncChannelClient, ChannelClient
from modelforge._convert import Progress
from modelforge._domain import LoadedModel, Prediction, Statistics
from modelforge._errors import translated
from modelforge._refs import ModelRef
from modelforge.inference.v1 import inference_pb2 as pb
from modelforge.inference.v1 import inference_pb2_grpc

__all__ = ["AsyncInferenceClient", "InferenceClient"]

Arrays = Mapping[str, Any]
"""Input name to a numpy array (or anything ``np.asarray`` accepts)."""


def _statistics(response: pb.GetModelStatisticsResponse) -> Statistics:
    return Statistics(
        models=tuple(_convert.model_statistics(s) for s in response.model_statistics),
        cache_status=_convert.cache_status(response.cache_status),
    )


def _statistics_request(ref: str | ModelRef | None) -> pb.GetModelStatisticsRequest:
    if ref is None:
        return pb.GetModelStatisticsRequest()
    return pb.GetModelStatisticsRequest(ref=_convert.ref_proto(ref))


class InferenceClient(ChannelClient):
    """A blocking client of the ModelForge inference service.

    ::

        with InferenceClient("localhost:50052") as inference:
            outputs = inference.predict("fraud@production", {"input": features})
            scores = outputs["scores"]

    Args:
        target: ``host:port`` of the inference service; defaults to ``MODELFORGE_INFERENCE_ADDRESS``, else
            ``127.0.0.1:50052``.
        channel: A channel of your own; the client does not close it. Excludes ``target``.
        timeout: Seconds allowed for each call (the gRPC deadline; the server drops the request when it passes
            while queued); None for no limit.
        max_message_bytes: Largest message sent or received; use :meth:`predict_stream` for larger outputs.

    Raises:
        modelforge.ModelForgeError: from any method when the service refuses a call; for example
            InvalidArgumentError naming the input at fault, NotFoundError for an unknown model,
            ResourceExhaustedError when the model's queue is full.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(INFERENCE, target, channel, max_message_bytes)
        self._timeout = timeout
        self.inference_stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        """The generated stub over this client's channel, for calls the client does not wrap."""

    def predict(
        self,
        ref: str | ModelRef,
        inputs: Arrays,
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        queue_timeout: float | None = None,
        cache: str | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Runs a model and returns its outputs.

        Args:
            ref: ``"name"`` (newest READY version), ``"name:3"`` or ``"name@production"``.
            inputs: Input name to array.
            outputs: The outputs to return; None for all.
            priority: Queue priority, 1 the most urgent; 0 the least.
            queue_timeout: Seconds the request may wait in the batch queue (it can only shorten the model's).
            cache: ``"use"``, ``"bypass"`` or ``"refresh"`` for the prediction cache; None for the default.

        Returns:
            Output name to a read-only array viewing the response's bytes (``.copy()`` to write to it).
        """
        return self.predict_full(
            ref, inputs, outputs=outputs, priority=priority, queue_timeout=queue_timeout, cache=cache
        ).outputs_dict()

    def predict_full(
        self,
        ref: str | ModelRef,
        inputs: Arrays,
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        queue_timeout: float | None = None,
        cache: str | None = None,
    ) -> Prediction:
        """Like :meth:`predict`, and also says which version ran, the timings, and whether the cache answered."""
        request = _convert.predict_request(
            ref, inputs, outputs=outputs, priority=priority, queue_timeout=queue_timeout, cache=cache
        )
        with translated():
            response = self.inference_stub.Predict(request, timeout=self._timeout)
        return _convert.prediction(response)

    def predict_stream(
        self,
        ref: str | ModelRef,
        inputs: Arrays,
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        queue_timeout: float | None = None,
        cache: str | None = None,
        progress: Progress | None = None,
        verify: bool = True,
    ) -> Prediction:
        """Runs a model and receives its outputs as a stream of chunks, for outputs too large for one message.

        The chunks are written into one buffer per output and checked against the server's sha256.

        Args:
            ref, inputs, outputs, priority, queue_timeout, cache: As for :meth:`predict`.
            progress: Called as ``progress(received, total)`` as chunks arrive: bytes of numeric outputs plus
                elements of string outputs (whose size in bytes the header does not give).
            verify: False asks the server not to hash the outputs (``skip_sha256``) and skips the check here,
                saving about 0.7 s of CPU per GB on each end; the chunks' order and sizes are still checked.

        Returns:
            The outputs, with the version that ran, the timings and whether the cache answered.

        Raises:
            IntegrityError: the stream was incomplete, or (with verify) an output's sha256 is missing or differs.
        """
        request = _convert.predict_stream_request(
            ref, inputs, outputs=outputs, priority=priority, queue_timeout=queue_timeout, cache=cache, verify=verify
        )
        assembler = _convert.StreamAssembler(progress, verify=verify)
        with translated():  # a closed client fails here, before the call exists
            call = self.inference_stub.PredictStream(request, timeout=self._timeout)
        try:
            with translated():
                for message in call:
                    assembler.accept(message)
        except BaseException:
            call.cancel()
            raise
        return assembler.finish()

    def load(self, ref: str | ModelRef) -> LoadedModel:
        """Loads a model version now (with its warmup run) instead of on its first request; returns it READY."""
        with translated():
            response = self.inference_stub.LoadModel(
                pb.LoadModelRequest(ref=_convert.ref_proto(ref)), timeout=self._timeout
            )
        return _convert.loaded_model(response.loaded_model)

    def unload(self, ref: str | ModelRef) -> list[LoadedModel]:
        """Unloads a model version once its requests have finished; ``"name"`` unloads every loaded version.

        Raises:
            NotFoundError: no matching version is loaded.
        """
        with translated():
            response = self.inference_stub.UnloadModel(
                pb.UnloadModelRequest(ref=_convert.ref_proto(ref)), timeout=self._timeout
            )
        return [_convert.loaded_model(m) for m in response.unloaded_models]

    def list_loaded(self, *, model: str = "", page_size: int = 100) -> Iterator[LoadedModel]:
        """Iterates over the model versions the server holds, by name and version, fetching pages lazily."""
        token = ""
        while True:
            request = pb.ListLoadedModelsRequest(page_size=page_size, page_token=token, model=model)
            with translated():
                page = self.inference_stub.ListLoadedModels(request, timeout=self._timeout)
            yield from (_convert.loaded_model(m) for m in page.loaded_models)
            if not (token := page.next_page_token):
                return

    def statistics(self, ref: str | ModelRef | None = None) -> Statistics:
        """Counters per model version the server has run, and the prediction cache's health.

        Args:
            ref: One version (``"name:3"``), every version of a model (``"name"``), or None for all.
        """
        with translated():
            response = self.inference_stub.GetModelStatistics(_statistics_request(ref), timeout=self._timeout)
        return _statistics(response)


class AsyncInferenceClient(AsyncChannelClient):
    """The asyncio twin of :class:`InferenceClient`: the same methods, awaited.

    ::

        async with AsyncInferenceClient() as inference:
            outputs = await inference.predict("fraud@production", {"input": features})

    Args:
        target: ``host:port`` of the inference service; defaults to ``MODELFORGE_INFERENCE_ADDRESS``, else
            ``127.0.0.1:50052``.
        channel: A ``grpc.aio`` channel of your own; the client does not close it. Excludes ``target``.
        timeout: Seconds allowed for each call; None for no limit.
        max_message_bytes: Largest message sent or received.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(INFERENCE, target, channel, max_message_bytes)
        self._timeout = timeout
        self.inference_stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        """The generated stub over this client's channel, for calls the client does not wrap."""

    async def predict(
        self,
        ref: str | ModelRef,
        inputs: Arrays,
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        queue_timeout: float | None = None,
        cache: str | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """See :meth:`InferenceClient.predict`."""
        prediction = await self.predict_full(
            ref, inputs, outputs=outputs, priority=priority, queue_timeout=queue_timeout, cache=cache
        )
        return prediction.outputs_dict()

    async def predict_full(
        self,
        ref: str | ModelRef,
        inputs: Arrays,
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        queue_timeout: float | None = None,
        cache: str | None = None,
    ) -> Prediction:
        """See :meth:`InferenceClient.predict_full`."""
        request = _convert.predict_request(
            ref, inputs, outputs=outputs, priority=priority, queue_timeout=queue_timeout, cache=cache
        )
        with translated():
            response = await self.inference_stub.Predict(request, timeout=self._timeout)
        return _convert.prediction(response)

    async def predict_stream(
        self,
        ref: str | ModelRef,
        inputs: Arrays,
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        queue_timeout: float | None = None,
        cache: str | None = None,
        progress: Progress | None = None,
        verify: bool = True,
    ) -> Prediction:
        """See :meth:`InferenceClient.predict_stream`. Progress is called on the event loop."""
        request = _convert.predict_stream_request(
            ref, inputs, outputs=outputs, priority=priority, queue_timeout=queue_timeout, cache=cache, verify=verify
        )
        assembler = _convert.StreamAssembler(progress, verify=verify)
        with translated():  # a closed client fails here, before the call exists
            call = self.inference_stub.PredictStream(request, timeout=self._timeout)
        try:
            with translated():
                async for message in call:
                    assembler.accept(message)
        except BaseException:
            call.cancel()
            raise
        return assembler.finish()

    async def load(self, ref: str | ModelRef) -> LoadedModel:
        """See :meth:`InferenceClient.load`."""
        with translated():
            response = await self.inference_stub.LoadModel(
                pb.LoadModelRequest(ref=_convert.ref_proto(ref)), timeout=self._timeout
            )
        return _convert.loaded_model(response.loaded_model)

    async def unload(self, ref: str | ModelRef) -> list[LoadedModel]:
        """See :meth:`InferenceClient.unload`."""
        with translated():
            response = await self.inference_stub.UnloadModel(
                pb.UnloadModelRequest(ref=_convert.ref_proto(ref)), timeout=self._timeout
            )
        return [_convert.loaded_model(m) for m in response.unloaded_models]

    async def list_loaded(self, *, model: str = "", page_size: int = 100) -> AsyncIterator[LoadedModel]:
        """See :meth:`InferenceClient.list_loaded`; iterate with ``async for``."""
        token = ""
        while True:
            request = pb.ListLoadedModelsRequest(page_size=page_size, page_token=token, model=model)
            with translated():
                page = await self.inference_stub.ListLoadedModels(request, timeout=self._timeout)
            for m in page.loaded_models:
                yield _convert.loaded_model(m)
            if not (token := page.next_page_token):
                return

    async def statistics(self, ref: str | ModelRef | None = None) -> Statistics:
        """See :meth:`InferenceClient.statistics`."""
        with translated():
            response = await self.inference_stub.GetModelStatistics(_statistics_request(ref), timeout=self._timeout)
        return _statistics(response)
