"""Builds a service's grpc.aio server and runs it until a signal.

The server carries the status mapping, RPC metrics, server spans (when tracing is on), health, reflection and
message limits. Health has three kinds of names:

- ``liveness``: SERVING whenever the process answers (a Kubernetes liveness probe);
- ``""`` and each served service name: SERVING while started and every required dependency answers (readiness);
- ``dependency/<name>``: one per watched dependency, so an operator sees which one is down, including optional
  ones (such as a cache) that do not gate readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from modelforge_server import orphans, ports, tasks
from modelforge_server import telemetry as _telemetry
from modelforge_server.handlers import Gate, Registrar
from modelforge_server.metrics import Endpoint, Metrics
from modelforge_server.ports import PortInUse
from modelforge_server.settings import ServerSettings, SettingsError

log = logging.getLogger("modelforge.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS = "liveness"
# HTTP/2's largest frame, advertised by every server and by the channels between services: large messages (model
# uploads, inference outputs) then travel in a few frames rather than hundreds of 16 KiB ones.
MAX_FRAME_SIZE = (1 << 24) - 1
LARGE_FRAMES = ("grpc.http2.max_frame_size", MAX_FRAME_SIZE)


def keepalive(seconds: float) -> list[tuple[str, int]]:
    """Server options that ping a connection quiet for `seconds` and close it when the ping goes unanswered as long
    again (at most 20 s), and that take clients' keepalive pings as often as every 5 s (or `seconds` / 2).

    gRPC's own wait for the answer is its ping timeout (a minute), not the keepalive timeout. By default a server
    also ends a connection whose client pings more often than every 5 minutes without data ("too many pings"),
    which would end the quiet event streams of clients that keep them watched (a client stops pinging after two
    pings without data unless told otherwise, see the inference service's registry channel)."""
    answer = round(min(seconds, 20.0) * 1000)
    return [
        ("grpc.keepalive_time_ms", round(seconds * 1000)),
        ("grpc.keepalive_timeout_ms", answer),
        ("grpc.http2.ping_timeout_ms", answer),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", round(min(seconds, 10.0) / 2 * 1000)),
    ]


# gRPC core holds calls that arrive faster than the server takes them, and past 1,000 such calls it drops them at
# random with a bare CANCELLED (all of them past 3,000), before any handler, metric or log line sees them. A burst
# of a few thousand calls on a busy server reaches that. The services refuse work themselves, with codes that say
# why (a full batch queue is RESOURCE_EXHAUSTED, a passed deadline DEADLINE_EXCEEDED), so core's limit is lifted;
# what waits in core is bounded by HTTP/2 flow control and the callers' deadlines.
_UNBOUNDED = (1 << 31) - 1
NO_CALL_BACKLOG_LIMIT = (
    ("grpc.server.max_pending_requests", _UNBOUNDED),
    ("grpc.server.max_pending_requests_hard_limit", _UNBOUNDED),
)
# How long a stopping server refuses new calls with UNAVAILABLE before gRPC stops taking them (see Server.stop):
# until none came for the quiet interval, and no longer than the limit.
REFUSAL_SECONDS = 0.5
REFUSAL_QUIET_SECONDS = 0.02
DEPENDENCY_PREFIX = "dependency/"
# How an operator moves each port that serve() binds.
GRPC_PORT_REMEDY = "MODELFORGE_PORT"
METRICS_PORT_REMEDY = "MODELFORGE_METRICS_PORT (0 turns metrics off)"


@dataclass(frozen=True)
class Api:
    """One gRPC service to serve: its descriptor, the servicer, and the generated add_*_to_server function."""

    descriptor: ServiceDescriptor
    servicer: Any
    add_to_server: Callable[[Any, Any], None]  # called with a Registrar standing in for the server

    @property
    def name(self) -> str:
        return self.descriptor.full_name


Check = Callable[[], Awaitable[object]]


class Server:
    """A grpc.aio server with its health service; health follows the dependencies it watches."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: EndingHealthServicer,
        names: Sequence[str],
        *,
        metrics: Metrics | None = None,
        gate: Gate | None = None,
    ):
        self.grpc = server
        self.health = health_servicer
        self._gate = gate if gate is not None else Gate()
        self.names = tuple(names)
        self.metrics = metrics if metrics is not None else Metrics()
        self._started = False
        self._stopping = False
        self._serving = False
        self._checks: dict[str, tuple[Check, float]] = {}
        self._dependencies: dict[str, bool] = {}
        self._optional: set[str] = set()
        self._unlogged: set[str] = set()  # dependencies whose own code logs their outages
        self._watchers: set[asyncio.Task[None]] = set()
        self._before_stop: list[Callable[[], Awaitable[object]]] = []

    def add_port(self, address: str) -> int:
        """Binds an insecure port and returns its number (useful with port 0)."""
        try:
            port: int = self.grpc.add_insecure_port(address)
        except RuntimeError:  # grpcio raises this where older releases returned 0; neither says why
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {address}: the address is in use or invalid")
        return port

    def watch_dependency(
        self, name: str, check: Check, interval: float = 2.0, *, required: bool = True, logged: bool = True
    ) -> None:
        """Keeps health NOT_SERVING while `check()` raises or times out, SERVING once it passes again.

        An optional dependency (``required=False``, e.g. a cache) is reported under ``dependency/<name>`` and in
        ``modelforge_dependency_up`` but leaves readiness alone: the service runs degraded without it.
        ``logged=False``: the dependency's own code logs when it goes and comes back, so the watch does not say it
        a second time.
        """
        self._checks[name] = (check, interval)
        self._dependencies[name] = True
        if not required:
            self._optional.add(name)
        if not logged:
            self._unlogged.add(name)
        self.metrics.dependency_up.labels(name).set(1)
        if self._started:
            self._watch(name)

    async def start(self) -> None:
        await self.grpc.start()
        self._started = True
        await self.health.set(LIVENESS, SERVING)
        for name in self._checks:
            self._watch(name)
        await self.set_serving(True)

    async def stop(self, grace: float | None, *, drain: float = 0.0) -> None:
        """Flips health to NOT_SERVING, keeps taking calls for `drain` seconds (for load balancers to notice), then
        ends health watches, refuses new calls and lets calls in flight finish within `grace` seconds."""
        self._serving = False
        first = not self._stopping
        self._stopping = True
        await self._publish()  # readiness NOT_SERVING; liveness stays SERVING while the process answers
        # Re-cancelled until done: a probe whose check finishes as it is cancelled may not see that cancellation.
        await asyncio.gather(*(tasks.stop(task) for task in self._watchers))
        self._watchers.clear()
        await self._publish()  # in case a probe published its finding meanwhile
        if first and drain > 0:
            log.info("draining: readiness is NOT_SERVING, calls are still taken for %.1f s", drain)
            await asyncio.sleep(drain)
        await self.health.end_watches()
        for hook in reversed(self._before_stop):
            try:
                await hook()
            except Exception:
                log.exception("a shutdown hook failed; stopping anyway")
        self._before_stop.clear()
        # Calls that gRPC holds but has not handed to a handler yet would end CANCELLED at grpc.stop: refused with
        # UNAVAILABLE first, their clients retry them (elsewhere, or here once restarted).
        self._gate.closed = True
        await self._refuse_while_calls_come()
        await self.grpc.stop(grace)

    async def _refuse_while_calls_come(self) -> None:
        """Waits, up to REFUSAL_SECONDS, until no call has been refused for REFUSAL_QUIET_SECONDS: by then gRPC has
        handed over the calls it held (each refused with UNAVAILABLE), and clients have heard the refusals."""
        deadline = asyncio.get_running_loop().time() + REFUSAL_SECONDS
        while True:
            seen = self._gate.refused
            await asyncio.sleep(REFUSAL_QUIET_SECONDS)
            if self._gate.refused == seen or asyncio.get_running_loop().time() >= deadline:
                return

    def before_stop(self, hook: Callable[[], Awaitable[object]]) -> None:
        """Runs `hook` on stop, once health is NOT_SERVING and before calls in flight are waited for.

        For what would otherwise hold calls open through the whole grace period, such as the feeds behind
        endless server streams (watches): ending them lets those calls finish at once.
        """
        self._before_stop.append(hook)

    async def set_serving(self, serving: bool) -> None:
        self._serving = serving
        await self._publish()

    @property
    def serving(self) -> bool:
        """True while started, not shutting down, and every required dependency is reachable."""
        return self._serving and all(up for name, up in self._dependencies.items() if name not in self._optional)

    @property
    def dependencies(self) -> dict[str, bool]:
        return dict(self._dependencies)

    def _watch(self, name: str) -> None:
        task = asyncio.create_task(self._probe(name, *self._checks[name]), name=f"health-{name}")
        self._watchers.add(task)

    async def _probe(self, name: str, check: Check, interval: float) -> None:
        while not self._stopping:
            try:
                async with asyncio.timeout(max(interval, 1.0)):
                    await check()
                healthy = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._dependencies.get(name) and name not in self._unlogged:
                    why = str(exc) or ("no answer within the check's timeout" if isinstance(exc, TimeoutError) else "")
                    log.warning("dependency %s is unreachable: %s", name, why or type(exc).__name__)
                healthy = False
            if healthy != self._dependencies.get(name):
                if healthy and name not in self._unlogged:
                    log.info("dependency %s is reachable again", name)
                self._dependencies[name] = healthy
                self.metrics.dependency_up.labels(name).set(1 if healthy else 0)
                await self._publish()
            await asyncio.sleep(interval)

    async def _publish(self) -> None:
        status = SERVING if self.serving else NOT_SERVING
        for name in ("", *self.names):
            await self.health.set(name, status)
        for name, up in self._dependencies.items():
            await self.health.set(DEPENDENCY_PREFIX + name, SERVING if up else NOT_SERVING)


class EndingHealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # grpc_health is untyped
    """grpc's health servicer, whose Watch streams end when the server stops.

    Left open, a Watch (every client with client-side health checking holds one) kept the server up for its whole
    grace period. Once `end_watches` runs, each stream gets NOT_SERVING (again, if it had it) and ends UNAVAILABLE,
    for its client to watch another replica.
    """

    def __init__(self) -> None:
        super().__init__()
        self._watches: set[asyncio.Task[None]] = set()
        self._ending = False

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        if not self._ending:
            watch = asyncio.ensure_future(super().Watch(request, context))
            self._watches.add(watch)
            try:
                await watch
                return
            except asyncio.CancelledError:
                if not self._ending or not watch.cancelled():
                    raise  # the call itself was cancelled
            finally:
                self._watches.discard(watch)
        await context.write(health_pb2.HealthCheckResponse(status=NOT_SERVING))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; watch another replica")

    async def end_watches(self) -> None:
        """Ends every open Watch stream now, and each one opened from now on after its first answer."""
        self._ending = True
        for watch in list(self._watches):
            watch.cancel()


def build_server(
    apis: Sequence[Api],
    *,
    domain: str,
    settings: ServerSettings,
    metrics: Metrics | None = None,
    max_receive_bytes: int | None = None,
    text_checked: bool = False,
) -> Server:
    """A server with RPC metrics, the status mapping, server spans (when tracing is on), health, reflection and
    message limits.

    Messages up to ``settings.max_message_bytes`` are sent and received; `max_receive_bytes`, when given, replaces
    the receive limit (a service that checks request sizes itself raises it above its own limit, so that its
    check, not the transport, refuses a request slightly over). Ports are bound by the caller. Pass the service's
    own `metrics` when its core declares metrics too, so that both are served on one port; otherwise the server
    makes its own (``server.metrics``). Every handler is registered through a
    :class:`~modelforge_server.handlers.Registrar`, which wraps it once with its metrics and, for the `apis`, the
    status mapping. Server spans are added when :func:`modelforge_server.telemetry.setup`
    turned tracing on before this call; otherwise the server runs no interceptor. `text_checked` refuses requests
    to the `apis` that hold a NUL character in a string (INVALID_ARGUMENT ``NUL_IN_TEXT``): for services that store
    text in PostgreSQL, which cannot hold one.
    """
    names = [api.name for api in apis]
    metrics = metrics if metrics is not None else Metrics()
    tracing = _telemetry.server_interceptor()
    receive = settings.max_message_bytes if max_receive_bytes is None else max_receive_bytes
    server = grpc.aio.server(
        interceptors=[tracing] if tracing is not None else None,
        options=[
            ("grpc.max_receive_message_length", receive),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            LARGE_FRAMES,
            ("grpc.so_reuseport", 1 if settings.share_port else 0),  # off: a port another process holds is refused
            *NO_CALL_BACKLOG_LIMIT,
            *keepalive(settings.keepalive_seconds),
        ],
    )
    registrar = Registrar(
        server, metrics, domain=domain, mapped=names, text_checked=text_checked, intercepted=tracing is not None
    )
    for api in apis:
        api.add_to_server(api.servicer, registrar)
    health_servicer = EndingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
    reflected = [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    # What reflection.enable_server_reflection does for a grpc.aio server, through the registrar.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(reflected), registrar)
    return Server(server, health_servicer, names, metrics=metrics, gate=registrar.gate)


def loop_factory(event_loop: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes the event loops of a service process, as MODELFORGE_EVENT_LOOP (`event_loop`) names it.

    uvloop, where installed, spends measurably less CPU per RPC than asyncio's own loop (docs/PERFORMANCE.md), so
    "auto" takes it; "asyncio" keeps the standard loop; "uvloop" insists on it.
    """
    if event_loop not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"MODELFORGE_EVENT_LOOP must be auto, uvloop or asyncio, not {event_loop!r}")
    if event_loop != "asyncio":
        try:
            import uvloop  # optional: not built for every platform
        except ImportError:
            if event_loop == "uvloop":
                raise ValueError("MODELFORGE_EVENT_LOOP=uvloop, but uvloop is not installed") from None
        else:
            return uvloop.Loop
    return asyncio.DefaultEventLoopPolicy().new_event_loop  # the standard loop, whatever policy is installed


