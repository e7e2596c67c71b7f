from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from modelforge_server.settings import ServerSettings, SettingsError, from_env


@dataclass(frozen=True)
class ExampleSettings(ServerSettings):
    port: int = 50099
    max_model_bytes: int = 1024
    cache_enabled: bool = False
    ratio: float = 0.5


def test_defaults_apply_when_nothing_is_set() -> None:
    settings = from_env(ExampleSettings, {})
    assert settings.port == 50099
    assert settings.database_url is None
    assert settings.data_dir == Path(".modelforge")


def test_values_are_cast_by_annotation() -> None:
    settings = from_env(
        ExampleSettings,
        {
            "MODELFORGE_PORT": "6000",
            "MODELFORGE_MAX_MODEL_BYTES": "2MiB",
            "MODELFORGE_CACHE_ENABLED": "yes",
            "MODELFORGE_RATIO": "0.25",
            "MODELFORGE_DATABASE_URL": "postgresql://db/x",
            "MODELFORGE_DATA_DIR": "/srv/mf",
            "MODELFORGE_LABELS": "team=vision, tier=gold",
        },
    )
    assert settings.port == 6000
    assert settings.max_model_bytes == 2 * 1024 * 1024
    assert settings.cache_enabled is True
    assert settings.ratio == 0.25
    assert settings.database_url == "postgresql://db/x"
    assert settings.data_dir == Path("/srv/mf")
    assert settings.labels == {"team": "vision", "tier": "gold"}
    assert settings.address == "127.0.0.1:6000"


def test_empty_optional_means_none() -> None:
    assert from_env(ExampleSettings, {"MODELFORGE_REDIS_URL": ""}).redis_url is None


def test_overrides_win_over_the_environment() -> None:
    assert from_env(ExampleSettings, {"MODELFORGE_PORT": "1"}, port=2).port == 2


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("MODELFORGE_PORT", "fifty"),
        ("MODELFORGE_CACHE_ENABLED", "maybe"),
        ("MODELFORGE_RATIO", "half"),
        ("MODELFORGE_LABELS", "novalue"),
    ],
)
def test_a_bad_value_names_the_variable(key: str, value: str) -> None:
    with pytest.raises(SettingsError, match=key):
        from_env(ExampleSettings, {key: value})
