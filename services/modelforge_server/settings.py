"""Settings from MODELFORGE_* environment variables, cast by annotation and checked once at start."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import textwrap
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from redis.connection import parse_url

PREFIX = "MODELFORGE_"
MiB = 1024 * 1024

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

S = TypeVar("S")


class SettingsError(ValueError):
    """A MODELFORGE_* variable is malformed; the message names the variable and what it takes."""


class Bound(NamedTuple):
    """The values a numeric setting takes: from ``low`` (excluded when ``above``) up to ``high`` (None: no limit)."""

    low: float
    high: float | None = None
    above: bool = False

    def admits(self, value: float) -> bool:
        return (value > self.low if self.above else value >= self.low) and (self.high is None or value <= self.high)

    def describe(self) -> str:
        if self.high is not None:
            return f"a number from {self.low:g} to {self.high:g}"
        return f"a number {'>' if self.above else '>='} {self.low:g}"


PORT = Bound(0, 65535)  # 0: the service picks a free port, or a listener is off
AT_LEAST_ONE = Bound(1)
NOT_NEGATIVE = Bound(0)
POSITIVE = Bound(0, above=True)
# What a streamed chunk's message adds to its bytes (field tags, an offset, an output name), with room to spare.
CHUNK_HEADROOM = 4096


@dataclass(frozen=True)
class ServerSettings:
    """What every service process reads; each service subclasses it with its own port and fields."""

    host: str = "127.0.0.1"
    port: int = 0
    data_dir: Path = Path(".modelforge")
    database_url: str | None = None
    # Seconds an operation on PostgreSQL may take before its connection is cut and the call answers UNAVAILABLE.
    database_timeout: float = 30.0
    redis_url: str | None = None
    log_level: str = "INFO"
    max_message_bytes: int = 64 * MiB
    grace_seconds: float = 10.0
    # Seconds a stopping service keeps taking calls with readiness NOT_SERVING, before it refuses new ones.
    drain_seconds: float = 0.0
    chunk_bytes: int = 1 * MiB
    # A connection quiet this long is pinged, and closed when the ping goes unanswered as long again (at most 20 s),
    # its calls ending: what a client that vanished without closing (a host gone, a network cut) held is let go.
    keepalive_seconds: float = 60.0
    # Several processes of one service listen on the same port (SO_REUSEPORT), the kernel spreading connections
    # among them: replicas on one host, to use more cores than one process's event loop can. Every process sets it.
    share_port: bool = False
    # A second address this process alone listens on, `unix:PATH` or `unix-abstract:NAME`: where a health check, or a
    # call meant for this replica (LoadModel, statistics), reaches it rather than whichever process shares the port.
    private_address: str | None = None
    # The event loop of a service process: "auto" (uvloop when installed, else asyncio's), "uvloop" or "asyncio".
    event_loop: str = "auto"
    labels: dict[str, str] = field(default_factory=dict)

    # The numeric settings with a range, checked when the settings are made (from the environment or in code).
    bounds: ClassVar[Mapping[str, Bound]] = {
        "port": PORT,
        "max_message_bytes": Bound(CHUNK_HEADROOM + 1),
        "grace_seconds": NOT_NEGATIVE,
        "drain_seconds": NOT_NEGATIVE,
        "database_timeout": POSITIVE,
        "chunk_bytes": AT_LEAST_ONE,
        "keepalive_seconds": POSITIVE,
    }

    def __post_init__(self) -> None:
        for name, bound in self.bounds.items():
            value = getattr(self, name)
            if value is not None and not bound.admits(value):
                raise SettingsError(f"{_key(name)}={value!r} is invalid: it takes {bound.describe()}")
        for name, value, choices in (
            ("log_level", self.log_level.upper(), _LOG_LEVELS),
            ("event_loop", self.event_loop, _EVENT_LOOPS),
        ):
            if value not in choices:
                raise SettingsError(f"{_key(name)}={value!r} is invalid: it takes {', '.join(choices)}")
        for name, check, takes in (
            ("database_url", _database_url, "a PostgreSQL URL (postgresql://user:password@host:5432/dbname)"),
            ("redis_url", _redis_url, "a Redis URL (redis://host:6379/0, rediss://... or unix:///path/to.sock)"),
            (
                "private_address",
                _private_address,
                "a Unix socket address of at most 107 bytes after its scheme: unix:/path/to.sock or unix-abstract:name",
            ),
        ):
            value = getattr(self, name)
            if value is not None and not check(value):
                raise SettingsError(f"{_key(name)} is invalid: it takes {takes}")  # the value may hold a password
        if self.chunk_bytes > self.max_message_bytes - CHUNK_HEADROOM:
            raise SettingsError(
                f"{_key('chunk_bytes')}={self.chunk_bytes!r} is invalid: a streamed chunk must fit in one message of "
                f"at most {_key('max_message_bytes')}={self.max_message_bytes} bytes with {CHUNK_HEADROOM} to spare; "
                f"set it to at most {self.max_message_bytes - CHUNK_HEADROOM}, or raise {_key('max_message_bytes')}"
            )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _database_url(url: str) -> bool:
    """Whether libpq would read `url`: a postgresql:// URL or a key=value connection string."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:  # libpq's own parser refused it
        return False
    # libpq checks the port only when it connects: "host:notaport" parses. Ports are comma-separated, one a host.
    ports = str(params.get("port") or "").split(",")
    return all(not port or (port.isdigit() and int(port) <= 65535) for port in ports)


