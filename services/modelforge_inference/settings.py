"""The inference service's settings, from MODELFORGE_* variables; the server-wide serving defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from modelforge_server import ports
from modelforge_server.settings import AT_LEAST_ONE, NOT_NEGATIVE, PORT, POSITIVE, Bound, MiB, ServerSettings

GiB = 1024 * MiB


@dataclass(frozen=True)
class InferenceSettings(ServerSettings):
    """Everything the inference process reads at start. Per-version labels override the serving defaults."""

    port: int = ports.INFERENCE_PORT
    # Prometheus /metrics over HTTP (MODELFORGE_METRICS_PORT); 0 turns the endpoint off.
    metrics_port: int = ports.INFERENCE_METRICS_PORT
    # Where the registry listens; resolution, downloads and model events come from it.
    registry_address: str = f"127.0.0.1:{ports.REGISTRY_PORT}"
    # How often health checks probe the registry and Redis, in seconds.
    health_check_seconds: float = 2.0
    # Loaded sessions: at most this many model versions, and an estimated memory budget across them.
    max_loaded_models: int = 8
    memory_budget_bytes: int = 8 * GiB
    # Requests whose inputs add up to more bytes are refused with INVALID_ARGUMENT.
    max_request_bytes: int = 64 * MiB
    # Requests of one V2 ModelStreamInfer stream running or waiting to be sent at once; past it the stream reads
    # no more until answers leave, and HTTP/2 flow control holds the client back.
    stream_max_in_flight: int = 256
    # Take V2 clients' system shared memory regions (SystemSharedMemoryRegister). Off by default: a client that
    # registers a key may read and write any shared memory object this server's user can open.
    allow_client_shm: bool = False
    # The local cache of model files, keyed by sha256; None means data_dir/models.
    model_dir: Path | None = None
    model_cache_bytes: int = 20 * GiB
    # Threads running ONNX Runtime (session.run releases the GIL); 0 means one per CPU core.
    compute_threads: int = 0
    # Run every model once on zeros before it counts as READY.
    warmup: bool = True
    # After ONNX Runtime fails to build a version, predictions fail at once with its reason for this many seconds
    # before one tries the load again; LoadModel always tries again. 0 tries again on every request.
    load_retry_seconds: float = 30.0
    # Session options, server-wide.
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # Dynamic batching defaults. max_batch_size 0 turns batching off.
    max_batch_size: int = 0
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[str, ...] = ()
    priority_levels: int = 1
    max_queue_size: int = 1024
    default_queue_timeout: float | None = None
    # Prediction cache defaults; a version turns it on with the label modelforge.io/cache=true.
    cache_enabled: bool = False
    cache_ttl_seconds: int = 300
    cache_max_entry_bytes: int = 1 * MiB
    # The in-process tier in front of Redis: the most recent entries, in bytes; 0 turns it off.
    cache_local_bytes: int = 64 * MiB

    # The settings that a version's labels override are checked by the labels' parsers (serving.defaults).
    bounds: ClassVar[Mapping[str, Bound]] = {
        **ServerSettings.bounds,
        "metrics_port": PORT,
        "health_check_seconds": POSITIVE,
        "max_loaded_models": AT_LEAST_ONE,
        "memory_budget_bytes": AT_LEAST_ONE,
        "max_request_bytes": AT_LEAST_ONE,
        "stream_max_in_flight": AT_LEAST_ONE,
        "model_cache_bytes": AT_LEAST_ONE,
        "compute_threads": NOT_NEGATIVE,
        "load_retry_seconds": NOT_NEGATIVE,
        "cache_local_bytes": NOT_NEGATIVE,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        # The serving defaults take what the labels that override them take; checked here, with the labels'
        # parsers, so that a bad value stops the process (or `modelforge up`) at start. Imported here: serving
        # reads these settings.
        from modelforge_inference import serving

        serving.defaults(self)

    @property
    def model_directory(self) -> Path:
        return self.model_dir if self.model_dir is not None else self.data_dir / "models"
