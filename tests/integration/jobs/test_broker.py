"""The jobs broker on a real Redis: an idle consumer wakes when a message is sent, not at its next poll."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import dramatiq
import dramatiq.worker
import pytest
from dramatiq.common import dq_name
from opentelemetry import trace

from modelforge_jobs.actors import JobQueue
from modelforge_jobs.broker import WakingRedisBroker, quiet_consumer_outages
from modelforge_jobs.domain import Priority
from modelforge_server import telemetry

HOUR_MS = 3_600_000


def test_an_idle_consumer_takes_a_message_sent_long_before_its_next_poll(redis_url: str) -> None:
    broker = WakingRedisBroker(url=redis_url, namespace=f"test-{uuid.uuid4().hex[:8]}")
    try:
        actor = dramatiq.Actor(
            lambda n: None, broker=broker, actor_name="noop", queue_name="wake", priority=0, options={}
        )
        # A fallback poll of an hour: only the wake-up can deliver the message while the test waits.
        consumer = broker.consume("wake", prefetch=1, timeout=HOUR_MS)
        taken: list[dramatiq.MessageProxy] = []

        def consume() -> None:
            for message in consumer:
                if message is not None:
                    taken.append(message)
                    return

        assert next(consumer) is None  # the queue is empty: one fetch, then the consumer waits on the channel
        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        actor.send(1)
        thread.join(timeout=30)
        assert [m.args for m in taken] == [(1,)]
        consumer.ack(taken[0])
        consumer.close()
    finally:
        broker.close()


def test_delay_queues_keep_polling(redis_url: str) -> None:
    broker = WakingRedisBroker(url=redis_url, namespace=f"test-{uuid.uuid4().hex[:8]}")
    try:
        dramatiq.Actor(lambda n: None, broker=broker, actor_name="noop", queue_name="wake", priority=0, options={})
        consumer = broker.consume(dq_name("wake"), prefetch=1, timeout=10)
        assert next(consumer) is None  # a short poll, no channel to wait on
        consumer.close()
    finally:
        broker.close()


def test_a_consumer_with_a_full_prefetch_window_looks_again_at_once_rather_than_waiting_for_a_wake_up(
    redis_url: str,
) -> None:
    """A backlog is taken as fast as the worker acks (its acks are handled between two looks), not one window per
    fallback poll: a full window fetched nothing, and no wake-up comes for messages already waiting."""
    broker = WakingRedisBroker(url=redis_url, namespace=f"test-{uuid.uuid4().hex[:8]}")
    try:
        actor = dramatiq.Actor(
            lambda n: None, broker=broker, actor_name="noop", queue_name="wake", priority=0, options={}
        )
        for n in range(3):
            actor.send(n)
        consumer = broker.consume("wake", prefetch=1, timeout=HOUR_MS)
        first = next(consumer)
        assert first is not None and first.args == (0,)
        assert next(consumer) is None  # the window is full (its first wait ends on the channel's subscription)
        looked: list[float] = []

        def look() -> None:
            started = time.monotonic()
            assert next(consumer) is None  # still full: nothing fetched
            looked.append(time.monotonic() - started)

        thread = threading.Thread(target=look, daemon=True)
        thread.start()
        thread.join(timeout=10)
        assert looked and looked[0] < 1.0, "a consumer with a full window waited for a wake-up"
        consumer.ack(first)
        second = next(consumer)
        assert second is not None and second.args == (1,)
        consumer.ack(second)
        consumer.close()
    finally:
        broker.close()


def test_a_jobs_latest_message_is_known_until_it_is_acknowledged_or_dead_lettered(redis_url: str) -> None:
    broker = WakingRedisBroker(url=redis_url, namespace=f"test-{uuid.uuid4().hex[:8]}")
    try:
        actor = dramatiq.Actor(
            lambda job: None, broker=broker, actor_name="run", queue_name="jobs", priority=0, options={}
        )
        consumer = broker.consume("jobs", prefetch=2, timeout=10)
        actor.send("done")
        actor.send("dead")
        assert broker.held_jobs(["done", "dead", "never-sent"]) == {"done", "dead"}
        taken = {message.args[0]: message for message in _take(consumer, 2)}
        assert broker.held_jobs(["done", "dead"]) == {"done", "dead"}  # taken, not acknowledged: still held
        consumer.ack(taken["done"])
        consumer.nack(taken["dead"])  # to the dead-letter queue: lost to the job
        assert broker.held_jobs(["done", "dead"]) == set()
        assert broker.client.hlen(broker.messages_key) == 0  # nothing left behind for either
        consumer.close()
    finally:
        broker.close()


def _take(consumer: dramatiq.Consumer, count: int) -> list[dramatiq.MessageProxy]:
    taken: list[dramatiq.MessageProxy] = []
    deadline = time.monotonic() + 30
    while len(taken) < count and time.monotonic() < deadline:
        message = next(consumer)
        if message is not None:
            taken.append(message)
    return taken


async def test_a_message_sent_again_carries_the_trace_it_is_given_not_the_senders(redis_url: str) -> None:
    broker = WakingRedisBroker(url=redis_url, namespace=f"test-{uuid.uuid4().hex[:8]}")
    try:
        actors = {
            priority: dramatiq.Actor(
                lambda job_id, **kwargs: None,
                broker=broker,
                actor_name=f"run-{priority.name}",
                queue_name=f"jobs-{priority.name}",
                priority=0,
                options={},
            )
            for priority in Priority
        }
        queue = JobQueue(actors)
        created = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        current = trace.SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=trace.TraceFlags(1))
        with trace.use_span(trace.NonRecordingSpan(current)):  # the maintenance pass's own context, were it traced
            assert telemetry.inject()["traceparent"] != created["traceparent"]
            await queue.send(uuid.uuid4(), Priority.NORMAL, trace=created)
        consumer = broker.consume("jobs-NORMAL", prefetch=1, timeout=1000)
        message = next(message for message in consumer if message is not None)
        assert message.kwargs["trace"] == created  # the run continues CreateJob's trace
        consumer.ack(message)
        consumer.close()
    finally:
        broker.close()


class _Seen(logging.Filter):
    """Counts the records a logger gets, before any later filter of it drops them."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.count += 1
        return True


