"""InferenceClient and AsyncInferenceClient: predictions, streamed predictions, loading and statistics.

Same methods and arguments on both; the async one is awaited. Requests are built and answers read through
``_convert``, so only the I/O differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
import numpy as np

from modelforge import _convert
from modelforge._channel import CLIENT_TIMEOUT, INFERENCE, AsyncChannelClient, ChannelClient, Timeout, call_timeout
from modelforge._convert import Progress
from modelforge._domain import CacheMode, LoadedModel, Prediction, Statistics
from modelforge._errors import DeadlineExceededError, translated
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


def _stream_queue_timeout(queue_timeout: float | None, timeout: float | None) -> float | None:
    """The queue timeout of a PredictStream request. The stream has no deadline as a whole (the transfer takes
    as long as it needs), so the client's timeout, where shorter, bounds the request's wait in the batch queue, as
    a unary call's deadline does."""
    if timeout is None or timeout < 1e-6:  # no limit; or one so short the stream's watch ends the call at once
        return queue_timeout
    return timeout if queue_timeout is None else min(queue_timeout, timeout)


def _stalled(timeout: float | None) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"PredictStream sent nothing for {timeout:g} s (the model's run, then each wait for the next chunk, has "
        "the client's timeout; the transfer as a whole has none): raise the timeout for slower models or links"
    )