def run(main: Coroutine[Any, Any, None], event_loop: str = "auto") -> None:
    """Runs a service process's main coroutine to completion on a loop from :func:`loop_factory`."""
    try:
        factory = loop_factory(event_loop)
    except ValueError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def use_event_loop(event_loop: str = "auto") -> None:
    """Makes every loop this process creates from now on come from :func:`loop_factory`, including loops that a
    library creates itself with ``asyncio.new_event_loop()`` (the jobs workers' Dramatiq AsyncIO thread)."""
    factory = loop_factory(event_loop)

    class Policy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return factory()

    asyncio.set_event_loop_policy(Policy())


async def serve(server: Server, settings: ServerSettings, *, telemetry: _telemetry.Telemetry | None = None) -> None:
    """Binds settings.host:port (and the metrics port), serves until SIGTERM or SIGINT, then shuts down gracefully.

    With `telemetry` (from ``telemetry.setup``), /metrics is served on settings.host:telemetry.metrics_port
    unless that port is 0, and buffered spans are flushed at the end. A port another process holds raises
    :class:`~modelforge_server.ports.PortInUse`, as :func:`check_ports` does before anything starts.
    """
    try:
        server.add_port(settings.address)
    except OSError:
        _refuse_if_taken(settings.host, settings.port, "gRPC", GRPC_PORT_REMEDY, shared=settings.share_port)
        raise
    claim = None  # the private path's lock, held while this process serves there
    if settings.private_address is not None:
        claim = ports.claim_private(settings.private_address)
        try:
            server.add_port(settings.private_address)
        except OSError:
            if claim is not None:
                os.close(claim)
            ports.check_private(settings.private_address)  # taken meanwhile: says so
            raise SettingsError(
                f"MODELFORGE_PRIVATE_ADDRESS={settings.private_address!r}: gRPC cannot listen there (its log above "
                "says why)"
            ) from None
    endpoint = None
    try:
        if telemetry is not None:
            endpoint = _serve_metrics(server, settings, telemetry)
        await server.start()
        where = (
            settings.address
            if settings.private_address is None
            else f"{settings.address} and {settings.private_address}"
        )
        log.info("serving %s on %s", ", ".join(server.names), where)
        await _wait_for_signal()
        log.info("shutting down; calls in flight get %.1f s", settings.grace_seconds)
        await server.stop(settings.grace_seconds, drain=settings.drain_seconds)
    finally:
        if endpoint is not None:
            endpoint.close()
        if telemetry is not None:
            telemetry.shutdown()
        if claim is not None:
            os.close(claim)


