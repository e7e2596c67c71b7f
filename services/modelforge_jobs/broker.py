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
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import dq_name
from dramatiq.errors import ConnectionClosed


class WakingRedisBroker(RedisBroker):
    """A RedisBroker that announces each immediate send on the queue's wake channel."""

    def __init__(self, *, url: str, namespace: str, heartbeat_timeout: float = 30.0) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            url=url, namespace=namespace, heartbeat_timeout=round(heartbeat_timeout * 1000)
        )
        self._forced = threading.local()  # set while recover_messages runs, in its thread only

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
        if delay is None:
            # The message is stored; a lost wake-up only delays it to the consumers' fallback poll.
            with contextlib.suppress(redis.RedisError):
                self.client.publish(self.wake_channel(sent.queue_name), b"")
        return sent

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        return _WakingConsumer

    def close(self) -> None:
        """Closes the broker's Redis connections too (Dramatiq's RedisBroker leaves them to the collector)."""
        super().close()
        self.client.connection_pool.disconnect()


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

    def close(self) -> None:
        if self._wakes is not None:
            with contextlib.suppress(redis.RedisError):
                self._wakes.close()
            self._wakes = None
        super().close()
