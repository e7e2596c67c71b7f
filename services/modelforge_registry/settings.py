"""The registry's settings: MODELFORGE_* variables on top of the common server settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from modelforge_server import ports
from modelforge_server.settings import AT_LEAST_ONE, PORT, Bound, MiB, ServerSettings


@dataclass(frozen=True)
class RegistrySettings(ServerSettings):
    """Settings of the registry process."""

    port: int = ports.REGISTRY_PORT
    # /metrics over HTTP on host:metrics_port (MODELFORGE_METRICS_PORT); 0 serves none.
    metrics_port: int = ports.REGISTRY_METRICS_PORT
    # Uploads are refused (RESOURCE_EXHAUSTED) as soon as the bytes received pass this.
    max_model_bytes: int = 2048 * MiB
    # Uploads are refused (INVALID_ONNX) when ONNX Runtime cannot build a session of the model on the CPU, as every
    # inference replica would then fail to load it; false accepts models meant for another runtime, or for custom
    # operators or execution providers that this host's ONNX Runtime lacks.
    runtime_check: bool = True
    # Where model files live, content-addressed; defaults to data_dir/blobs.
    blob_dir: Path | None = None

    bounds: ClassVar[Mapping[str, Bound]] = {
        **ServerSettings.bounds,
        "metrics_port": PORT,
        "max_model_bytes": AT_LEAST_ONE,
    }

    @property
    def blob_root(self) -> Path:
        return self.blob_dir if self.blob_dir is not None else self.data_dir / "blobs"
