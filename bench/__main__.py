"""`make bench`: starts the suite, uploads the models, measures everything in one run, writes docs/PERFORMANCE.md.

    python -m bench                       # the full run (about 6 minutes per run on 2 cores)
    python -m bench --quick               # a smoke run: short windows, nothing written unless --out is given
    python -m bench --runs 3              # medians of 3 runs
    python -m bench --only mlp,cache      # a subset: mlp cnn gen stream cache load jobs raw overhead
    python -m bench --sweep               # ONNX Runtime / compute thread settings, each on a fresh suite

The figures go to stdout as they come, and to --out (default docs/PERFORMANCE.md for a full run) between the
generated-section markers, so that hand-written analysis outside them survives a rerun.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import modelforge
from bench import cpus as cpu_sets
from bench import jobs as jobs_bench
from bench import raw, report, scenarios, transport
from bench.loadgen import BIDI, SERVER_STREAM, UNARY, Load, LoadGenerator
from bench.measure import Point, measure, median, median_point, ms
from bench.suite import Suite
from modelforge.inference.v1 import inference_pb2

SECTIONS = ("transport", "overhead", "raw", "mlp", "cnn", "gen", "stream", "cache", "load", "jobs")
MATRIX = ("mlp", "cnn", "gen")
# predict: Predict; v2: V2 ModelInfer; v2s: V2 ModelStreamInfer (one stream per caller); stream: PredictStream;
# v2shm: V2 ModelInfer with the output in system shared memory; v2sshm: the same through ModelStreamInfer (both the
# image generator only)
APIS = ("predict", "v2", "v2s", "stream", "v2shm", "v2sshm")


@dataclass
class Collected:
    """Everything measured, over all runs."""

    points: dict[tuple, list[Point]] = field(default_factory=lambda: defaultdict(list))
    raw: dict[str, list[raw.RawFigures]] = field(default_factory=lambda: defaultdict(list))
    cache_hits: list[bool] = field(default_factory=list)
    load_first: list[float] = field(default_factory=list)
    load_second: list[float] = field(default_factory=list)
    load_push: list[float] = field(default_factory=list)
    jobs: list[jobs_bench.JobFigures] = field(default_factory=list)
    job_overheads: list[float] = field(default_factory=list)
    jobs_error: str = ""
    notes: list[str] = field(default_factory=list)

    def add(self, point: Point) -> None:
        self.points[point.key].append(point)

    def medians(self) -> dict[tuple, Point]:
        return {key: median_point(points) for key, points in self.points.items()}


def _say(line: str = "") -> None:
    print(line, flush=True)


def _row(point: Point, note: str = "") -> None:
    errors = f"  ERRORS {point.errors} ({point.first_error})" if point.errors else ""
    _say(
        f"  {point.workload:<5} {point.api:<8} {'batched' if point.batching else 'single':<7} b={point.batch:<3} "
        f"c={point.concurrency:<3} {point.items_per_second:>9.1f} items/s  p50 {ms(point.p50):>7} ms  "
        f"p99 {ms(point.p99):>7} ms  {point.mb_per_second:>8.1f} MB/s  cores: server {point.server_cores:.2f} "
        f"client {point.client_cores:.2f} other {point.other_cores:.2f}{errors}{note}"
    )


def _model_name(workload: str, batching: bool) -> str:
    return f"bench-{workload}{'-batched' if batching else ''}"


# -- setting up --------------------------------------------------------------------------------------------------


def upload_models(suite: Suite, selected: list[scenarios.Workload], *, cache: bool) -> None:
    """Pushes every workload twice (batching off, on) and the cache variant, then loads each with one call."""
    with modelforge.RegistryClient(suite.registry) as registry, modelforge.InferenceClient(suite.inference) as infer:
        for workload in selected:
            for batching in (False, True):
                name = _model_name(workload.key, batching)
                registry.push(workload.file, name=name, labels=workload.batching if batching else {})
                outputs = infer.predict(name, workload.item)
                assert outputs, f"{name} answered no outputs"
        if cache:
            mlp = next(w for w in scenarios.workloads() if w.key == "mlp")
            registry.push(mlp.file, name="bench-mlp-cache", labels={scenarios.CACHE: "true"})
            infer.predict("bench-mlp-cache", mlp.item)


def _load(
    suite: Suite, api: str, model: str, inputs: dict[str, np.ndarray], workload: scenarios.Workload | None = None
) -> Load:
    if api in ("v2shm", "v2sshm"):
        assert workload is not None
        (output,) = workload.model.graph.output
        shared = (output.name, workload.output_bytes_per_item * len(next(iter(inputs.values()))))
        method, kind = (scenarios.MODEL_INFER, UNARY) if api == "v2shm" else (scenarios.MODEL_STREAM_INFER, BIDI)
        request = scenarios.model_infer_request(model, inputs)
        return Load(suite.inference, method, request, kind, shared_output=shared)
    if api == "predict":
        return Load(suite.inference, scenarios.PREDICT, scenarios.predict_request(model, inputs))
    if api == "v2":
        return Load(suite.inference, scenarios.MODEL_INFER, scenarios.model_infer_request(model, inputs))
    if api in ("stream", "stream-nosha"):
        request = scenarios.stream_request(model, inputs, sha256=api == "stream")
        return Load(suite.inference, scenarios.PREDICT_STREAM, request, SERVER_STREAM)
    if api == "v2s":
        return Load(suite.inference, scenarios.MODEL_STREAM_INFER, scenarios.model_infer_request(model, inputs), BIDI)
    raise ValueError(api)


def _measure(
    gen: LoadGenerator,
    load: Load,
    args: argparse.Namespace,
    server: tuple[int, ...],
    *,
    workload: str,
    api: str,
    concurrency: int,
    batching: bool = False,
    batch: int = 1,
) -> Point:
    """One point over the run's measured window (--duration) after its warm-up (--warmup)."""
    return measure(
        gen, load, workload=workload, api=api, batching=batching, concurrency=concurrency, batch=batch,
        duration=args.duration, warmup=args.warmup, server_pids=server,
    )  # fmt: skip


