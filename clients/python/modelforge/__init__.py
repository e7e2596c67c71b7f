"""ModelForge's Python SDK: clients of the registry, inference and jobs services, model references and errors.

::

    import modelforge

    with modelforge.Client() as mf:                      # the whole suite through one handle
        mf.upload_model("model.onnx", name="fraud", alias="production")
        outputs = mf.predict("fraud@production", {"input": features})

    with modelforge.RegistryClient() as registry:        # or one client per service
        registry.push("model.onnx", name="fraud", alias="production")
    with modelforge.InferenceClient() as inference:
        outputs = inference.predict("fraud@production", {"input": features})

    with modelforge.JobsClient() as jobs:
        outputs = jobs.submit("fraud@production", "items.npz").result()

Each client has an asyncio twin with the same methods (``AsyncRegistryClient``, ``AsyncInferenceClient``,
``AsyncJobsClient``). Addresses default to ``MODELFORGE_REGISTRY_ADDRESS``, ``MODELFORGE_INFERENCE_ADDRESS`` and
``MODELFORGE_JOBS_ADDRESS``, else localhost.
Failed calls raise :class:`ModelForgeError` subclasses (``NotFoundError``...). The generated gRPC modules live
beside this package (``modelforge.registry.v1.registry_pb2``...), and each client exposes its raw stub.
"""

from __future__ import annotations

from modelforge._client import AsyncClient, Client
from modelforge._domain import (
    CacheStatus,
    Dataset,
    JobFailure,
    JobPriority,
    JobProgress,
    JobState,
    JobStatus,
    LoadedModel,
    Model,
    ModelEvent,
    ModelEventType,
    ModelState,
    ModelStatistics,
    ModelVersion,
    OnnxInfo,
    Prediction,
    Signature,
    Statistics,
    TensorSpec,
    Timings,
    VersionState,
)
from modelforge._errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    ClientClosedError,
    DeadlineExceededError,
    FailedPreconditionError,
    IntegrityError,
    InternalError,
    InvalidArgumentError,
    ModelForgeError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from modelforge._inference import AsyncInferenceClient, InferenceClient
from modelforge._jobs import AsyncJob, AsyncJobsClient, Job, JobsClient
from modelforge._refs import ModelRef
from modelforge._registry import AsyncRegistryClient, RegistryClient, UnservedOutputsWarning

__version__ = "0.1.0"

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncInferenceClient",
    "AsyncJob",
    "AsyncJobsClient",
    "AsyncRegistryClient",
    "CacheStatus",
    "CancelledError",
    "Client",
    "ClientClosedError",
    "Dataset",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InferenceClient",
    "IntegrityError",
    "InternalError",
    "InvalidArgumentError",
    "Job",
    "JobFailure",
    "JobPriority",
    "JobProgress",
    "JobState",
    "JobStatus",
    "JobsClient",
    "LoadedModel",
    "Model",
    "ModelEvent",
    "ModelEventType",
    "ModelForgeError",
    "ModelRef",
    "ModelState",
    "ModelStatistics",
    "ModelVersion",
    "NotFoundError",
    "OnnxInfo",
    "PermissionDeniedError",
    "Prediction",
    "RegistryClient",
    "UnservedOutputsWarning",
    "ResourceExhaustedError",
    "Signature",
    "Statistics",
    "TensorSpec",
    "Timings",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "VersionState",
    "__version__",
]
