"""The inference service's nouns: signatures, resolved versions, serving configs, predictions, loaded models."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from modelforge._refs import ModelRef

__all__ = [
    "BatchingConfig",
    "CacheConfig",
    "CacheMode",
    "LoadedModel",
    "ModelRef",
    "ModelState",
    "ModelStatistics",
    "ModelSummary",
    "Prediction",
    "RepositoryEntry",
    "ResolvedModel",
    "ServingConfig",
    "SessionConfig",
    "Signature",
    "TensorSpec",
    "Timings",
]

DYNAMIC = -1  # a dimension whose size is chosen per request
BFLOAT16 = "tensor(bfloat16)"  # ONNX Runtime's type string of the one dtype numpy has no name for
# bfloat16 travels as uint16 bit patterns. The request decoders give an input declared bfloat16 (DATA_TYPE_BFLOAT16,
# V2 BF16) this dtype: equal to uint16 in every comparison, it tells a uint16 input to refuse the array.
BFLOAT16_BITS = np.dtype("<u2", metadata={"modelforge.declared": "bfloat16"})


def declared_bfloat16(array: np.ndarray[Any, Any]) -> bool:
    """Whether a request declared this array bfloat16 (its dtype is BFLOAT16_BITS)."""
    metadata = array.dtype.metadata
    return metadata is not None and metadata.get("modelforge.declared") == "bfloat16"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """The declared type and shape of one model input or output.

    dtype is the numpy dtype that holds the elements (np.dtype(object) for strings, uint16 bit patterns for
    bfloat16); ort_type is ONNX Runtime's type string ("tensor(float)"), which tells bfloat16 from uint16.
    shape uses DYNAMIC (-1) for free dimensions.
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    dim_names: tuple[str, ...] = ()
    ort_type: str = ""

    @property
    def is_string(self) -> bool:
        return self.dtype == np.dtype(object)

    @property
    def batchable(self) -> bool:
        """True when the leading dimension is dynamic, so that requests can be stacked along it."""
        return len(self.shape) >= 1 and self.shape[0] == DYNAMIC


@dataclass(frozen=True, slots=True)
class Signature:
    """The inputs and outputs of an ONNX graph, in graph order.

    outputs holds the tensor outputs only, the ones ModelForge serves. non_tensor_outputs names the graph's other
    outputs (sequences or maps, such as the ZipMap of a scikit-learn classifier converted by skl2onnx, or tensors of
    an element type ModelForge lacks): they are never computed, and a request naming one is refused.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    non_tensor_outputs: tuple[str, ...] = ()
    non_tensor_inputs: tuple[str, ...] = ()  # inputs no request can feed: such a model cannot be served
    # The dynamic dimensions that several inputs name alike, each as its name and (input index, axis) places: ONNX
    # means one size by one name, so a request's sizes there must agree.
    shared_dims: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = field(init=False, repr=False, compare=False)
    # True when requests can be stacked along the leading dimension and the outputs split back along it: the model
    # has inputs, every input and output has a dynamic leading dimension, the graph gives those dimensions no two
    # different names, and it gives their name to no other dimension. A leading dimension named otherwise than the
    # inputs' (NonZero's count of hits, detections per image) does not hold one row per input row; one whose name
    # recurs further in (x @ x.T: [batch, batch]) grows with the merged rows, so each row would mix requests. Such a
    # model is run request by request; an unnamed leading dimension is taken to follow the inputs. Worked out once:
    # requests read it.
    batchable: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        specs = (*self.inputs, *self.outputs)
        leads = {spec.dim_names[0] for spec in specs if spec.dim_names and spec.dim_names[0]}
        inner = {name for spec in specs for name in spec.dim_names[1:] if name}
        batchable = (
            bool(self.inputs) and all(spec.batchable for spec in specs) and len(leads) <= 1 and not leads & inner
        )
        object.__setattr__(self, "batchable", batchable)
        places: dict[str, list[tuple[int, int]]] = {}
        for index, spec in enumerate(self.inputs):
            for axis, (size, name) in enumerate(zip(spec.shape, spec.dim_names, strict=False)):
                if size == DYNAMIC and name:
                    places.setdefault(name, []).append((index, axis))
        shared = tuple((name, tuple(where)) for name, where in places.items() if len(where) > 1)
        object.__setattr__(self, "shared_dims", shared)

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.outputs if spec.name == name), None)


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """One model version as the registry describes it, the target of a resolved ModelRef."""

    name: str
    version: int
    sha256: str
    size_bytes: int
    signature: Signature
    labels: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    archived: bool = False  # retired in the registry: unloaded when archived, served again when asked for by number

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """Dynamic batching of one model version. max_batch_size 0 turns batching off."""

    max_batch_size: int = 0
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    priority_levels: int = 1  # request priority 1 is the most urgent; 0 (the default) means the least urgent level
    max_queue_size: int = 1024
    default_queue_timeout: float | None = None  # seconds a request may wait in the queue; None: no limit


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The Redis prediction cache of one model version; off by default."""

    enabled: bool = False
    ttl_seconds: int = 300
    max_entry_bytes: int = 1 << 20


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """ONNX Runtime session options. 0 threads means ONNX Runtime's own default."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"  # disabled | basic | extended | all
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # ONNX Runtime's pool threads busy-wait for work between runs unless told not to; on a shared host that
    # spinning costs more CPU per request than a small model's run (docs/PERFORMANCE.md, thread settings).
    allow_spinning: bool = False
    # ONNX Runtime keeps the memory of its largest runs in an arena for the next ones; without it, what a run
    # allocates is freed when it ends: memory stays near the model's own, at some cost per run.
    memory_arena: bool = True


@dataclass(frozen=True, slots=True)
class ServingConfig:
    """How one model version is served: server-wide defaults overridden by the version's labels."""

    batching: BatchingConfig = BatchingConfig()
    cache: CacheConfig = CacheConfig()
    session: SessionConfig = SessionConfig()


