from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelforge_inference import serving
from modelforge_inference.settings import InferenceSettings
from modelforge_jobs.settings import JobsSettings
from modelforge_registry.settings import RegistrySettings
from modelforge_server.settings import ServerSettings, SettingsError, from_env
from modelforge_server.telemetry import TelemetrySettings, read_settings


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


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("MODELFORGE_CHUNK_BYTES", "1.5MiB"),
        ("MODELFORGE_MAX_MODEL_BYTES", "x_1MiB"),
        ("MODELFORGE_MAX_MODEL_BYTES", "MiB"),
        ("MODELFORGE_PORT", "fifty"),
    ],
)
def test_a_malformed_integer_is_echoed_as_given_with_what_it_takes(key: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        from_env(ExampleSettings, {key: value})
    assert str(caught.value) == (
        f"{key}={value!r} is invalid: it takes an integer, optionally ending in KiB, MiB, GiB, K, M or G"
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("MODELFORGE_PORT", "70000", "MODELFORGE_PORT=70000 is invalid: it takes a number from 0 to 65535"),
        ("MODELFORGE_CHUNK_BYTES", "0", "MODELFORGE_CHUNK_BYTES=0 is invalid: it takes a number >= 1"),
        ("MODELFORGE_CHUNK_BYTES", "-5", "MODELFORGE_CHUNK_BYTES=-5 is invalid: it takes a number >= 1"),
        ("MODELFORGE_GRACE_SECONDS", "-1", "MODELFORGE_GRACE_SECONDS=-1.0 is invalid: it takes a number >= 0"),
        (
            "MODELFORGE_LOG_LEVEL",
            "chatty",
            "MODELFORGE_LOG_LEVEL='CHATTY' is invalid: it takes DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        ("MODELFORGE_EVENT_LOOP", "fast", "MODELFORGE_EVENT_LOOP='fast' is invalid: it takes auto, uvloop, asyncio"),
    ],
)
def test_a_value_out_of_range_names_the_variable_and_the_range(key: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        from_env(ExampleSettings, {key: value})
    assert str(caught.value) == message


def test_a_chunk_must_fit_in_one_message() -> None:
    fits = from_env(ExampleSettings, {"MODELFORGE_MAX_MESSAGE_BYTES": "1MiB", "MODELFORGE_CHUNK_BYTES": "1020KiB"})
    assert fits.chunk_bytes == 1020 * 1024

    with pytest.raises(SettingsError) as caught:
        from_env(ExampleSettings, {"MODELFORGE_MAX_MESSAGE_BYTES": "1MiB"})  # the default chunk is 1 MiB too
    assert "MODELFORGE_CHUNK_BYTES=1048576 is invalid" in str(caught.value)
    assert f"set it to at most {1024 * 1024 - 4096}, or raise MODELFORGE_MAX_MESSAGE_BYTES" in str(caught.value)


def test_settings_made_in_code_are_checked_too() -> None:
    with pytest.raises(SettingsError, match="MODELFORGE_CHUNK_BYTES=0 is invalid"):
        ExampleSettings(chunk_bytes=0)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MODELFORGE_MAX_LOADED_MODELS": "0"}, "MODELFORGE_MAX_LOADED_MODELS=0 is invalid: it takes a number >= 1"),
        ({"MODELFORGE_STREAM_MAX_IN_FLIGHT": "0"}, "MODELFORGE_STREAM_MAX_IN_FLIGHT=0 is invalid"),
        (
            {"MODELFORGE_HEALTH_CHECK_SECONDS": "0"},
            "MODELFORGE_HEALTH_CHECK_SECONDS=0.0 is invalid: it takes a number > 0",
        ),
    ],
)
def test_inference_settings_have_ranges(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        from_env(InferenceSettings, environ)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MODELFORGE_MAX_QUEUE_SIZE": "0"}, "MODELFORGE_MAX_QUEUE_SIZE=0 is invalid: it takes an integer from 1 to"),
        ({"MODELFORGE_MAX_BATCH_SIZE": "-1"}, "MODELFORGE_MAX_BATCH_SIZE=-1 is invalid: it takes an integer from 0 to"),
        ({"MODELFORGE_CACHE_TTL_SECONDS": "0"}, "MODELFORGE_CACHE_TTL_SECONDS=0 is invalid"),
        ({"MODELFORGE_DEFAULT_QUEUE_TIMEOUT": "0"}, "MODELFORGE_DEFAULT_QUEUE_TIMEOUT=0.0 is invalid"),
        ({"MODELFORGE_DEFAULT_QUEUE_TIMEOUT": "1e300"}, "MODELFORGE_DEFAULT_QUEUE_TIMEOUT=1e+300 is invalid"),
        (
            {"MODELFORGE_DEFAULT_QUEUE_TIMEOUT": "inf"},
            "MODELFORGE_DEFAULT_QUEUE_TIMEOUT='inf' is invalid: expected a finite",
        ),
        (
            {"MODELFORGE_HEALTH_CHECK_SECONDS": "nan"},
            "MODELFORGE_HEALTH_CHECK_SECONDS='nan' is invalid: expected a finite",
        ),
        ({"MODELFORGE_CACHE_MAX_ENTRY_BYTES": "1GiB"}, "MODELFORGE_CACHE_MAX_ENTRY_BYTES=1073741824 is invalid"),
    ],
)
def test_serving_defaults_take_what_their_labels_take_when_the_settings_are_read(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        from_env(InferenceSettings, environ)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("MODELFORGE_DATABASE_URL", "notaurl"),
        ("MODELFORGE_DATABASE_URL", "mysql://db/x"),
        ("MODELFORGE_DATABASE_URL", "postgresql://127.0.0.1:notaport/postgres"),  # parses; libpq refuses it later
        ("MODELFORGE_DATABASE_URL", "host=a,b port=5432,99999"),
        ("MODELFORGE_REDIS_URL", "notaurl"),
        ("MODELFORGE_REDIS_URL", "redis://host:port/0"),
    ],
)
def test_a_url_neither_libpq_nor_redis_would_read_is_refused_without_echoing_it(key: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        from_env(ServerSettings, {key: value})
    assert str(caught.value).startswith(f"{key} is invalid: it takes a ")
    assert value not in str(caught.value)  # a URL may carry a password


def test_urls_that_libpq_and_redis_read_pass() -> None:
    settings = from_env(
        ServerSettings,
        {"MODELFORGE_DATABASE_URL": "host=/tmp/pg dbname=x", "MODELFORGE_REDIS_URL": "unix:///tmp/redis.sock"},
    )
    assert (settings.database_url, settings.redis_url) == ("host=/tmp/pg dbname=x", "unix:///tmp/redis.sock")
    assert from_env(ServerSettings, {"MODELFORGE_DATABASE_URL": "postgresql://u:p@h:5432/db"}).database_url
    assert from_env(ServerSettings, {"MODELFORGE_DATABASE_URL": "host=a,b port=5432,5433 dbname=x"}).database_url


@pytest.mark.parametrize(
    "value",
    [
        "127.0.0.1:50052",
        "unix:",
        "unix-abstract:",
        "tcp:/tmp/x.sock",
        "unix:/" + "a" * 107,
        "unix-abstract:" + "é" * 54,
    ],
)
def test_a_private_address_that_is_no_unix_socket_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="MODELFORGE_PRIVATE_ADDRESS is invalid: it takes a Unix socket address"):
        from_env(ServerSettings, {"MODELFORGE_PRIVATE_ADDRESS": value})


