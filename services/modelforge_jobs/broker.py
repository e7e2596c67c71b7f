"""The jobs queue's broker: Dramatiq's Redis broker, whose idle consumers wake as soon as a message is sent.

Dramatiq's Redis consumers poll: after an empty fetch a consumer sleeps, longer after each miss, up to the worker
timeout (1 s by default), so a job sent to an idle worker waited for the next poll, tens to hundreds of
milliseconds. Here every send to a queue also PUBLISHes on that queue's wake channel, and an idle consumer waits on
the channel instead of sleeping. The worker timeout stays as a fallback poll: a wake-up missed (Redis pub/sub
delivers to whoever listens at that moment, so a consumer reconnecting misses it) costs at most that, as before.
Delay queues (retries waiting for their time) are not woken: their consumer polls for messages that came due.

A worker that dies leaves the messages it had taken (running and prefetched) in its acknowledgement set, and
Dramatiq's maintenance pass puts them back in their queue once the worker's heartbeat is older than the heartbeat
timeout. Dramatiq runs that pass by chance, on 0.1% of commands and for the queue of that command, which on a quiet
queue took ten minutes and more; here the workers' maintenance loop also runs it on every queue
(:meth:`WakingRedisBroker.recover_messages`), and the heartbeat timeout is the jobs' own (MODELFORGE_HEARTBEAT_TIMEOUT),
so a dead worker's queued jobs run again as soon as its running ones do.

Every message on these queues names its job in its first argument, and the broker keeps, in one Redis hash, where
the latest message of each job is (its queue and its id in Redis): set at every send, including Dramatiq's own
(retries, and delayed messages moved to their queue when due), and removed when that message is acknowledged or
dead-lettered. A job QUEUED for long whose message Redis no longer holds (flushed, restarted without its data,
dead-lettered, or dropped by a run that found the job taken) is told apart from one that waits behind a backlog
(:meth:`WakingRedisBroker.held_jobs`), so that only the former is sent again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from dramatiq import Broker, Message
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import dq_name
from dramatiq.errors import ConnectionClosed

from modelforge_server.logs import Throttle


class WakingRedisBroker(RedisBroker):
    """A RedisBroker that announces each immediate send on the queue's wake channel."""

    def __init__(self, *, url: str, namespace: str, heartbeat_timeout: float = 30.0) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            url=url, namespace=namespace, heartbeat_timeout=round(heartbeat_timeout * 1000)
        )
        self._forced = threading.local()  # set while recover_messages runs, in its thread only
        self.messages_key = f"{namespace}:job-messages"  # job id -> "QUEUE REDIS_MESSAGE_ID" of its latest message
        self._forget = self.client.register_script(_FORGET_IF_LATEST)

    def recover_messages(self, queue_names: Iterable[str]) -> None:
        """Runs Dramatiq's maintenance pass on each queue and its delay queue now: messages taken by workers whose
        heartbeat is older than the heartbeat timeout, and never acknowledged, go back to their queue."""
        self._forced.active = True
        try:
            for name in queue_names:
                for queue in (name, dq_name(name)):
                    self.do_qsize(queue)  # a command that changes nothing; the pass rides along with it
        finally:
            self._forced.active = False

    def _should_do_maintenance(self, command: str) -> int:
        if getattr(self._forced, "active", False):
            return 1
        return int(super()._should_do_maintenance(command))

    def wake_channel(self, queue_name: str) -> str:
        return f"{self.namespace}:{queue_name}:wake"

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        sent: Message[Any] = super().enqueue(message, delay=delay)
        pipeline = self.client.pipeline(transaction=False)
        if sent.args:
            pipeline.hset(self.messages_key, str(sent.args[0]), _location(sent))
        if delay is None:
            pipeline.publish(self.wake_channel(sent.queue_name), b"")
        # The message is stored. A lost wake-up only delays it to the consumers' fallback poll; a location not
        # recorded makes the job look lost to the maintenance pass after MODELFORGE_RESEND_AFTER, which sends it
        # again, and the run of whichever message comes second finds the job taken.
        with contextlib.suppress(redis.RedisError):
            pipeline.execute()
        return sent

    def forget(self, message: Message[Any]) -> None:
        """Drops the job's message location if it is this (acknowledged) message's."""
        if message.args:
            self._forget(keys=[self.messages_key], args=[str(message.args[0]), _location(message)])

    def held_jobs(self, job_ids: Sequence[str]) -> set[str]:
        """Those of these jobs whose latest message Redis still holds: waiting in its queue or delay queue, or taken
        by a worker and not acknowledged (a dead worker's go back to their queue, see recover_messages)."""
        if not job_ids:
            return set()
        locations = self.client.hmget(self.messages_key, list(job_ids))
        found = [(job_id, raw.decode().split(" ", 1)) for job_id, raw in zip(job_ids, locations, strict=True) if raw]
        pipeline = self.client.pipeline(transaction=False)
        for _, (queue, message_id) in found:
            pipeline.hexists(f"{self.namespace}:{queue}.msgs", message_id)
        return {job_id for (job_id, _), there in zip(found, pipeline.execute(), strict=True) if there}

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        return _WakingConsumer

    def close(self) -> None:
        """Closes the broker's Redis connections too (Dramatiq's RedisBroker leaves them to the collector)."""
        super().close()
        self.client.connection_pool.disconnect()


