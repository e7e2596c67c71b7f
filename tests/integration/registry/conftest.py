"""Registry test fixtures come from tests/fixtures/servers.py (imported here until tests/conftest.py loads it)."""

from tests.fixtures.servers import registry, registry_replica, registry_settings, registry_stub  # noqa: F401