# -- the sections ----------------------------------------------------------------------------------------------


def run_overhead(
    gen: LoadGenerator, suite: Suite, args: argparse.Namespace, out: Collected, server: tuple[int, ...]
) -> None:
    """The cheapest call the inference service answers (V2 ServerLive): what the transport alone costs."""
    _say("load generator and transport cost: V2 ServerLive (no model, nothing to compute)")
    load = Load(suite.inference, scenarios.SERVER_LIVE, scenarios.server_live_request())
    for concurrency in (1, 16):
        point = _measure(gen, load, args, server, workload="-", api="live", concurrency=concurrency)
        out.add(point)
        _per_call_row(point)


def run_transport(gen: LoadGenerator, args: argparse.Namespace, out: Collected) -> None:
    """A bare grpc.aio server, no ModelForge code: what a unary call and a message on an open stream cost."""
    _say("bare grpc.aio server (no ModelForge code): a unary call against a message on an open stream")
    with transport.bare_server(args.server_cpus) as (address, pid):
        for api, load in (
            ("bare", Load(address, transport.UNARY, b"r" * 100)),
            ("bare-bidi", Load(address, transport.BIDI, b"r" * 100, BIDI)),
        ):
            for concurrency in (1, 16):
                point = _measure(gen, load, args, (pid,), workload="-", api=api, concurrency=concurrency)
                out.add(point)
                _per_call_row(point)


def _per_call_row(point: Point) -> None:
    rate = max(point.calls_per_second, 1e-9)
    _row(
        point,
        f"  | client {point.client_cores / rate * 1e6:.0f} µs CPU/call, server "
        f"{point.server_cores / rate * 1e6:.0f} µs CPU/call",
    )