def _private_address(address: str) -> bool:
    """Whether gRPC would listen on `address` as a Unix socket: a named path, or a name in the abstract namespace,
    of at most 107 bytes (what a socket address holds beside its terminating or leading NUL)."""
    scheme, _, name = address.partition(":")
    return scheme in ("unix", "unix-abstract") and 0 < len(name.encode()) <= 107 and "\0" not in name


def _redis_url(url: str) -> bool:
    """Whether redis-py would read `url`."""
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError:
        return False
    return True


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_EVENT_LOOPS = ("auto", "uvloop", "asyncio")


@contextlib.contextmanager
def reported(program: str) -> Iterator[None]:
    """Around a process's reading of its settings: a malformed MODELFORGE_* variable ends the process (exit 2)
    with one line naming it and what it takes, not a traceback."""
    try:
        yield
    except SettingsError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _key(name: str) -> str:
    return PREFIX + name.upper()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message}; it takes no arguments: set MODELFORGE_* variables (see --help)\n")


def command_line(module: str, summary: str, cls: type[Any], argv: Sequence[str] | None = None) -> None:
    """The command line of a service's process, which takes no arguments: its settings come from the environment.
    ``--help`` prints `summary` and every MODELFORGE_* variable that `cls` reads, with its default, and those of
    the telemetry every process sets up, and exits; any argument ends the process (exit 2) with one line saying so,
    rather than being ignored."""
    from modelforge_server.telemetry import OTEL_ENDPOINT_ENV, TelemetrySettings  # it reads these settings too

    fields = {f.name: f for f in (*dataclasses.fields(TelemetrySettings), *dataclasses.fields(cls))}
    lines = [f"  {_key(f.name):<42} {_default(f)}" for f in sorted(fields.values(), key=lambda f: f.name)]
    lines.append(f"  {OTEL_ENDPOINT_ENV:<42} (unset; read as MODELFORGE_OTLP_ENDPOINT is)")
    parser = _Parser(
        prog=f"python -m {module}",
        description=textwrap.fill(
            f"{summary} Settings come from these environment variables (defaults shown; README.md says what each does):"
        ),
        epilog="\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(sys.argv[1:] if argv is None else argv)


def _default(f: dataclasses.Field[Any]) -> str:
    if "shown" in f.metadata:  # a default that depends on other settings or on the process, said in words
        return str(f.metadata["shown"])
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None or value == {} or value == ():
        return "(unset)"
    if isinstance(value, tuple):  # set as a comma-separated list
        return ",".join(map(str, value))
    return str(value)


def from_env(cls: type[S], environ: Mapping[str, str] | None = None, **overrides: Any) -> S:
    """Builds the settings dataclass `cls` from MODELFORGE_<FIELD> variables; overrides win over the environment."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        key = _key(f.name)
        raw = env.get(key)
        if raw is None:
            continue
        values[f.name] = _cast(key, raw, hints[f.name])
    return cls(**values)


def _cast(key: str, raw: str, hint: Any) -> Any:
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    text = raw.strip()
    if optional and text == "":
        return None
    try:
        if hint is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError("expected one of true/false, 1/0, yes/no, on/off")
        if hint is int:
            return parse_int(text)
        if hint is float:
            try:
                number = float(text)
            except ValueError:
                raise ValueError("expected a number, such as 0.5") from None
            if not math.isfinite(number):
                raise ValueError("expected a finite number")
            return number
        if hint is Path:
            if not text:
                raise ValueError("expected a path")
            return Path(text).expanduser()
        if typing.get_origin(hint) is dict:
            return _parse_mapping(text)
        if typing.get_origin(hint) is tuple:
            return tuple(item.strip() for item in text.split(",") if item.strip())
        return text
    except ValueError as exc:
        raise SettingsError(f"{key}={raw!r} is invalid: {exc}") from None


_SUFFIXES = {"KiB": 1024, "MiB": MiB, "GiB": 1024 * MiB, "K": 1000, "M": 1000**2, "G": 1000**3}


def parse_int(text: str) -> int:
    """Accepts plain integers, underscores, and byte suffixes such as 64MiB.

    Raises:
        ValueError: saying what it takes. Never int()'s own message, which echoes the text with its suffix and
            underscores removed ("invalid literal for int() with base 10: 'x1'" for x_1MiB); the caller echoes
            the value as given.
    """
    number, factor = text, 1
    for suffix, size in _SUFFIXES.items():
        if text.endswith(suffix):
            number, factor = text[: -len(suffix)].strip(), size
            break
    try:
        return int(number.replace("_", "")) * factor
    except ValueError:
        raise ValueError("it takes an integer, optionally ending in KiB, MiB, GiB, K, M or G") from None


def _parse_mapping(text: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError("expected comma-separated key=value pairs")
        result[key.strip()] = value.strip()
    return result