def check_ports(settings: ServerSettings, telemetry: _telemetry.Telemetry | None = None) -> None:
    """Refuses, before a service opens anything, the ports :func:`serve` would find taken.

    Call it in main() under ``settings.reported``, once telemetry has decided the metrics port: a port in use then
    ends the process with one line naming the port, its use and the setting that moves it (exit 2), before an
    embedded store starts and logs. :func:`serve` reports a port taken after this check in the same words.

    Raises:
        PortInUse: another process listens on the gRPC port (one that does not share it, where
            MODELFORGE_SHARE_PORT is on) or on the metrics port.
        AddressInUse: another process listens on MODELFORGE_PRIVATE_ADDRESS.
        SettingsError: MODELFORGE_HOST is no address of this machine.
    """
    wanted = [(settings.port, "gRPC", GRPC_PORT_REMEDY, settings.share_port)]
    if telemetry is not None:  # each replica has a /metrics port of its own: a scrape must reach one process
        wanted.append((telemetry.metrics_port, "metrics", METRICS_PORT_REMEDY, False))
    for port, use, remedy, shared in wanted:
        if port:  # 0: the system picks a free port, or metrics are off
            _refuse_if_taken(settings.host, port, use, remedy, shared=shared)
    if settings.private_address is not None:
        ports.check_private(settings.private_address)


def _refuse_if_taken(host: str, port: int, use: str, remedy: str, *, shared: bool = False) -> None:
    try:
        if not ports.free(host, port, shared=shared):
            raise PortInUse(port, use, remedy)
    except ports.NotAnAddressHere as exc:
        raise SettingsError(
            f"MODELFORGE_HOST={host!r} is invalid: {exc}; it takes an address of this machine"
        ) from None


def _serve_metrics(server: Server, settings: ServerSettings, telemetry: _telemetry.Telemetry) -> Endpoint | None:
    try:
        return telemetry.serve_metrics(server.metrics, settings.host)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(telemetry.metrics_port, "metrics", METRICS_PORT_REMEDY) from None
        raise


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    orphans.stop_when_up_is_gone()  # a SIGTERM of its own once `up` is gone
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