def run_raw(selected: list[scenarios.Workload], args: argparse.Namespace, out: Collected) -> None:
    where = cpu_sets.describe(args.server_cpus)
    _say(f"raw ONNX Runtime in this process on CPUs {where} (the suite idle), by intra_op_num_threads")
    callers = args.compute_threads or cpu_sets.count(args.server_cpus)
    with cpu_sets.pinned(args.server_cpus):  # the sessions' thread pools start, and stay, on the suite's CPUs
        for workload in selected:
            for intra_op in (1, 2, 0):
                figures = raw.measure(
                    workload.file,
                    workload.item,
                    seconds=args.raw_seconds,
                    batch_sizes=workload.raw_batch_sizes,
                    threads=callers,
                    intra_op_threads=intra_op,
                )
                out.raw[f"{workload.key}/{intra_op}"].append(figures)
                _say(
                    f"  {workload.key:<5} intra_op={intra_op}  batch-1 p50 {ms(figures.p50_seconds)} ms "
                    f"p99 {ms(figures.p99_seconds)} ms  {figures.batch1_items_per_second:.1f} items/s sequential, "
                    f"{figures.threaded_items_per_second:.1f} items/s from {callers} threads; best batched "
                    f"{figures.best_items_per_second:.1f} items/s at batch {figures.best_batch_size}"
                )


def run_matrix(
    gen: LoadGenerator,
    suite: Suite,
    workload: scenarios.Workload,
    args: argparse.Namespace,
    out: Collected,
    server: tuple[int, ...],
) -> None:
    image_apis = ("predict", "v2", "v2shm", "v2sshm", "stream")
    apis: tuple[str, ...] = image_apis if workload.key == "gen" else ("predict", "v2", "v2s")
    apis = tuple(api for api in apis if api in args.apis)
    _say(f"{workload.title}: batch-1 requests")
    for api in apis:
        for batching in (False, True):
            load = _load(suite, api, _model_name(workload.key, batching), workload.item, workload)
            for concurrency in args.concurrency:
                point = _measure(
                    gen, load, args, server, workload=workload.key, api=api, batching=batching, concurrency=concurrency
                )
                out.add(point)
                _row(point)


def run_stream(
    gen: LoadGenerator, suite: Suite, args: argparse.Namespace, out: Collected, server: tuple[int, ...]
) -> None:
    workload = next(w for w in scenarios.workloads() if w.key == "gen")
    _say("PredictStream of batch-8 requests on the image generator (24 MiB of output per call), with and without")
    _say("the trailer's sha256 per output (skip_sha256)")
    for api in ("stream", "stream-nosha"):
        load = _load(suite, api, _model_name("gen", False), workload.batch(8))
        for concurrency in (1, 2, 4):
            point = _measure(gen, load, args, server, workload="gen", api=api, concurrency=concurrency, batch=8)
            out.add(point)
            _row(point)


def run_cache(
    gen: LoadGenerator, suite: Suite, args: argparse.Namespace, out: Collected, server: tuple[int, ...]
) -> None:
    workload = next(w for w in scenarios.workloads() if w.key == "mlp")
    request = scenarios.predict_request("bench-mlp-cache", workload.item, cache=True)
    with modelforge.InferenceClient(suite.inference) as client:
        for _ in range(2):  # the first may be the miss that fills the entry
            response = client.inference_stub.Predict(inference_pb2.PredictRequest.FromString(request), timeout=30)
        out.cache_hits.append(response.cache_hit)
        _say(
            f"prediction cache hits (MLP, Predict with CACHE_MODE_USE; the answer says cache_hit={response.cache_hit})"
        )
        loads = {
            "cache": Load(suite.inference, scenarios.PREDICT, request),
            # V2 requests use the cache of a version that enables it; the statistics tell whether they hit.
            "cache-v2s": _load(suite, "v2s", "bench-mlp-cache", workload.item),
        }
        for api, load in loads.items():
            hits_before = _cache_hits(client, "bench-mlp-cache")
            calls = 0
            for concurrency in (1, 16):
                point = _measure(gen, load, args, server, workload="mlp", api=api, concurrency=concurrency)
                calls += round(point.calls_per_second * args.duration)
                out.add(point)
                _row(point)
            hits = _cache_hits(client, "bench-mlp-cache") - hits_before
            out.cache_hits.append(hits >= calls)
            _say(f"  {api}: the service counted {hits:,} cache hits for the {calls:,} calls measured (and warm-ups)")


def _cache_hits(client: modelforge.InferenceClient, name: str) -> int:
    return sum(m.cache_hit_count for m in client.statistics(name).models)


