"""Log lines: JSON or text by destination, the service and trace context on every line, no payloads."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from modelforge_server import handlers, logs

# A provider of the test's own: spans become current without touching the process-wide provider.
TRACER = TracerProvider().get_tracer("modelforge.test")
UNSAMPLED = TracerProvider(sampler=ALWAYS_OFF).get_tracer("modelforge.test")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, with its handlers and level put back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_lines_are_json_with_the_service_when_the_output_is_not_a_terminal(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logs.configure("modelforge-registry", "info", stream=stream)
    logging.getLogger("modelforge.registry").info("model %s created", "resnet")
    logging.getLogger("modelforge.registry").debug("not at INFO")

    (line,) = json_lines(stream)
    assert line["service"] == "modelforge-registry"
    assert line["level"] == "INFO"
    assert line["message"] == "model resnet created"
    assert "trace_id" not in line


def test_lines_are_text_on_a_terminal(root_logger: logging.Logger) -> None:
    stream = Terminal()
    logs.configure("modelforge-jobs", "DEBUG", stream=stream)
    with logs.bind(job_id="0b5e"):
        logging.getLogger("modelforge.jobs").debug("job started")

    text = stream.getvalue()
    assert "modelforge-jobs" in text and "job started" in text and "job_id=0b5e" in text
    assert not text.lstrip().startswith("{")


def test_a_line_inside_a_span_carries_its_trace_and_span_ids(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logs.configure("modelforge-inference", stream=stream)
    with TRACER.start_as_current_span("Predict") as span:
        logging.getLogger("modelforge.inference").info("predicting")

    (line,) = json_lines(stream)
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert line["span_id"] == format(span.get_span_context().span_id, "016x")
    assert line["service"] == "modelforge-inference"


def test_a_line_inside_a_span_not_sampled_carries_no_trace_id(root_logger: logging.Logger) -> None:
    """No collector has that trace (MODELFORGE_TRACE_SAMPLE_RATIO left it out): an id would lead nowhere."""
    stream = io.StringIO()
    logs.configure("modelforge-inference", stream=stream)
    with UNSAMPLED.start_as_current_span("Predict") as span:
        assert span.get_span_context().is_valid
        logging.getLogger("modelforge.inference").info("predicting")

    (line,) = json_lines(stream)
    assert "trace_id" not in line and "span_id" not in line


def test_bound_fields_and_extra_appear_on_every_line_in_the_block(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logs.configure("modelforge-jobs", stream=stream)
    log = logging.getLogger("modelforge.jobs")
    with logs.bind(job_id="job-7", model="resnet:3"):
        log.info("batch done", extra={"items": 32})
        with logs.bind(model="resnet:4"):
            log.info("switched")
    log.info("outside")

    first, second, outside = json_lines(stream)
    assert (first["job_id"], first["model"], first["items"]) == ("job-7", "resnet:3", 32)
    assert (second["job_id"], second["model"]) == ("job-7", "resnet:4")
    assert "job_id" not in outside and "model" not in outside


def test_payloads_are_never_written(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logs.configure("modelforge-inference", stream=stream)
    tensor = np.full((4, 4), 7.25, dtype=np.float32)
    logging.getLogger("modelforge.inference").info(
        "request refused", extra={"input": tensor, "raw": tensor.tobytes(), "note": "x" * 10_000}
    )

    (line,) = json_lines(stream)
    assert line["input"] == "<array of 64 bytes>"
    assert line["raw"] == "<64 bytes>"
    assert len(line["note"]) < 600
    assert "7.25" not in stream.getvalue()


def test_at_debug_grpc_writes_no_line_per_call(root_logger: logging.Logger) -> None:
    """gRPC logs a DEBUG line on every RPC; a service at DEBUG leaves them out and keeps its own."""
    quiet = logging.getLogger("grpc._cython.cygrpc")
    level = quiet.level
    out = io.StringIO()
    try:
        logs.configure("registry", "DEBUG", stream=out)
        quiet.debug("[_cygrpc] Loaded running loop: id(loop)=1")
        quiet.info("a line gRPC writes at INFO")
        logging.getLogger("modelforge.registry").debug("our own line")
    finally:
        quiet.setLevel(level)
    assert [line["message"] for line in json_lines(out)] == ["a line gRPC writes at INFO", "our own line"]


def test_a_throttled_logger_passes_one_line_per_interval(root_logger: logging.Logger) -> None:
    """A trace collector that is down: its exporter logs each failed export, every few seconds."""
    stream = io.StringIO()
    logs.configure("modelforge-registry", stream=stream)
    now = [0.0]
    noisy = logging.getLogger("modelforge.test.noisy")
    throttle = logs.Throttle(60.0, clock=lambda: now[0])
    noisy.addFilter(throttle)
    try:
        for second in (0.0, 5.0, 30.0, 59.9, 60.0, 61.0, 125.0):
            now[0] = second
            noisy.error("failed to export at %s", second)
    finally:
        noisy.removeFilter(throttle)
    assert [line["message"] for line in json_lines(stream)] == [
        "failed to export at 0.0",
        "failed to export at 60.0",
        "failed to export at 125.0",
    ]


def test_a_throttle_reset_once_a_failure_is_over_lets_the_next_one_be_said_at_once() -> None:
    now = [0.0]
    throttle = logs.Throttle(60.0, clock=lambda: now[0])
    assert throttle.due() and not throttle.due()  # said when it starts, then quiet
    now[0] = 10.0
    throttle.reset()  # it ended; another begins
    assert throttle.due() and not throttle.due()


def test_an_answer_grpc_could_not_send_is_an_info_line_not_an_error(root_logger: logging.Logger) -> None:
    """gRPC logs an ERROR with a traceback when a unary answer's send fails because the call ended (its client
    cancelled it) before gRPC heard so: a worker's call cancelled with its job made one in the inference log."""
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    level = grpc_log.level
    out = io.StringIO()

    def unsent() -> None:
        try:
            raise RuntimeError('Failed "execute_batch"')  # as grpc's ExecuteBatchError
        except RuntimeError:
            grpc_log.exception("ExecuteBatchError raised in core by servicer method [%s]", "/m.v1.S/Predict")

    try:
        logs.configure("inference", "INFO", stream=out)
        handlers.quiet_unsent_answers()
        handlers.quiet_unsent_answers()  # once per process, however many servers
        unsent()
        grpc_log.error("another failure of gRPC's")
        logs.configure("inference", "WARNING", stream=out)
        unsent()  # an INFO line, below the level
    finally:
        grpc_log.setLevel(level)
        for added in [f for f in grpc_log.filters if isinstance(f, handlers.Unsent)]:
            grpc_log.removeFilter(added)
    lines = json_lines(out)
    assert [(line["level"], line["message"]) for line in lines] == [
        ("INFO", "the answer of /m.v1.S/Predict was not sent: the call had ended (its client cancelled it or its "
         "deadline passed)"),
        ("ERROR", "another failure of gRPC's"),
    ]  # fmt: skip
    assert "exception" not in lines[0] and "traceback" not in json.dumps(lines[0]).lower()