class CacheMode(enum.Enum):
    """What a prediction does with the cache: use it, ignore it, or recompute and overwrite the entry."""

    USE = "use"
    BYPASS = "bypass"
    REFRESH = "refresh"


@dataclass(slots=True)
class Timings:
    """Where a request's time went, in seconds."""

    queue: float = 0.0
    compute: float = 0.0
    total: float = 0.0


@dataclass(slots=True)
class Prediction:
    """The outputs of one request, with the version that produced them."""

    outputs: dict[str, np.ndarray]
    model: str
    version: int
    sha256: str
    timings: Timings
    cache_hit: bool = False
    signature: Signature | None = None  # of the version that answered: tells bfloat16 outputs from uint16 ones
    placed: frozenset[str] = frozenset()  # outputs already in the memory the caller gave for them (`into`)
    # The elements of string outputs as the answer carries them, where the engine encoded them already (a streamed
    # answer's elements are checked against the message size): the stream sends these rather than encode again.
    encoded: Mapping[str, list[bytes]] = field(default_factory=dict)

    def is_bfloat16(self, name: str) -> bool:
        """True when output `name` holds bfloat16 bit patterns (its array is uint16)."""
        spec = self.signature.output(name) if self.signature is not None else None
        return spec is not None and spec.ort_type == BFLOAT16


class ModelState(enum.Enum):
    """Where a loaded model version is in its lifecycle."""

    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A snapshot of one model version held (or being loaded) by the engine."""

    name: str
    version: int
    sha256: str
    state: ModelState
    reason: str = ""  # why it FAILED
    memory_bytes: int = 0  # estimate
    last_use: datetime | None = None
    in_flight: int = 0
    load_seconds: float = 0.0
    queued: int = 0  # requests waiting in its queue
    execution_providers: tuple[str, ...] = ()  # what its session runs on, in order; empty until loaded


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """A model as the registry lists it."""

    name: str
    latest_version: int = 0  # the newest READY version; 0 when it has none


@dataclass(frozen=True, slots=True)
class RepositoryEntry:
    """One line of the model repository's index: a version held by the engine, or a registry model it does not
    hold (state None; version is then the model's newest READY version, None when it has none)."""

    name: str
    version: int | None
    state: ModelState | None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    """Counters of one model version since it was first used."""

    name: str
    version: int
    requests: int = 0  # answered
    failures: int = 0  # answered with an error
    cancelled: int = 0  # never answered: the caller went away, or its deadline passed
    inferences: int = 0  # items: a request's rows, or one for a model without a batch dimension
    executions: int = 0  # session runs; fewer than inferences when batching merges requests
    queue_seconds: float = 0.0  # sums over successful requests
    compute_seconds: float = 0.0
    total_seconds: float = 0.0
    failure_seconds: float = 0.0  # sums over failed requests, from their start to their error
    cache_hits: int = 0
    cache_misses: int = 0
    batch_sizes: Mapping[int, int] = field(default_factory=dict)  # items per execution -> executions
    batch_seconds: Mapping[int, float] = field(default_factory=dict)  # items per execution -> their compute time
    last_inference: datetime | None = None
