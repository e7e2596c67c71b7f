"""ModelResolver: which version a ModelRef means right now, cached and kept fresh by the registry's event stream.

Resolutions are cached per ModelRef only while the resolver's watch on the registry's WatchModelEvents is live
(after WATCH_STARTED): from then on no change is missed, so an entry is dropped exactly when an event about its
model arrives. Any event about a model drops every entry of that model (events are rare; finer rules would only
add ways to be wrong). While the stream is down nothing is served from the cache or stored in it: every resolve
asks the registry. When the stream breaks, the resolver drops the whole cache and reconnects with jittered
exponential backoff.

A resolution that was already asked of the registry when an event about its model arrived is handed to the
callers that were waiting for it but is not cached; callers arriving after the event start a fresh call. So a
request already running keeps the version it resolved, and a moved alias is seen from the next request on.

The resolver also remembers the last resolution of each ref (bounded like the cache; kept while the stream is down).
An event about a model drops those of its aliases and newest-version refs, and those of refs by version number only
when the version or the model is deleted; when the stream is back, those of aliases and newest-version refs are
dropped, since events may have been missed meanwhile. It is served only when the registry cannot answer: a call that
fails UNAVAILABLE, or takes longer than `stale_wait`, falls back to it, so that versions already known keep serving
through a registry restart or a database outage. While the registry is known not to answer (for `stale_wait` after
such a failure, and while the service's health check of the registry fails, see
:meth:`ModelResolver.registry_answers`), those refs are answered from it at once, and refs with no last resolution
fail REGISTRY_UNAVAILABLE at once, rather than each waiting out its deadline on a registry that does not answer.

Listeners (:meth:`ModelResolver.add_listener`) are told of every event after the cache has dropped what it
invalidates, on the watch task, in order. They must be quick and must not block: an engine that unloads a model on
VERSION_DELETED starts that work in its own task group. A WATCH_STARTED event follows each (re)connection: events
may have been missed while the stream was down, so a listener re-checks what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import OrderedDict
from collections.abc import Callable

from modelforge.registry.v1 import registry_pb2_grpc
from modelforge_inference.domain import ModelRef, ResolvedModel
from modelforge_inference.registry_client import ModelEvent, ModelEventType, RegistryClient, RegistryUnavailable
from modelforge_server import errors
from modelforge_server.flights import SingleFlight

__all__ = ["ModelEvent", "ModelEventType", "ModelResolver", "ResolveTimeout"]

log = logging.getLogger(__name__)

Listener = Callable[[ModelEvent], None]
# Events after which a ref by version number may no longer name what it named (version 0: every version). A type
# newer than this build counts among them.
_GONE = frozenset({ModelEventType.MODEL_DELETED, ModelEventType.VERSION_DELETED, ModelEventType.OTHER})
_Token = tuple[int, int]  # (epoch, generation of the model) when a registry call began


class ResolveTimeout(errors.DeadlineExceeded):
    reason = "RESOLVE_TIMEOUT"

    def __init__(self, ref: ModelRef, timeout: float) -> None:
        super().__init__(
            f"resolving {ref} through the model registry took longer than the {timeout:.3f} s left to the request",
            model=ref.name,
        )


class ModelResolver:
    """Resolves ModelRefs through the registry, with a cache invalidated by the registry's events.

    Use it as ``async with ModelResolver(stub) as resolver:`` (or ``await start()`` / ``await aclose()``), which
    runs the watch task in between. Without a running watch it still resolves, always asking the registry.

    Args:
        registry: A RegistryServiceStub on a grpc.aio channel. Give the channel keepalive and short reconnect
            backoff options (``grpc.keepalive_time_ms``, ``grpc.max_reconnect_backoff_ms``) so that a broken stream
            is noticed and a restarted registry is reached again quickly.
        call_timeout: Longest one ResolveModelRef call may take.
        min_backoff, max_backoff: Bounds of the delay between reconnection attempts of the watch, in seconds.
        max_entries: Cached resolutions beyond this evict the oldest; so do the last-known ones.
        stale_wait: How long a resolve that has a last-known resolution waits on the registry before using it.
    """

    def __init__(
        self,
        registry: registry_pb2_grpc.RegistryServiceStub,
        *,
        call_timeout: float = 10.0,
        min_backoff: float = 0.05,
        max_backoff: float = 5.0,
        max_entries: int = 10_000,
        stale_wait: float = 1.0,
    ) -> None:
        self._registry = RegistryClient(registry)
        self._call_timeout = call_timeout
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._max_entries = max_entries
        self._entries: dict[ModelRef, ResolvedModel] = {}
        self._last_known: OrderedDict[ModelRef, ResolvedModel] = OrderedDict()
        self._stale_wait = stale_wait
        self._unreachable_until = 0.0  # loop time until which resolves do not ask the registry
        self._health_failing = False  # the service's health check of the registry last failed
        self.stale_answers = 0  # resolutions served from the last-known ones; for statistics and tests
        self._epoch = 0  # bumped whenever the whole cache is dropped
        self._generations: dict[str, int] = {}  # per model name, bumped by each event about it
        self._flights: SingleFlight[tuple[ModelRef, _Token], ResolvedModel] = SingleFlight()
        self._listeners: list[Listener] = []
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0  # how many times the watch stream was (re)established; for statistics and tests

    async def __aenter__(self) -> ModelResolver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Starts watching the registry's events; returns at once (see :meth:`wait_connected`)."""
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="modelforge.inference.resolver.watch")

    async def aclose(self) -> None:
        """Stops the watch and drops the cache and the last-known resolutions."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._disconnected()
        self._last_known.clear()

    @property
    def connected(self) -> bool:
        """True while the event stream is live, which is when resolutions are cached."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Returns once the event stream is live."""
        await self._connected.wait()

    def add_listener(self, callback: Listener) -> Callable[[], None]:
        """Calls ``callback(event)`` for every registry event, WATCH_STARTED included; returns a remover."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def registry_answers(self, answers: bool) -> None:
        """Tells the resolver what the health check of the registry found. While it fails, resolves do not wait on
        the registry: they answer from the last resolutions, or fail REGISTRY_UNAVAILABLE."""
        self._health_failing = not answers

    def cached(self, ref: ModelRef) -> ResolvedModel | None:
        """The cached resolution of ref, without calling the registry; None when there is none."""
        return self._entries.get(ref) if self.connected else None

    async def resolve(self, ref: ModelRef, *, timeout: float | None = None) -> ResolvedModel:
        """The version ref points at. Concurrent calls for one ref share one registry call.

        Args:
            timeout: Seconds this caller waits at most (its remaining deadline); the shared call goes on for others.

        Raises:
            RegistryNotFound: no such model, version or alias (the registry's message and reason).
            RegistryUnavailable: the registry cannot be reached.
            ResolveTimeout: timeout passed first.
        """
        if self.connected and (hit := self._entries.get(ref)) is not None:
            return hit
        loop = asyncio.get_running_loop()
        stale = self._last_known.get(ref)
        if self._health_failing or loop.time() < self._unreachable_until:
            if stale is not None:
                return self._stale(ref, stale, None)
            raise RegistryUnavailable(
                f"resolve {ref}",
                "it is unreachable or not serving (its health check fails, or a call to it just failed), and "
                "this replica has not resolved that ref before",
                model=ref.name,
            )
        token = (self._epoch, self._generations.get(ref.name, 0))
        wait = timeout if stale is None else self._stale_wait if timeout is None else min(timeout, self._stale_wait)
        try:
            async with asyncio.timeout(wait):
                return await self._flights.run((ref, token), lambda: self._fetch(ref, token))
        except TimeoutError:
            if stale is None:
                raise ResolveTimeout(ref, timeout or 0.0) from None
            why: BaseException = TimeoutError(f"no answer within {wait:g} s")
        except errors.Unavailable as exc:
            why = exc
        self._unreachable_until = loop.time() + self._stale_wait
        if stale is None:
            raise why
        return self._stale(ref, stale, why)

    def _stale(self, ref: ModelRef, model: ResolvedModel, why: BaseException | None) -> ResolvedModel:
        self.stale_answers += 1
        if why is not None:  # once per registry failure, not for each request it answers meanwhile
            log.warning(
                "the model registry cannot resolve %s (%s); serving %s:%d as last resolved until it answers",
                ref,
                why,
                model.name,
                model.version,
            )
        return model

    async def _fetch(self, ref: ModelRef, token: _Token) -> ResolvedModel:
        model = await self._registry.resolve(ref, timeout=self._call_timeout)
        # Remembered and cached only if no event about the model, and no reconnection (which may hide missed
        # events), has happened since the call began; cached only while the watch is live.
        if token != (self._epoch, self._generations.get(ref.name, 0)):
            return model
        self._last_known[ref] = model
        self._last_known.move_to_end(ref)
        if len(self._last_known) > self._max_entries:
            self._last_known.popitem(last=False)
        if self.connected:
            if len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]
            self._entries[ref] = model
        return model

    # -- the watch -------------------------------------------------------------------------------------------

    def _invalidate(self, event: ModelEvent) -> None:
        """Drops the cached resolutions of the event's model, and the last resolutions an event may have made
        wrong: of its aliases and newest-version refs always; of a ref by version number only when that version,
        or the whole model, is deleted (a ref by number still names what it named after any other change)."""
        model = event.model
        self._generations[model] = self._generations.get(model, 0) + 1
        for ref in [ref for ref in self._entries if ref.name == model]:
            del self._entries[ref]
        gone = event.type in _GONE
        for ref in [ref for ref in self._last_known if ref.name == model]:
            if ref.version is None or (gone and event.version in (0, ref.version)):
                del self._last_known[ref]

    def _forget_movable(self) -> None:
        """Drops the last resolutions of aliases and of newest-version refs: events may have been missed while the
        watch was down, and an alias may have moved, or a newer version come. A ref by version number still names
        what it named, and answers as last resolved should the registry fail (the engine checks its file before a
        load, and unloads a version the registry turns out to have deleted)."""
        for ref in [ref for ref in self._last_known if ref.version is None]:
            del self._last_known[ref]

    def _drop_all(self) -> None:
        self._epoch += 1
        self._generations.clear()
        self._entries.clear()

    def _disconnected(self) -> None:
        self._connected.clear()
        self._drop_all()

    def _notify(self, event: ModelEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("a model event listener failed on %s", event)

    async def _watch(self) -> None:
        delay = self._min_backoff
        while True:
            try:
                async with contextlib.aclosing(self._registry.watch()) as events:
                    async for event in events:
                        if event.type is ModelEventType.WATCH_STARTED:
                            self._drop_all()
                            self._forget_movable()
                            self._unreachable_until = 0.0  # it answers again: ask it first
                            self._health_failing = False
                            self._connected.set()
                            self.reconnects += 1
                            delay = self._min_backoff
                            log.info("watching the registry's model events; resolutions are cached")
                        elif event.model:
                            self._invalidate(event)
                        self._notify(event)
                why = "the registry ended the event stream"
            except errors.ServiceError as exc:
                why = str(exc)
            except Exception as exc:  # a bug must not end the watch for good: log it and reconnect
                log.exception("the registry event watch failed")
                why = repr(exc)
            if self.connected:
                log.warning("lost the registry's event stream (%s); resolving uncached until it is back", why)
            else:
                log.debug("cannot watch the registry's events yet: %s", why)
            self._disconnected()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._max_backoff)
