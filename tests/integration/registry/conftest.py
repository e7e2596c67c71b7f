"""Fixtures of the registry tests: servers from tests/fixtures/servers.py and ONNX files from onnx_models.py."""

from tests.fixtures.onnx_models import (  # noqa: F401
    add_one,
    external_data_escape,
    external_data_model,
    mlp,
    multi_io,
    not_onnx,
    onnx_dir,
    truncated_onnx,
)
from tests.fixtures.servers import registry, registry_replica, registry_settings, registry_stub  # noqa: F401