def _location(message: Message[Any]) -> str:
    return f"{message.queue_name} {message.options['redis_message_id']}"


# Removes a job's message location (KEYS[1], field ARGV[1]) only if it still names the acknowledged message
# (ARGV[2]): a newer message sent meanwhile keeps its own.
_FORGET_IF_LATEST = """
if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then
    return redis.call('hdel', KEYS[1], ARGV[1])
end
return 0
"""


# How often a consumer whose prefetch window is full looks again, so that the worker's acks free the window
# (between two looks) and it takes more from a backlog.
FULL_WINDOW_POLL_SECONDS = 0.02


class _WakingConsumer(_RedisConsumer):
    """Between empty fetches, waits for a wake-up on its queue's channel, at most the worker timeout. A consumer
    whose prefetch window is full fetched nothing, and waits only FULL_WINDOW_POLL_SECONDS: a wake-up would not
    come for the messages already waiting in the queue."""

    def __init__(self, broker: WakingRedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        self._wakes: redis.client.PubSub | None = None
        self._idle = timeout / 1000
        if queue_name != dq_name(queue_name):  # not a delay queue
            self._wakes = broker.client.pubsub(ignore_subscribe_messages=True)
            try:
                self._wakes.subscribe(broker.wake_channel(queue_name))
            except redis.ConnectionError as exc:
                self.close()
                raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
            self.timeout = 0  # no sleep in the base class after an empty fetch: the wait is on the channel

    def __next__(self) -> Any:
        # With as many messages taken as it may prefetch, the base class fetches nothing and answers None: what the
        # queue holds does not matter until the worker acks one, and its acks are handled between two calls here.
        full = not self.message_cache and self.outstanding_message_count >= self.prefetch
        message = super().__next__()  # type: ignore[no-untyped-call]
        if message is None and full:
            time.sleep(FULL_WINDOW_POLL_SECONDS)
        elif message is None and self._wakes is not None:
            try:
                if self._wakes.get_message(timeout=self._idle) is not None:
                    while self._wakes.get_message(timeout=0.0) is not None:  # one fetch serves them all
                        pass
            except redis.ConnectionError as exc:
                raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        return message

    def ack(self, message: Any) -> None:
        super().ack(message)  # type: ignore[no-untyped-call]
        # The job's location is only read for QUEUED jobs: one left behind (Redis failing here) costs memory only.
        with contextlib.suppress(redis.RedisError):
            self.broker.forget(message)

    def nack(self, message: Any) -> None:
        super().nack(message)  # type: ignore[no-untyped-call]
        # Dead-lettered: a job still QUEUED with no location counts as lost, as with the location of a dead letter.
        with contextlib.suppress(redis.RedisError):
            self.broker.forget(message)

    def close(self) -> None:
        if self._wakes is not None:
            with contextlib.suppress(redis.RedisError):
                self._wakes.close()
            self._wakes = None
        super().close()


# What Dramatiq's consumer threads log when Redis goes away, and while it stays away.
_LOST = "Consumer encountered a connection error: %s"
_RESTARTING = "Restarting consumer in %0.2f seconds."
# The longest a Redis outage goes unmentioned in a worker's log after its first line.
OUTAGE_LOG_SECONDS = 30.0


class ConsumerOutage(logging.Filter):
    """Dramatiq's consumer threads log a lost Redis connection as CRITICAL, each of them (one per queue and delay
    queue), and again at every reconnection attempt, every 3 s while Redis is away; then an INFO line per restart.
    Nothing is lost and each consumer reconnects by itself, as the suite's own clients do, whose lines for the same
    outage are WARNINGs. With this filter on their loggers the loss is a WARNING at most once every `seconds` for
    the whole process, and the restarts are said at most as often. Other lines pass unchanged."""

    def __init__(self, seconds: float = OUTAGE_LOG_SECONDS) -> None:
        super().__init__()
        self._lost = Throttle(seconds)
        self._restarting = Throttle(seconds)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _LOST:
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            return self._lost.filter(record)
        if record.msg == _RESTARTING:
            return self._restarting.filter(record)
        return True


def quiet_consumer_outages(broker: Broker, seconds: float = OUTAGE_LOG_SECONDS) -> None:
    """Adds one ConsumerOutage to the logger of each consumer a worker on `broker` runs (every queue it declares,
    and their delay queues): call it once the actors are declared, before the worker starts."""
    outage = ConsumerOutage(seconds)
    for queue in (*broker.get_declared_queues(), *broker.get_declared_delay_queues()):
        logging.getLogger(f"dramatiq.worker.ConsumerThread({queue})").addFilter(outage)
