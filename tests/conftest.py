"""Test-suite wiring: the fixture modules live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.redis",
    "tests.fixtures.onnx_models",
]