def test_redis_out_of_reach_is_one_warning_for_every_consumer_not_a_critical_line_each_retry(
    closed_port: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dramatiq.worker, "CONSUMER_RESTART_DELAY_SECS", 0.05)  # Dramatiq's is 3 s: rounds come fast
    broker = WakingRedisBroker(url=f"redis://127.0.0.1:{closed_port}/0", namespace=f"test-{uuid.uuid4().hex[:8]}")
    for queue in ("one", "two"):
        dramatiq.Actor(lambda n: None, broker=broker, actor_name=queue, queue_name=queue, priority=0, options={})
    queues = ("one", "two", dq_name("one"), dq_name("two"))
    seen = _Seen()  # before the filter under test, so that it sees what Dramatiq logs
    loggers = [logging.getLogger(f"dramatiq.worker.ConsumerThread({queue})") for queue in queues]
    for logger in loggers:
        logger.addFilter(seen)
    quiet_consumer_outages(broker)
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    try:
        with caplog.at_level(logging.INFO, logger="dramatiq"):
            worker.start()
            deadline = time.monotonic() + 30
            while seen.count < 8 * len(queues) and time.monotonic() < deadline:  # four rounds of each consumer
                time.sleep(0.01)
            worker.stop()
    finally:
        for logger in loggers:
            logger.filters.clear()
        broker.close()
    assert seen.count >= 8 * len(queues)
    consumers = [r for r in caplog.records if r.name.startswith("dramatiq.worker.ConsumerThread(")]
    assert [(r.levelname, r.getMessage().split(":")[0]) for r in consumers if "connection error" in r.msg] == [
        ("WARNING", "Consumer encountered a connection error")
    ]
    assert len([r for r in consumers if r.msg.startswith("Restarting consumer")]) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