def run_load(suite: Suite, args: argparse.Namespace, out: Collected) -> None:
    """Upload a fresh MLP version, then time the first Predict (resolve, download, session, warmup, run)."""
    workload = next(w for w in scenarios.workloads() if w.key == "mlp")
    request = inference_pb2.PredictRequest.FromString(scenarios.predict_request("x", workload.item))
    _say("model load: first Predict after the upload of a new MLP (nothing loaded, nothing cached)")
    with modelforge.RegistryClient(suite.registry) as registry, modelforge.InferenceClient(suite.inference) as client:
        stub = client.inference_stub
        for _ in range(args.load_repeats):
            name = f"bench-load-{uuid.uuid4().hex[:8]}"
            began = time.perf_counter()
            registry.push(workload.file, name=name)
            pushed = time.perf_counter()
            request.ref.name = name
            stub.Predict(request, timeout=30)
            first = time.perf_counter()
            stub.Predict(request, timeout=30)
            second = time.perf_counter()
            out.load_push.append(pushed - began)
            out.load_first.append(first - pushed)
            out.load_second.append(second - first)
            _say(
                f"  {name}: upload {ms(pushed - began)} ms, first Predict {ms(first - pushed)} ms, "
                f"second {ms(second - first)} ms"
            )


def run_jobs(
    gen: LoadGenerator, suite: Suite, args: argparse.Namespace, out: Collected, server: tuple[int, ...]
) -> None:
    workload = next(w for w in scenarios.workloads() if w.key == "mlp")
    name = _model_name("mlp", False)
    input_name, array = next(iter(workload.item.items()))
    _say("jobs: submit→RUNNING overhead of one-item jobs on an idle suite")
    try:
        overheads = jobs_bench.submit_overhead(suite.jobs, name, input_name, array, jobs=args.job_repeats)
        out.job_overheads += overheads
        _say(f"  create→start p50 {ms(median(overheads))} ms over {len(overheads)} jobs (max {ms(max(overheads))} ms)")
        _say(f"jobs: {args.job_items} MLP items in one job (batch {args.job_batch}) over an uploaded dataset")
        figures = jobs_bench.big_job(
            suite.jobs, name, input_name, array, items=args.job_items, batch_size=args.job_batch,
            timeout=600,
        )  # fmt: skip
        out.jobs.append(figures)
        _say(
            f"  {figures.items_per_second:.0f} items/s while RUNNING ({figures.run_seconds:.2f} s), "
            f"{figures.wall_items_per_second:.0f} items/s from CreateJob to COMPLETED ({figures.wall_seconds:.2f} s); "
            f"dataset upload {figures.upload_seconds:.2f} s"
        )
    except Exception as exc:  # the jobs service is measured when it works end to end, and said when it does not
        out.jobs_error = f"{type(exc).__name__}: {exc}"
        _say(f"  jobs path failed: {out.jobs_error}")
    _say(f"inference service, same model: Predict of batch-{args.job_batch} requests (what a job's batches are)")
    load = _load(suite, "predict", name, workload.batch(args.job_batch))
    for concurrency in (1, 4):
        point = _measure(
            gen, load, args, server, workload="mlp", api="predict", concurrency=concurrency, batch=args.job_batch
        )
        out.add(point)
        _row(point)


# -- the run -----------------------------------------------------------------------------------------------------


def suite_settings(args: argparse.Namespace) -> dict[str, str]:
    settings: dict[str, str] = {"MODELFORGE_ALLOW_CLIENT_SHM": "true"}  # the v2shm rows register regions
    if args.intra_op_threads is not None and args.intra_op_threads >= 0:
        settings["MODELFORGE_INTRA_OP_THREADS"] = str(args.intra_op_threads)
    if args.compute_threads is not None:
        settings["MODELFORGE_COMPUTE_THREADS"] = str(args.compute_threads)
    if args.inference_replicas > 1:
        settings["MODELFORGE_SHARE_PORT"] = "true"
    return settings