class _Watchdog:
    """Cancels a blocking stream when it waits `seconds` (None: never) for a message, from a thread of its own.

    Time spent on a message received (the assembly, the caller's progress callback) is not waiting: the window
    starts again once it is handled. The watch looks four times per window, so it fires within 1.25 windows.
    """

    def __init__(self, cancel: Callable[[], object], seconds: float | None) -> None:
        self._cancel = cancel
        self._seconds = seconds
        self._deadline = time.monotonic() + (seconds or 0.0)
        self._handling = False
        self._done = threading.Event()
        self.fired = False
        if seconds is not None:
            threading.Thread(target=self._watch, name="modelforge-stream-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """Around the handling of a message received: not waiting, and the next wait gets a whole window."""
        self._handling = True
        try:
            yield
        finally:
            self._deadline = time.monotonic() + (self._seconds or 0.0)
            self._handling = False

    def close(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        assert self._seconds is not None
        while not self._done.wait(self._seconds / 4):
            if not self._handling and time.monotonic() > self._deadline:
                self.fired = True
                self._cancel()
                return


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
            while queued); None for no limit. A PredictStream has it for the model's run, until the first
            message, and then for each wait for the next; the transfer as a whole takes as long as it needs.
            Each method's ``timeout=`` replaces it for that call.
        max_message_bytes: Largest message sent or received; None for what the service takes and gives with its
            default settings: requests of up to 68 MiB (64 MiB of inputs, its ``MODELFORGE_MAX_REQUEST_BYTES``, and
            room for the rest) and answers of up to 64 MiB (its ``MODELFORGE_MAX_MESSAGE_BYTES``). Use
            :meth:`predict_stream` for larger outputs.
        connections: Connections to open to ``target``, each call taking the next in turn. Where one address
            spreads connections over several processes (``modelforge up --inference-replicas``, replicas sharing
            a port, a TCP load balancer), one client's calls then reach them all. A connection lands on one
            replica for its life, so LoadModel and the statistics calls reach whichever replica that is.

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
        max_message_bytes: int | None = None,
        connections: int = 1,
    ) -> None:
        super().__init__(INFERENCE, target, channel, max_message_bytes, connections)
        self.timeout = timeout
        """Seconds allowed for each call whose own ``timeout=`` says nothing else; None for no limit."""
        stubs = [inference_pb2_grpc.InferenceServiceStub(channel) for channel in self._channels]
        self._turns = itertools.cycle(stubs)  # next() on it is one step under the GIL: callers on threads share it
        self.inference_stub = stubs[0]
        """The generated stub over this client's (first) channel, for calls the client does not wrap."""

    def predict(
        self,
        ref: str | ModelRef,
        inputs: Arrays,
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        queue_timeout: float | None = None,
        cache: CacheMode | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Runs a model and returns its outputs.

        Args:
            ref: ``"name"`` (newest READY version), ``"name:3"`` or ``"name@production"``.
            inputs: Input name to array.
            outputs: The outputs to return; None for all.
            priority: Queue priority, 1 the most urgent; 0 the least.
            queue_timeout: Seconds the request may wait in the batch queue (it can only shorten the model's).
            cache: ``"use"``, ``"bypass"`` or ``"refresh"`` for the prediction cache; None for the default.
            timeout: Seconds allowed for this call, instead of the client's timeout; None for no limit.

        Returns:
            Output name to array. Numeric outputs are read-only arrays viewing the response's bytes (``.copy()``
            one to write to it). String outputs are writable ``object`` arrays of ``bytes``.
        """
        return self.predict_full(
            ref, inputs, outputs=outputs, priority=priority, queue_timeout=queue_timeout, cache=cache, timeout=timeout
        ).outputs_dict()

    def predict_full(
        self,
        ref: str | ModelRef,
        inputs: Arrays,
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        queue_timeout: float | None = None,
        cache: CacheMode | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> Prediction:
        """Like :meth:`predict`, and also says which version ran, the timings, and whether the cache answered."""
        request = _convert.predict_request(
            ref, inputs, outputs=outputs, priority=priority, queue_timeout=queue_timeout, cache=cache
        )
        with translated():
            response = next(self._turns).Predict(request, timeout=call_timeout(timeout, self.timeout))
        return _convert.prediction(response)

    def predict_stream(
        self,
        ref: str | ModelRef,
        inputs: Arrays,
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        queue_timeout: float | None = None,
        cache: CacheMode | None = None,
        progress: Progress | None = None,
        verify: bool = True,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> Prediction:
        """Runs a model and receives its outputs as a stream of chunks, for outputs too large for one message.

        The chunks are written into one buffer per output and checked against the server's sha256.

        Args:
            ref, inputs, outputs, priority, queue_timeout, cache: As for :meth:`predict`.
            timeout: Seconds allowed for the model's run and then for each wait for the next chunk, instead of the
                client's timeout; None for no limit. It also bounds the request's wait in the batch queue.
            progress: Called as ``progress(received, total)`` as chunks arrive: bytes of numeric outputs plus
                elements of string outputs (whose size in bytes the header does not give).
            verify: False asks the server not to hash the outputs (``skip_sha256``) and skips the check here,
                saving about 0.7 s of CPU per GB on each end; the chunks' order and sizes are still checked.

        Returns:
            The outputs, with the version that ran, the timings and whether the cache answered. Numeric outputs
            are writable arrays over buffers of their own; string outputs are writable ``object`` arrays of
            ``bytes``.

        Raises:
            IntegrityError: the stream was incomplete, or (with verify) an output's sha256 is missing or differs.
        """
        seconds = call_timeout(timeout, self.timeout)
        queue_timeout = _stream_queue_timeout(queue_timeout, seconds)
        request = _convert.predict_stream_request(
            ref, inputs, outputs=outputs, priority=priority, queue_timeout=queue_timeout, cache=cache, verify=verify
        )
        assembler = _convert.StreamAssembler(progress, verify=verify)
        with translated():  # a closed client fails here, before the call exists
            call = next(self._turns).PredictStream(request)
        watchdog = _Watchdog(call.cancel, seconds)
        try:
            with translated():
                for message in call:
                    with watchdog.handling():
                        assembler.accept(message)
        except BaseException as exc:
            call.cancel()
            if watchdog.fired:
                raise _stalled(seconds) from exc
            raise
        finally:
            watchdog.close()
        return assembler.finish()

    def load(self, ref: str | ModelRef, *, timeout: Timeout = CLIENT_TIMEOUT) -> LoadedModel:
        """Loads a model version now (with its warmup run) instead of on its first request; returns it READY.

        Args:
            ref: ``"name"`` (newest READY version), ``"name:3"`` or ``"name@production"``.
            timeout: Seconds allowed for this call, instead of the client's timeout (a model with a long warmup
                may need more than predictions do); None for no limit.
        """
        with translated():
            response = next(self._turns).LoadModel(
                pb.LoadModelRequest(ref=_convert.ref_proto(ref)), timeout=call_timeout(timeout, self.timeout)
            )
        return _convert.loaded_model(response.loaded_model)

    def unload(self, ref: str | ModelRef, *, timeout: Timeout = CLIENT_TIMEOUT) -> list[LoadedModel]:
        """Unloads a model version once its requests have finished; ``"name"`` unloads every loaded version.

        Args:
            ref: ``"name:3"`` or ``"name@production"`` for one version; ``"name"`` for every loaded one.
            timeout: Seconds allowed for this call, instead of the client's timeout; None for no limit.

        Raises:
            NotFoundError: no matching version is loaded.
        """
        with translated():
            response = next(self._turns).UnloadModel(
                pb.UnloadModelRequest(ref=_convert.ref_proto(ref)), timeout=call_timeout(timeout, self.timeout)
            )
        return [_convert.loaded_model(m) for m in response.unloaded_models]

    def list_loaded(
        self, *, model: str = "", page_size: int = 100, timeout: Timeout = CLIENT_TIMEOUT
    ) -> Iterator[LoadedModel]:
        """Iterates over the model versions the server holds, by name and version, fetching pages lazily (every page
        over one connection: with several, each may reach another replica).

        Args:
            model: Only the versions of this model; ``""`` for all.
            page_size: Versions fetched per call.
            timeout: Seconds allowed for each page's call, instead of the client's timeout; None for no limit.
        """
        stub = next(self._turns)
        seconds = call_timeout(timeout, self.timeout)
        token = ""
        while True:
            request = pb.ListLoadedModelsRequest(
                page_size=_convert.whole_number(page_size, "page_size"), page_token=token, model=model
            )
            with translated():
                page = stub.ListLoadedModels(request, timeout=seconds)
            yield from (_convert.loaded_model(m) for m in page.loaded_models)
            if not (token := page.next_page_token):
                return

    def statistics(self, ref: str | ModelRef | None = None, *, timeout: Timeout = CLIENT_TIMEOUT) -> Statistics:
        """Counters per model version the server has run, and the prediction cache's health.

        Args:
            ref: One version (``"name:3"``), every version of a model (``"name"``), or None for all.
            timeout: Seconds allowed for this call, instead of the client's timeout; None for no limit.
        """
        with translated():
            response = next(self._turns).GetModelStatistics(
                _statistics_request(ref), timeout=call_timeout(timeout, self.timeout)
            )
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
        timeout: Seconds allowed for each call; None for no limit. PredictStream: as for InferenceClient. Each
            method's ``timeout=`` replaces it for that call.
        max_message_bytes: Largest message sent or received; None for the service's defaults, as for
            InferenceClient.
        connections: Connections to open to ``target``, each call taking the next in turn: as for InferenceClient.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = 60.0,
        max_message_bytes: int | None = None,
        connections: int = 1,
    ) -> None:
        super().__init__(INFERENCE, target, channel, max_message_bytes, connections)
        self.timeout = timeout
        """Seconds allowed for each call whose own ``timeout=`` says nothing else; None for no limit."""
        stubs = [inference_pb2_grpc.InferenceServiceStub(channel) for channel in self._channels]
        self._turns = itertools.cycle(stubs)
        self.inference_stub = stubs[0]
        """The generated stub over this client's (first) channel, for calls the client does not wrap."""

    async def predict(
        self,
        ref: str | ModelRef,
        inputs: Arrays,
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        queue_timeout: float | None = None,
        cache: CacheMode | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """See :meth:`InferenceClient.predict`."""
        prediction = await self.predict_full(
            ref, inputs, outputs=outputs, priority=priority, queue_timeout=queue_timeout, cache=cache, timeout=timeout
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
        cache: CacheMode | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> Prediction:
        """See :meth:`InferenceClient.predict_full`."""
        request = _convert.predict_request(
            ref, inputs, outputs=outputs, priority=priority, queue_timeout=queue_timeout, cache=cache
        )
        with self._translated():
            response = await next(self._turns).Predict(request, timeout=call_timeout(timeout, self.timeout))
        return _convert.prediction(response)

    async def predict_stream(
        self,
        ref: str | ModelRef,
        inputs: Arrays,
        *,
        outputs: Sequence[str] | None = None,
        priority: int = 0,
        queue_timeout: float | None = None,
        cache: CacheMode | None = None,
        progress: Progress | None = None,
        verify: bool = True,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> Prediction:
        """See :meth:`InferenceClient.predict_stream`. Progress is called on the event loop."""
        seconds = call_timeout(timeout, self.timeout)
        queue_timeout = _stream_queue_timeout(queue_timeout, seconds)
        request = _convert.predict_stream_request(
            ref, inputs, outputs=outputs, priority=priority, queue_timeout=queue_timeout, cache=cache, verify=verify
        )
        assembler = _convert.StreamAssembler(progress, verify=verify)
        with self._translated():  # a closed client fails here, before the call exists
            call = next(self._turns).PredictStream(request)
        try:
            with self._translated():
                while True:
                    try:
                        message = await asyncio.wait_for(call.read(), seconds)
                    except TimeoutError:
                        raise _stalled(seconds) from None
                    if message is grpc.aio.EOF:
                        break
                    assembler.accept(message)
        except BaseException:
            call.cancel()
            raise
        return assembler.finish()

    async def load(self, ref: str | ModelRef, *, timeout: Timeout = CLIENT_TIMEOUT) -> LoadedModel:
        """See :meth:`InferenceClient.load`."""
        with self._translated():
            response = await next(self._turns).LoadModel(
                pb.LoadModelRequest(ref=_convert.ref_proto(ref)), timeout=call_timeout(timeout, self.timeout)
            )
        return _convert.loaded_model(response.loaded_model)

    async def unload(self, ref: str | ModelRef, *, timeout: Timeout = CLIENT_TIMEOUT) -> list[LoadedModel]:
        """See :meth:`InferenceClient.unload`."""
        with self._translated():
            response = await next(self._turns).UnloadModel(
                pb.UnloadModelRequest(ref=_convert.ref_proto(ref)), timeout=call_timeout(timeout, self.timeout)
            )
        return [_convert.loaded_model(m) for m in response.unloaded_models]

    async def list_loaded(
        self, *, model: str = "", page_size: int = 100, timeout: Timeout = CLIENT_TIMEOUT
    ) -> AsyncIterator[LoadedModel]:
        """See :meth:`InferenceClient.list_loaded`; iterate with ``async for``."""
        stub = next(self._turns)
        seconds = call_timeout(timeout, self.timeout)
        token = ""
        while True:
            request = pb.ListLoadedModelsRequest(
                page_size=_convert.whole_number(page_size, "page_size"), page_token=token, model=model
            )
            with self._translated():
                page = await stub.ListLoadedModels(request, timeout=seconds)
            for m in page.loaded_models:
                yield _convert.loaded_model(m)
            if not (token := page.next_page_token):
                return

    async def statistics(self, ref: str | ModelRef | None = None, *, timeout: Timeout = CLIENT_TIMEOUT) -> Statistics:
        """See :meth:`InferenceClient.statistics`."""
        with self._translated():
            response = await next(self._turns).GetModelStatistics(
                _statistics_request(ref), timeout=call_timeout(timeout, self.timeout)
            )
        return _statistics(response)
