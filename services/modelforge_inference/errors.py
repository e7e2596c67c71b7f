"""The inference service's specific errors, each a kind from modelforge_server.errors with a stable reason."""

from __future__ import annotations

from modelforge_server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unimplemented,
)


class InvalidInput(InvalidArgument):
    reason = "INVALID_INPUT"

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"input {name!r}: {problem}", field=f"inputs[{name}]", input=name)


class UnknownOutput(InvalidArgument):
    reason = "UNKNOWN_OUTPUT"

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"the model has no output {name!r}; its outputs are {', '.join(map(repr, known))}",
            field="output_names",
            output=name,
        )


class NonTensorOutput(InvalidArgument):
    """A request names a graph output that is not a tensor; ModelForge serves tensor outputs only.

    Its reason is UNKNOWN_OUTPUT's: to a client it is an output this server does not have; the message says why.
    """

    reason = UnknownOutput.reason

    def __init__(self, name: str, served: list[str]) -> None:
        instead = (
            f"ask for its tensor outputs instead: {', '.join(map(repr, served))}"
            if served
            else "the model has no tensor output, so it cannot be served"
        )
        super().__init__(
            f"output {name!r} is a sequence or map (or a tensor of an element type ModelForge lacks), which "
            f"ModelForge does not serve; {instead} (a scikit-learn classifier converted by skl2onnx with "
            "options={'zipmap': False} gives its probabilities as a tensor)",
            field="output_names",
            output=name,
        )


class RequestTooLarge(InvalidArgument):
    reason = "REQUEST_TOO_LARGE"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the inputs add up to {size} bytes, more than this server's limit of {limit} "
            "(MODELFORGE_MAX_REQUEST_BYTES); split the request into smaller batches",
            field="inputs",
            size=str(size),
            limit=str(limit),
        )


class InvalidPriority(InvalidArgument):
    reason = "INVALID_PRIORITY"

    def __init__(self, priority: int) -> None:
        super().__init__(f"priority must be 0 or more, got {priority}", field="priority")


class InvalidTimeout(InvalidArgument):
    reason = "INVALID_TIMEOUT"

    def __init__(self, timeout: float) -> None:
        super().__init__(f"timeout must not be negative, got {timeout} s", field="timeout")


class ModelRunFailed(InvalidArgument):
    """ONNX Runtime refused inputs that passed the signature checks (values or shapes the graph cannot take).

    unproven: the version has not completed a run on any input since it loaded (its warmup failed or was off),
    so the message says that the model itself may be at fault."""

    reason = "MODEL_RUN_FAILED"

    def __init__(self, model: str, version: int, detail: str, *, unproven: bool = False) -> None:
        hint = (
            "; this version has completed no run on any input since it loaded, its warmup included: if no input "
            "runs, the model itself is at fault"
            if unproven
            else ""
        )
        super().__init__(
            f"{model}:{version} could not run on these inputs: {detail}{hint}", model=model, version=str(version)
        )


class ModelRunOutOfMemory(ResourceExhausted):
    """ONNX Runtime could not allocate what a run needed (inputs that ask for too much, or a server short of memory)."""

    reason = "MODEL_RUN_OUT_OF_MEMORY"

    def __init__(self, model: str, version: int, detail: str) -> None:
        super().__init__(
            f"{model}:{version} ran out of memory on these inputs ({detail}); send fewer or smaller items per "
            "request, or retry later",
            model=model,
            version=str(version),
        )


class AnswerTooLarge(ResourceExhausted):
    """The outputs of a run are too large for one answer message; they can be streamed instead."""

    reason = "RESPONSE_TOO_LARGE"

    def __init__(self, model: str, version: int, size: int, limit: int, *, declared: bool = False) -> None:
        come = (
            f"would come to at least {size} bytes as its signature declares them"
            if declared
            else f"come to {size} bytes"
        )
        super().__init__(
            f"the outputs of {model}:{version} {come}, more than the {limit} one answer may carry "
            "(MODELFORGE_MAX_MESSAGE_BYTES); stream them with PredictStream (`modelforge predict --stream`, "
            "InferenceClient.predict_stream), have V2 write them to system shared memory, ask for fewer outputs or "
            "fewer items per request, or raise MODELFORGE_MAX_MESSAGE_BYTES on the server and the client",
            model=model,
            version=str(version),
            size=str(size),
            limit=str(limit),
        )


class ElementTooLarge(ResourceExhausted):
    """A string element of an output is too large for one message: a stream sends each element whole."""

    reason = "RESPONSE_TOO_LARGE"

    def __init__(self, model: str, version: int, output: str, size: int, limit: int) -> None:
        super().__init__(
            f"output {output!r} of {model}:{version} holds a string element of {size} bytes, more than the {limit} "
            "one streamed message may carry beside its framing (MODELFORGE_MAX_MESSAGE_BYTES): raise "
            "MODELFORGE_MAX_MESSAGE_BYTES on the server and the client",
            model=model,
            version=str(version),
            output=output,
            size=str(size),
            limit=str(limit),
        )


class ModelOverMemoryBudget(ResourceExhausted):
    """A version whose file alone is larger than the memory budget of loaded versions: no eviction makes room."""

    reason = "MODEL_OVER_MEMORY_BUDGET"

    def __init__(self, model: str, version: int, size: int, budget: int) -> None:
        super().__init__(
            f"{model}:{version} is {size} bytes, more than the memory budget of all loaded versions ({budget} bytes, "
            "MODELFORGE_MEMORY_BUDGET_BYTES); raise that budget to serve it",
            model=model,
            version=str(version),
        )


