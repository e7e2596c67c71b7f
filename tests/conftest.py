"""Test-suite wiring: the fixture modules live in tests/fixtures/."""

import os

# The tests start subprocesses (pgserver's pg_ctl, `modelforge up`, workers) from a process whose gRPC threads
# are busy; gRPC's fork handlers are for children that keep using gRPC without exec, which ours never do.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.redis",
    "tests.fixtures.onnx_models",
    "tests.fixtures.servers",
    "tests.fixtures.ports",
]
