"""Client and AsyncClient: one handle on the whole suite, over the three per-service clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType
from typing import Any, Self

import numpy as np

from modelforge._domain import Model, ModelVersion
from modelforge._inference import AsyncInferenceClient, InferenceClient
from modelforge._jobs import AsyncJob, AsyncJobsClient, Job, JobsClient
from modelforge._refs import ModelRef
from modelforge._registry import AsyncRegistryClient, RegistryClient


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
    """

    def __init__(self, *, registry: str | None = None, inference: str | None = None, jobs: str | None = None):
        self.registry = RegistryClient(registry)
        self.inference = InferenceClient(inference)
        self.jobs = JobsClient(jobs)

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
        self, model: str | ModelRef, inputs: Mapping[str, Any], **options: Any
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Runs a model and returns its outputs; see :meth:`InferenceClient.predict`."""
        return self.inference.predict(model, inputs, **options)

    def submit_job(self, model: str | ModelRef, inputs: Any = None, **options: Any) -> Job:
        """Submits a batch job and returns its handle; see :meth:`JobsClient.submit`."""
        return self.jobs.submit(model, inputs, **options)


class AsyncClient:
    """The asyncio twin of :class:`Client`, over the async per-service clients.

    Args:
        registry: ``host:port`` of the registry; defaults to ``MODELFORGE_REGISTRY_ADDRESS``, else localhost.
        inference: ``host:port`` of the inference service; defaults to ``MODELFORGE_INFERENCE_ADDRESS``.
        jobs: ``host:port`` of the jobs service; defaults to ``MODELFORGE_JOBS_ADDRESS``.
    """

    def __init__(self, *, registry: str | None = None, inference: str | None = None, jobs: str | None = None):
        self.registry = AsyncRegistryClient(registry)
        self.inference = AsyncInferenceClient(inference)
        self.jobs = AsyncJobsClient(jobs)

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
        self, model: str | ModelRef, inputs: Mapping[str, Any], **options: Any
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Runs a model and returns its outputs; see :meth:`AsyncInferenceClient.predict`."""
        return await self.inference.predict(model, inputs, **options)

    async def submit_job(self, model: str | ModelRef, inputs: Any = None, **options: Any) -> AsyncJob:
        """Submits a batch job and returns its handle; see :meth:`AsyncJobsClient.submit`."""
        return await self.jobs.submit(model, inputs, **options)