@pytest.mark.parametrize(
    "value", ["unix:/run/modelforge/inference-2.sock", "unix-abstract:modelforge-1-inference-2", "unix:/" + "a" * 106]
)
def test_a_unix_socket_is_a_private_address(value: str) -> None:
    assert from_env(ServerSettings, {"MODELFORGE_PRIVATE_ADDRESS": value}).private_address == value


def test_serving_defaults_accept_the_documented_defaults_and_no_queue_timeout() -> None:
    config = serving.defaults(from_env(InferenceSettings, {"MODELFORGE_DEFAULT_QUEUE_TIMEOUT": ""}))
    assert config.batching.default_queue_timeout is None
    assert config.batching.max_queue_size == 1024
    assert (
        serving.defaults(
            from_env(InferenceSettings, {"MODELFORGE_DEFAULT_QUEUE_TIMEOUT": "2.5"})
        ).batching.default_queue_timeout
        == 2.5
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MODELFORGE_WORKER_THREADS": "0"}, "MODELFORGE_WORKER_THREADS=0 is invalid: it takes a number >= 1"),
        (
            {"MODELFORGE_HEARTBEAT_INTERVAL": "40"},
            "MODELFORGE_HEARTBEAT_INTERVAL=40.0 is invalid: it must not exceed MODELFORGE_HEARTBEAT_TIMEOUT=30.0",
        ),
        (
            {"MODELFORGE_DEFAULT_JOB_BATCH_SIZE": "100000"},
            "MODELFORGE_DEFAULT_JOB_BATCH_SIZE=100000 is invalid: "
            "it must not exceed MODELFORGE_MAX_JOB_BATCH_SIZE=65536",
        ),
    ],
)
def test_jobs_settings_have_ranges_and_orders(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        from_env(JobsSettings, environ)


def test_registry_settings_have_ranges() -> None:
    with pytest.raises(SettingsError, match="MODELFORGE_MAX_MODEL_BYTES=0 is invalid"):
        from_env(RegistrySettings, {"MODELFORGE_MAX_MODEL_BYTES": "0"})


def test_a_trace_sample_ratio_outside_0_to_1_is_refused() -> None:
    assert from_env(TelemetrySettings, {"MODELFORGE_TRACE_SAMPLE_RATIO": "0.25"}).trace_sample_ratio == 0.25
    with pytest.raises(SettingsError, match="MODELFORGE_TRACE_SAMPLE_RATIO=2.0 is invalid: it takes a number from 0"):
        from_env(TelemetrySettings, {"MODELFORGE_TRACE_SAMPLE_RATIO": "2"})


@pytest.mark.parametrize(
    "endpoint",
    [
        "not a url",
        "ftp://x:99999",
        "ftp://collector:4317",
        "http://collector:99999",
        "http://collector",  # no port: gRPC would dial 443
        "http://:4317",
        "http://collector:4318/v1/traces",  # the OTLP/HTTP exporter's form
        "collector",
    ],
)
@pytest.mark.parametrize("key", ["MODELFORGE_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"])
def test_an_otlp_endpoint_the_grpc_exporter_cannot_dial_is_refused_at_start(key: str, endpoint: str) -> None:
    with pytest.raises(SettingsError) as caught:
        read_settings({key: endpoint})
    assert str(caught.value) == (
        f"{key}={endpoint!r} is invalid: it takes the address of an OTLP/gRPC collector, http://host:port or "
        "https://host:port (such as http://otel-collector:4317)"
    )


@pytest.mark.parametrize(
    "endpoint",
    ["http://otel-collector:4317", "https://collector.example.com:443/", "http://[::1]:4317", "localhost:4317"],
)
def test_an_otlp_endpoint_with_a_host_and_a_port_is_taken(endpoint: str) -> None:
    assert read_settings({"MODELFORGE_OTLP_ENDPOINT": endpoint}).otlp_endpoint == endpoint
    read_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