def one_run(index: int, args: argparse.Namespace, out: Collected) -> None:
    selected = [w for w in scenarios.workloads() if w.key in args.only]
    load_all = [
        w
        for w in scenarios.workloads()
        if w.key in args.only or (w.key == "mlp" and args.needs_mlp) or (w.key == "gen" and "stream" in args.only)
    ]
    _say(f"== run {index + 1} of {args.runs}: starting the suite ({' '.join(args.settings_text) or 'defaults'})")
    began = time.perf_counter()
    suite = Suite.start(suite_settings(args), workers=1, cpus=args.server_cpus)
    try:
        _say(f"   up in {time.perf_counter() - began:.1f} s: registry {suite.registry}, inference {suite.inference}")
        if args.inference_replicas > 1:
            suite.add_inference_replicas(args.inference_replicas - 1, cpus=args.server_cpus)
        server = suite.inference_pids()
        if "load" in args.only:
            run_load(suite, args, out)  # first: nothing else is loaded or cached yet
        upload_models(suite, load_all, cache="cache" in args.only)
        with LoadGenerator(args.client_processes, args.client_cpus, args.connections) as gen:
            if "transport" in args.only:
                run_transport(gen, args, out)
            if "overhead" in args.only:
                run_overhead(gen, suite, args, out, server)
            if "raw" in args.only and index == 0 or "raw" in args.only and args.raw_every_run:
                run_raw(selected or load_all, args, out)
            for workload in selected:
                run_matrix(gen, suite, workload, args, out, server)
            if "stream" in args.only:
                run_stream(gen, suite, args, out, server)
            if "cache" in args.only:
                run_cache(gen, suite, args, out, server)
            if "jobs" in args.only:
                run_jobs(gen, suite, args, out, server)
        suite.inference_pids()  # every replica served to the end
        for line in suite.drain_log():
            if "WARNING" in line or "ERROR" in line:
                out.notes.append(line)
    finally:
        suite.stop()