class QueueFull(ResourceExhausted):
    reason = "QUEUE_FULL"

    def __init__(self, model: str, version: int, size: int) -> None:
        super().__init__(
            f"the queue of {model}:{version} is full ({size} requests waiting); retry with backoff",
            model=model,
            version=str(version),
        )


class QueueTimeout(DeadlineExceeded):
    reason = "QUEUE_TIMEOUT"

    def __init__(self, model: str, version: int, waited: float, batch_delay_us: int = 0) -> None:
        batching = (
            f"; a request may wait up to {batch_delay_us} µs for others to share its batch "
            "(the label modelforge.io/max-queue-delay-us)"
            if batch_delay_us
            else ""
        )
        super().__init__(
            f"the request waited {waited * 1000:.1f} ms in the queue of {model}:{version} and its deadline "
            "passed before it could run; lower the load, or give the request a longer deadline or timeout (which "
            "MODELFORGE_DEFAULT_QUEUE_TIMEOUT and the label modelforge.io/queue-timeout-seconds bound, where set)"
            f"{batching}",
            model=model,
            version=str(version),
        )


class ModelNotLoaded(NotFound):
    reason = "MODEL_NOT_LOADED"

    def __init__(self, ref: str) -> None:
        super().__init__(
            f"{ref} is not loaded on this server; ListLoadedModels (`modelforge models loaded`) shows what is",
            model=ref,
        )


class ModelLoadFailed(FailedPrecondition):
    reason = "MODEL_LOAD_FAILED"

    def __init__(self, model: str, version: int, detail: str) -> None:
        super().__init__(f"{model}:{version} could not be loaded: {detail}", model=model, version=str(version))


class InvalidServingConfig(FailedPrecondition):
    reason = "INVALID_SERVING_CONFIG"

    def __init__(self, model: str, version: int, label: str, value: str, expected: str) -> None:
        super().__init__(
            f"{model}:{version} has label {label}={value!r}, but it takes {expected}; fix the label with "
            "UpdateModelVersion (the SDK's RegistryClient.update_version) or push a new version",
            model=model,
            version=str(version),
            label=label,
        )


class ModelUnloading(FailedPrecondition):
    reason = "MODEL_UNLOADING"

    def __init__(self, model: str, version: int) -> None:
        super().__init__(f"{model}:{version} is being unloaded; retry", model=model, version=str(version))


class LoadTimeout(DeadlineExceeded):
    reason = "LOAD_TIMEOUT"

    def __init__(self, model: str, version: int) -> None:
        super().__init__(
            f"the deadline passed while {model}:{version} was loading; it keeps loading, so retry shortly",
            model=model,
            version=str(version),
        )


class SharedMemoryOff(FailedPrecondition):
    reason = "SHARED_MEMORY_OFF"

    def __init__(self) -> None:
        super().__init__(
            "this server does not take client shared memory; start the inference service with "
            "MODELFORGE_ALLOW_CLIENT_SHM=true, or send the tensors in the request"
        )


class CudaSharedMemoryUnsupported(Unimplemented):
    reason = "CUDA_SHARED_MEMORY_UNSUPPORTED"

    def __init__(self) -> None:
        super().__init__(
            "this server does not take CUDA shared memory; use system shared memory (V2 SystemSharedMemoryRegister, "
            "with the service started with MODELFORGE_ALLOW_CLIENT_SHM=true) or send the tensors in the request"
        )


class TraceSettingsUnsupported(Unimplemented):
    reason = "TRACE_SETTINGS_UNSUPPORTED"

    def __init__(self) -> None:
        super().__init__(
            "trace settings are not set over the protocol: the inference service traces with OpenTelemetry, "
            "exporting to MODELFORGE_OTLP_ENDPOINT when it is set at start"
        )


class LogSettingsUnsupported(Unimplemented):
    reason = "LOG_SETTINGS_UNSUPPORTED"

    def __init__(self) -> None:
        super().__init__(
            "log settings are not set over the protocol: start the inference service with MODELFORGE_LOG_LEVEL "
            "(DEBUG, INFO, WARNING or ERROR)"
        )


class SharedMemoryRegionExists(AlreadyExists):
    reason = "SHARED_MEMORY_REGION_EXISTS"

    def __init__(self, name: str, key: str) -> None:
        super().__init__(
            f"shared memory region {name!r} is registered already (key {key!r}); unregister it first or pick "
            "another name",
            region=name,
        )


class SharedMemoryRegionsFull(ResourceExhausted):
    reason = "SHARED_MEMORY_REGIONS_FULL"

    def __init__(self, name: str, why: str) -> None:
        super().__init__(
            f"region {name!r} cannot be registered: {why}; unregister the regions no longer in use "
            "(SystemSharedMemoryUnregister)",
            region=name,
        )


class SharedMemoryRegionNotFound(NotFound):
    reason = "SHARED_MEMORY_REGION_NOT_FOUND"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"no shared memory region {name!r} is registered; register it with SystemSharedMemoryRegister first",
            region=name,
        )


class SharedMemoryKeyNotFound(NotFound):
    reason = "SHARED_MEMORY_KEY_NOT_FOUND"

    def __init__(self, name: str, key: str) -> None:
        super().__init__(
            f"region {name!r}: no shared memory object {key!r} exists on the server's host; create it "
            "(shm_open) on the same machine as the server before registering it",
            region=name,
            key=key,
        )


class InvalidSharedMemoryRegion(InvalidArgument):
    reason = "INVALID_SHARED_MEMORY_REGION"

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"shared memory region {name!r}: {problem}", region=name)
