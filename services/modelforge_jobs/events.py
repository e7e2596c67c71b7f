"""Job change notifications for WatchJob: one LISTEN connection per API process wakes the watchers of a job.

PostgreSQL announces each change of a job's state, progress, attempt or worker when the writing transaction
commits (see migration 0003), whichever process wrote it: a worker on another host, or this API. A notification
only wakes watchers; they read the job from the database, so a missed or duplicated one costs nothing but time.
While the connection is down, watchers fall back to polling, and every watcher is woken when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from uuid import UUID

from modelforge_jobs.store import listen_for_changes
from modelforge_server import tasks

log = logging.getLogger("modelforge.jobs.events")


class JobChanges:
    """Fans the job change notifications of one LISTEN connection out to this process's watchers."""

    def __init__(self, database_url: str, *, retry_seconds: float = 1.0) -> None:
        self._url = database_url
        self._retry = retry_seconds
        self._watchers: dict[UUID, set[asyncio.Event]] = {}
        self._wakes = 0  # wake-ups so far, of any job (see wakes)
        self._live = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def live(self) -> bool:
        """Whether notifications are arriving; while not, watchers only poll."""
        return self._live.is_set()

    async def start(self, *, wait_seconds: float = 5.0) -> None:
        """Starts listening in the background, and waits (up to `wait_seconds`) until it is."""
        self._task = asyncio.create_task(self._listen_forever(), name="jobs-changes")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_seconds):
                await self._live.wait()

    @property
    def stopping(self) -> bool:
        """Whether the process is stopping: watchers, woken by aclose, end their streams."""
        return self._stopping

    async def aclose(self) -> None:
        self._stopping = True
        if self._task is not None:
            task, self._task = self._task, None
            await tasks.stop(task)  # bounded: psycopg may absorb a cancellation that lands while it connects
        self._live.clear()
        self._wake_all()

    @property
    def wakes(self) -> int:
        """How many times watchers have been woken, for any job: a read that began once this count was reached
        shows every change announced until then, so the watchers woken by one change can share one read."""
        return self._wakes

    @contextlib.contextmanager
    def subscribe(self, job_id: UUID) -> Iterator[asyncio.Event]:
        """An event set whenever the job may have changed; clear it before reading the job."""
        event = asyncio.Event()
        self._watchers.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            watchers = self._watchers.get(job_id)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    del self._watchers[job_id]

    async def _listen_forever(self) -> None:
        while True:
            try:
                async with listen_for_changes(self._url) as changes:
                    self._live.set()
                    self._wake_all()  # whatever changed while the connection was down
                    log.info("listening for job changes")
                    async for job_id in changes:
                        self._wake(job_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection broke, or PostgreSQL is down: poll meanwhile, then retry
                if self._live.is_set():
                    log.warning("job change notifications interrupted (%s); WatchJob polls until they resume", exc)
            self._live.clear()
            self._wake_all()
            await asyncio.sleep(self._retry)  # back off before reconnecting; not used for synchronisation

    def _wake(self, job_id: UUID) -> None:
        self._wakes += 1  # watched or not: a read in flight for the job may have begun before this change
        for event in self._watchers.get(job_id, ()):
            event.set()

    def _wake_all(self) -> None:
        self._wakes += 1
        for watchers in self._watchers.values():
            for event in watchers:
                event.set()
