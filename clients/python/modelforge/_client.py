"""Client and AsyncClient: one handle on the whole suite, over the three per-service clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType
from typing import Any, Self

import numpy as np

from modelforge._channel import CLIENT_TIMEOUT, Timeout
from modelforge._domain import Model, ModelVersion
from modelforge._inference import AsyncInferenceClient, InferenceClient
from modelforge._jobs import AsyncJob, AsyncJobsClient, Job, JobsClient
from modelforge._refs import ModelRef
from modelforge._registry import AsyncRegistryClient, RegistryClient


def _options(timeout: Timeout, max_message_bytes: int | None) -> dict[str, Any]:
    """The options each per-service client is made with: the timeout only where one was given, since their
    defaults differ."""
    options: dict[str, Any] = {"max_message_bytes": max_message_bytes}
    if timeout is not CLIENT_TIMEOUT:
        options["timeout"] = timeout
    return options


class Client:
    """A blocking handle on the registry, inference and jobs services.

    The per-service clients are its attributes (``registry``, ``inference``, ``jobs``); the shortcuts cover the
    common path::

        with modelforge.Client() as mf:
            mf.upload_model("model.onnx", name="fraud", alias="production")
            outputs = mf.predict("fraud@production", {"input": features})
            job = mf.submit_job("fraud@production", "items.npz")

    Args:
        registry: ``host:port`` of the registry; defaults to ``MODELFORGE_REGISTRY_ADDRESS``, else localhost.
        inference: ``host:port`` of the inference service; defaults to ``MODELFORGE_INFERENCE_ADDRESS``.
        jobs: ``host:port`` of the jobs service; defaults to ``MODELFORGE_JOBS_ADDRESS``.
        timeout: Seconds allowed for each call of the three clients (None for no limit); by default each keeps
            its own (30 s for the registry and jobs clients, 60 s for the inference client). Each method's
            ``timeout=`` replaces it for that call.
        max_message_bytes: Largest message the three clients send or receive; None for each one's default (see
            :class:`InferenceClient`).
    """

    def __init__(
        self,
        *,
        registry: str | None = None,
        inference: str | None = None,
        jobs: str | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
        max_message_bytes: int | None = None,
    ):
        options = _options(timeout, max_message_bytes)
        self.registry = RegistryClient(registry, **options)
        self.inference = InferenceClient(inference, **options)
        self.jobs = JobsClient(jobs, **options)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the three channels."""
        self.registry.close()
        self.inference.close()
        self.jobs.close()

    def upload_model(self, source: Any, *, name: str, **options: Any) -> ModelVersion:
        """Uploads an ONNX file as the model's next version; see :meth:`RegistryClient.push`."""
        return self.registry.push(source, name=name, **options)

    def list_models(self, **options: Any) -> Iterator[Model]:
        """Iterates over the registry's models, page by page; see :meth:`RegistryClient.list_models`."""
        return self.registry.list_models(**options)

    def predict(
        self, ref: str | ModelRef, inputs: Mapping[str, Any], **options: Any
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Runs a model and returns its outputs; see :meth:`InferenceClient.predict`."""
        return self.inference.predict(ref, inputs, **options)

    def submit_job(self, ref: str | ModelRef, inputs: Any = None, **options: Any) -> Job:
        """Submits a batch job and returns its handle; see :meth:`JobsClient.submit`."""
        return self.jobs.submit(ref, inputs, **options)


class AsyncClient:
    """The asyncio twin of :class:`Client`, over the async per-service clients.

    Args:
        registry, inference, jobs, timeout, max_message_bytes: As for :class:`Client`.
    """

    def __init__(
        self,
        *,
        registry: str | None = None,
        inference: str | None = None,
        jobs: str | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
        max_message_bytes: int | None = None,
    ):
        options = _options(timeout, max_message_bytes)
        self.registry = AsyncRegistryClient(registry, **options)
        self.inference = AsyncInferenceClient(inference, **options)
        self.jobs = AsyncJobsClient(jobs, **options)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the three channels."""
        await self.registry.close()
        await self.inference.close()
        await self.jobs.close()

    async def upload_model(self, source: Any, *, name: str, **options: Any) -> ModelVersion:
        """Uploads an ONNX file as the model's next version; see :meth:`AsyncRegistryClient.push`."""
        return await self.registry.push(source, name=name, **options)

    async def list_models(self, **options: Any) -> AsyncIterator[Model]:
        """Iterates over the registry's models, page by page; see :meth:`AsyncRegistryClient.list_models`."""
        async for model in self.registry.list_models(**options):
            yield model

    async def predict(
        self, ref: str | ModelRef, inputs: Mapping[str, Any], **options: Any
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Runs a model and returns its outputs; see :meth:`AsyncInferenceClient.predict`."""
        return await self.inference.predict(ref, inputs, **options)

    async def submit_job(self, ref: str | ModelRef, inputs: Any = None, **options: Any) -> AsyncJob:
        """Submits a batch job and returns its handle; see :meth:`AsyncJobsClient.submit`."""
        return await self.jobs.submit(ref, inputs, **options)