def sweep(args: argparse.Namespace) -> list[tuple[str, list[Point]]]:
    """Key points under several thread settings, each on a fresh suite."""
    combos = [(0, 0), (1, 1), (1, 2), (1, 4), (2, 1)]
    workloads = {w.key: w for w in scenarios.workloads()}
    results: list[tuple[str, list[Point]]] = []
    for intra, compute in combos:
        args.intra_op_threads, args.compute_threads = intra, compute
        label = f"intra_op_threads={intra} compute_threads={compute}"
        _say(f"== {label}")
        suite = Suite.start(suite_settings(args), cpus=args.server_cpus)
        points: list[Point] = []
        try:
            server = suite.inference_pids()
            upload_models(suite, list(workloads.values()), cache=False)
            with LoadGenerator(args.client_processes, args.client_cpus, args.connections) as gen:
                for key, api, batching, concurrency in (
                    ("mlp", "v2", False, 1),
                    ("mlp", "v2", False, 16),
                    ("mlp", "v2", True, 16),
                    ("cnn", "v2", True, 64),
                    ("gen", "v2", False, 4),
                ):
                    load = _load(suite, api, _model_name(key, batching), workloads[key].item)
                    point = _measure(
                        gen, load, args, server, workload=key, api=api, batching=batching, concurrency=concurrency
                    )
                    points.append(point)
                    _row(point)
        finally:
            suite.stop()
        results.append((label, points))
    return results


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "")
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import grpc
    import onnxruntime

    return {
        "cores (nproc)": str(os.cpu_count()),
        "CPU": model,
        "memory": memory,
        "Python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "services' event loop": _event_loop(),
        "ModelForge commit": _commit(),
        "load average before the run": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def _event_loop() -> str:
    """The loop the suite's processes run on (they take uvloop when installed; MODELFORGE_EVENT_LOOP is not passed)."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return f"uvloop {uvloop.__version__}"


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "services", "clients"], capture_output=True,
                               text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + (" (services or SDK modified)" if dirty.stdout.strip() else "")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows for a smoke run")
    parser.add_argument("--duration", type=float, help="seconds measured per point (default 3, quick 0.8)")
    parser.add_argument("--warmup", type=float, help="seconds of load before each window (default 1, quick 0.3)")
    parser.add_argument("--runs", type=int, default=1, help="runs to take medians over (default 1)")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    parser.add_argument("--concurrency", default="1,4,16,64", help="concurrencies of the matrix (default 1,4,16,64)")
    parser.add_argument("--apis", default=",".join(APIS), help=f"APIs of the matrix (default all: {', '.join(APIS)})")
    parser.add_argument(
        "--out", help="the report to write (default docs/PERFORMANCE.md, none for --quick); '-' writes nothing"
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="MODELFORGE_INTRA_OP_THREADS for the suite (default 1: on 2 cores the service's default, 0, spins "
        "ONNX Runtime's pool and doubles the CPU per call; see --sweep); -1 leaves the service's default",
    )
    parser.add_argument("--compute-threads", type=int, help="MODELFORGE_COMPUTE_THREADS for the suite")
    parser.add_argument("--client-processes", type=int, default=2, help="load generator processes (default 2)")
    parser.add_argument(
        "--server-cpus",
        help="CPU list (as taskset takes it, e.g. 0-1) for the suite, the bare transport server and raw ONNX Runtime",
    )
    parser.add_argument("--client-cpus", help="CPU list for the load generator's processes (e.g. 2-9)")
    parser.add_argument(
        "--inference-replicas",
        type=int,
        default=1,
        help="inference processes sharing the inference port (MODELFORGE_SHARE_PORT; default 1): the suite's own "
        "and the rest started beside it, on --server-cpus",
    )
    parser.add_argument(
        "--connections",
        type=int,
        help="connections (channels) each load generator process deals its callers over (default 1, or twice "
        "--inference-replicas: the kernel spreads connections, not calls, over replicas)",
    )
    parser.add_argument("--sweep", action="store_true", help="measure key points under several thread settings")
    parser.add_argument("--job-items", type=int, default=100_000, help="items of the big job (default 100000)")
    parser.add_argument("--job-batch", type=int, default=256, help="batch size of the big job (default 256)")
    args = parser.parse_args(argv)
    if args.inference_replicas < 1:
        parser.error("--inference-replicas takes 1 or more")
    args.connections = args.connections or (1 if args.inference_replicas == 1 else 2 * args.inference_replicas)
    try:
        args.server_cpus = cpu_sets.parse(args.server_cpus) if args.server_cpus else None
        args.client_cpus = cpu_sets.parse(args.client_cpus) if args.client_cpus else None
    except ValueError as exc:
        parser.error(str(exc))
    args.duration = args.duration or (0.8 if args.quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0)
    args.raw_seconds = 0.3 if args.quick else 1.0
    args.raw_every_run = True
    args.load_repeats = 1 if args.quick else 3
    args.job_repeats = 5 if args.quick else 20
    if args.quick and args.job_items == 100_000:
        args.job_items = 10_000
    only = [s.strip() for s in (args.only or ",".join(SECTIONS)).split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    args.only = only
    args.needs_mlp = bool({"cache", "load", "jobs"} & set(only))
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.apis = [a.strip() for a in args.apis.split(",") if a.strip()]
    if set(args.apis) - set(APIS):
        parser.error(f"unknown APIs {', '.join(sorted(set(args.apis) - set(APIS)))}; choose from {', '.join(APIS)}")
    if args.out is None and not args.quick:
        args.out = "docs/PERFORMANCE.md"
    elif args.out == "-":  # print only
        args.out = None
    args.settings_text = [f"{k}={v}" for k, v in suite_settings(args).items()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    info = machine()
    info["CPUs of the suite and raw ONNX Runtime"] = cpu_sets.describe(args.server_cpus)
    info["CPUs of the load generator"] = cpu_sets.describe(args.client_cpus)
    info["inference processes"] = str(args.inference_replicas)
    load = info["load average before the run"]
    _say(f"ModelForge benchmark on {info['cores (nproc)']} cores ({info['CPU']}), load average {load}")
    if args.sweep:
        results = sweep(args)
        if args.out:
            report.write_sweep(Path(args.out), results, command=command.strip(), machine=info, args=args)
        return 0
    out = Collected()
    for index in range(args.runs):
        one_run(index, args, out)
    after = " ".join(f"{v:.2f}" for v in os.getloadavg())
    info["load average after the run"] = after
    text = report.render(out, args=args, command=command.strip(), machine=info)
    _say()
    _say(text)
    if args.out:
        report.write(Path(args.out), text)
        _say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
