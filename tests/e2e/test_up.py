# ruff: noqa: F811  (pytest fixtures imported from tests/fixtures are parameters here)
"""`modelforge up` as users run it: a subprocess on embedded PostgreSQL and Redis, driven by the CLI and reflection."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from modelforge import InferenceClient, RegistryClient
from modelforge.oip.v2 import grpc_service_pb2, grpc_service_pb2_grpc
from modelforge_server import embedded
from tests.fixtures.onnx_models import ModelFile, add_one, build_counter, model_bytes, onnx_dir  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODELFORGE = Path(sys.executable).with_name("modelforge")
READY_LINE = "ModelForge is up."
START_TIMEOUT = 180.0


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Suite:
    process: subprocess.Popen[str]
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # stderr: the children's logs, and gRPC's own

    def wait_for(self, text: str, timeout: float) -> None:
        """Reads `up`'s stdout until a line contains `text`; fails if the process ends first."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"`modelforge up` printed no {text!r} within {timeout:.0f} s; it printed {self.seen}")
            if line is None:
                pytest.fail(
                    f"`modelforge up` exited with {self.process.wait()} before {text!r}; it printed {self.seen}"
                )
            self.seen.append(line)
            if text in line:
                return

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=120)


@dataclass
class Env:
    data_dir: Path
    registry: str
    inference: str
    jobs: str
    ports: list[int]

    def environ(self) -> dict[str, str]:
        # As a user's shell has it: without the tests' GRPC_ENABLE_FORK_SUPPORT (see tests/conftest.py).
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFORGE_") and not k.startswith("GRPC_")}
        env["MODELFORGE_DATA_DIR"] = str(self.data_dir)
        # Metrics have their own tests; here the default ports could be held by a suite already running.
        env["MODELFORGE_METRICS_PORT"] = "0"
        env["MODELFORGE_WORKER_METRICS_PORT"] = "0"
        env["MODELFORGE_REGISTRY_ADDRESS"] = self.registry
        env["MODELFORGE_INFERENCE_ADDRESS"] = self.inference
        env["MODELFORGE_JOBS_ADDRESS"] = self.jobs
        return env


@pytest.fixture
def env(tmp_path: Path) -> Env:
    ports = _free_ports(3)
    registry, inference, jobs = (f"127.0.0.1:{port}" for port in ports)
    return Env(tmp_path / "data", registry, inference, jobs, ports)


@contextmanager
def up(env: Env, extra: dict[str, str] | None = None, argv: tuple[str, ...] = ()) -> Iterator[Suite]:
    registry_port, inference_port, jobs_port = env.ports
    process = subprocess.Popen(
        [str(MODELFORGE), "up", "--registry-port", str(registry_port), "--inference-port", str(inference_port),
         "--jobs-port", str(jobs_port), *argv],
        env={**env.environ(), **(extra or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    suite = Suite(process)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            suite.lines.put(line.rstrip("\n"))
        suite.lines.put(None)

    def pump_errors() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            suite.errors.append(line)
            sys.stderr.write(line)  # still shown when a test fails

    readers = [threading.Thread(target=pump, daemon=True), threading.Thread(target=pump_errors, daemon=True)]
    for reader in readers:
        reader.start()
    try:
        suite.wait_for(READY_LINE, START_TIMEOUT)
        yield suite
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for reader in readers:
            reader.join(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def cli(env: Env, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MODELFORGE), *argv], env=env.environ(), capture_output=True, text=True, timeout=120, check=False
    )


def test_up_serves_the_suite_and_keeps_data_across_a_restart(env: Env, add_one: ModelFile, tmp_path: Path) -> None:
    with up(env) as suite:
        listening = {line.split()[0]: line.split()[-1] for line in suite.seen if " listening on " in line}
        assert listening["registry"] == env.registry, suite.seen

        pushed = cli(env, "models", "push", str(add_one.path), "--name", "demo", "--alias", "production")
        assert pushed.returncode == 0, pushed.stderr
        assert pushed.stdout.startswith("pushed demo:1 (production)")

        with grpc.insecure_channel(env.registry) as channel:
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"modelforge.registry.v1.RegistryService", "grpc.health.v1.Health"} <= services

        assert listening.get("inference") == env.inference, suite.seen
        with grpc.insecure_channel(env.inference) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="modelforge.inference.v1.InferenceService"), timeout=30
            )
            live = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                grpc_service_pb2.ServerLiveRequest(), timeout=30
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert live.live
        np.save(tmp_path / "x.npy", np.ones((2, 4), dtype=np.float32))
        predicted = cli(env, "predict", "demo@production", "--input", f"x={tmp_path / 'x.npy'}",
                        "--out", str(tmp_path / "out"))  # fmt: skip
        assert predicted.returncode == 0, predicted.stderr
        np.testing.assert_array_equal(np.load(tmp_path / "out" / "y.npy"), np.full((2, 4), 2, np.float32))

        assert listening.get("jobs") == env.jobs, suite.seen  # the jobs API and a worker process, both from `up`
        np.savez(tmp_path / "items.npz", x=np.ones((5, 4), dtype=np.float32))
        job = cli(env, "jobs", "submit", "demo", "--input", str(tmp_path / "items.npz"), "--wait")
        assert job.returncode == 0, job.stderr
        assert "COMPLETED: 5/5 items" in job.stdout

        # A worker that dies is started again; the suite stays up and runs jobs.
        (worker,) = [line for line in suite.seen if line.strip().startswith("jobs-worker") and "running (pid " in line]
        os.kill(int(worker.rsplit("pid ", 1)[1].rstrip(")")), signal.SIGKILL)
        suite.wait_for("jobs-worker exited with code -9; starting it again", 30)
        suite.wait_for("running (pid ", 30)
        again = cli(env, "jobs", "submit", "demo", "--input", str(tmp_path / "items.npz"), "--wait")
        assert again.returncode == 0, again.stderr
        assert "COMPLETED: 5/5 items" in again.stdout

        # So is a service, on its port; the others reconnect to it.
        (registry,) = [line for line in suite.seen if line.strip().startswith("registry") and "(pid " in line]
        os.kill(int(registry.split("(pid ", 1)[1].split(")")[0]), signal.SIGKILL)
        suite.wait_for("registry exited with code -9; starting it again (the others reconnect)", 30)
        suite.wait_for(f"serving again on {env.registry}", 60)
        shown = cli(env, "models", "show", "demo", "--json")
        assert shown.returncode == 0, shown.stderr
        after = cli(env, "jobs", "submit", "demo", "--input", str(tmp_path / "items.npz"), "--wait")
        assert after.returncode == 0, after.stderr
        assert "COMPLETED: 5/5 items" in after.stdout

        # So are the embedded Redis and PostgreSQL, on their data and where they were.
        (redis_line,) = [line for line in suite.seen if line.startswith("Redis: embedded at ")]
        redis_url = redis_line.split()[3].rstrip(",")
        with redis.Redis.from_url(redis_url) as client:
            os.kill(int(client.info("server")["process_id"]), signal.SIGKILL)
        suite.wait_for(f"Redis  serving again at {redis_url}", 60)
        postmaster = (env.data_dir / "postgres" / "postmaster.pid").read_text().split()[0]
        os.kill(int(postmaster), signal.SIGKILL)
        suite.wait_for("PostgreSQL  serving again at ", 60)
        afterwards = cli(env, "jobs", "submit", "demo", "--input", str(tmp_path / "items.npz"), "--wait")
        assert afterwards.returncode == 0, afterwards.stderr
        assert "COMPLETED: 5/5 items" in afterwards.stdout

        assert suite.stop() == 0
        suite.wait_for("modelforge up: stopped", 30)

    with up(env) as suite:
        listed = cli(env, "models", "show", "demo", "--json")
        assert listed.returncode == 0, listed.stderr
        assert '"production": 1' in listed.stdout
        assert add_one.sha256 in listed.stdout
        assert suite.stop() == 0
    # The embedded PostgreSQL's stop forks (pg_ctl as another user, under root); no gRPC thread of `up` may be
    # inside gRPC then, or gRPC logs that it skipped its fork handlers.
    assert not [line for line in suite.errors if "fork() handlers" in line]


def _loaded_on_a_new_connection(address: str) -> list[str]:
    """The versions the replica that a new connection to `address` lands on has loaded."""
    own = [("grpc.use_local_subchannel_pool", 1)]  # not one connection shared with the calls before
    with grpc.insecure_channel(address, options=own) as channel, InferenceClient(channel=channel) as client:
        return [f"{m.model}:{m.version}" for m in client.list_loaded()]


def test_inference_replicas_share_its_port_and_each_answers_alone_on_an_address_of_its_own(
    env: Env, add_one: ModelFile, tmp_path: Path
) -> None:
    # 16 connections from the worker: all on one replica in 2 of 65,536 starts (up's own default is 8N)
    with up(env, {"MODELFORGE_INFERENCE_CONNECTIONS": "16"}, argv=("--inference-replicas", "2")) as suite:
        replicas = {line.split()[0]: line for line in suite.seen if line.strip().startswith("inference")}
        assert sorted(replicas) == ["inference-1", "inference-2"], suite.seen
        assert all(f" listening on {env.inference} (shared), alone on unix-abstract:" in r for r in replicas.values())
        private = {name: line.rsplit(" ", 1)[1] for name, line in replicas.items()}
        pushed = cli(env, "models", "push", str(add_one.path), "--name", "demo")
        assert pushed.returncode == 0, pushed.stderr

        loaded = cli(env, "--inference", private["inference-2"], "models", "load", "demo")
        assert loaded.returncode == 0, loaded.stderr
        # New connections to the shared port land on either replica: only the second has loaded demo.
        answers = [_loaded_on_a_new_connection(env.inference) for _ in range(24)]
        assert sorted({tuple(a) for a in answers}) == [(), ("demo:1",)], answers
        np.save(tmp_path / "x.npy", np.ones((2, 4), dtype=np.float32))
        predicted = cli(env, "predict", "demo", "--input", f"x={tmp_path / 'x.npy'}", "--out", str(tmp_path / "out"))
        assert predicted.returncode == 0, predicted.stderr
        np.testing.assert_array_equal(np.load(tmp_path / "out" / "y.npy"), np.full((2, 4), 2, np.float32))

        # A job's batches reach both replicas: the worker takes turns over several connections.
        def served() -> list[int]:
            counts = []
            for address in private.values():
                with InferenceClient(address) as replica:
                    counts.append(sum(s.request_count for s in replica.statistics().models))
            return counts

        before = served()
        np.savez(tmp_path / "items.npz", x=np.ones((64, 4), dtype=np.float32))
        job = cli(env, "jobs", "submit", "demo", "--input", str(tmp_path / "items.npz"), "--batch-size", "1", "--wait")
        assert job.returncode == 0, job.stderr
        assert "COMPLETED: 64/64 items" in job.stdout
        batches = [after - earlier for after, earlier in zip(served(), before, strict=True)]
        assert min(batches) > 0 and sum(batches) == 64, batches

        # A replica that dies is started again on its own address, without what the old process had loaded.
        pid = int(replicas["inference-2"].split("(pid ", 1)[1].split(")")[0])
        os.kill(pid, signal.SIGKILL)
        suite.wait_for("inference-2 exited with code -9; starting it again", 30)
        suite.wait_for("inference-2  (pid ", 30)
        suite.wait_for(f"serving again on {env.inference}", 60)
        with InferenceClient(private["inference-2"]) as client:
            assert list(client.list_loaded()) == []
        assert suite.stop() == 0


def run_up(env: Env, *argv: str, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `modelforge up ARGV...` to its end (one that is refused before it starts anything), with `environ`
    over the test's environment."""
    return subprocess.run(
        [str(MODELFORGE), "up", *argv],
        env=env.environ() | (environ or {}),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


def up_registry(env: Env, port: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """Runs `modelforge up --only registry` on `port` to its end."""
    return run_up(env, "--registry-port", str(port), "--only", "registry", *argv)


def test_a_port_in_use_stops_up_with_a_clear_message(env: Env) -> None:
    registry_port = env.ports[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", registry_port))
        taken.listen()
        result = up_registry(env, registry_port)
    assert result.returncode == 1
    assert (
        f"port {registry_port} (registry) is in use by another process (or a connection still closing)" in result.stderr
    )
    assert "--registry-port" in result.stderr
    assert "PostgreSQL" not in result.stdout  # refused before anything started


@pytest.mark.parametrize(
    ("key", "use", "argv"),
    [
        ("MODELFORGE_METRICS_PORT", "registry metrics", ("--only", "registry")),
        ("MODELFORGE_WORKER_METRICS_PORT", "jobs-worker metrics", ()),
    ],
)
def test_a_metrics_port_in_use_stops_up_before_anything_starts(
    env: Env, key: str, use: str, argv: tuple[str, ...]
) -> None:
    registry_port, inference_port, jobs_port = env.ports
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_up(
            env, "--registry-port", str(registry_port), "--inference-port", str(inference_port),
            "--jobs-port", str(jobs_port), *argv, environ={key: str(port)},
        )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        f"modelforge up: port {port} ({use}) is in use by another process (or a connection still closing); stop it, "
        "or choose "
    )
    assert key in line
    assert result.stdout == ""  # no store or service was started


@pytest.mark.parametrize(
    ("argv", "clash"),
    [
        # Replica 2 serves /metrics 10 above the first (base + 11), where the ninth worker's count up reaches.
        (("--inference-replicas", "2", "--workers", "9"), (11, "inference 2 metrics and jobs-worker 9 metrics")),
        # The inference gRPC port set to where replica 2's metrics would go.
        (("--inference-replicas", "2", "--inference-port", "+11"), (11, "inference gRPC and inference 2 metrics")),
    ],
)
def test_two_of_the_suites_own_listeners_on_one_port_stop_up_before_anything_starts(
    env: Env, argv: tuple[str, ...], clash: tuple[int, str]
) -> None:
    base = _free_ports(1)[0] - 11  # base + 11 is free; the plan is refused whatever holds the others
    registry_port, inference_port, jobs_port = env.ports
    argv = tuple(str(base + int(a[1:])) if a.startswith("+") else a for a in argv)
    ports = {"--registry-port": registry_port, "--inference-port": inference_port, "--jobs-port": jobs_port}
    given = {flag: port for flag, port in ports.items() if flag not in argv}
    with socket.socket() as taken:  # the jobs API's metrics port, held by another process: the plan comes first
        with contextlib.suppress(OSError):  # already taken by something else: as good
            taken.bind(("127.0.0.1", base + 2))
            taken.listen()
        result = run_up(
            env, *(str(x) for pair in given.items() for x in pair), *argv,
            environ={"MODELFORGE_METRICS_PORT": str(base), "MODELFORGE_WORKER_METRICS_PORT": ""},
        )  # fmt: skip
    offset, uses = clash
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"modelforge up: port {base + offset} would serve both {uses}; choose other ports with ")
    assert result.stdout == ""  # no store or service was started


def test_replicas_of_a_service_that_does_not_run_are_refused(env: Env) -> None:
    result = up_registry(env, env.ports[0], "--inference-replicas", "3")
    assert result.returncode == 1
    assert "3 replicas of inference were asked for, but inference does not run here (--only)" in result.stderr


def test_a_second_up_on_the_same_data_dir_is_refused_before_anything_starts(env: Env) -> None:
    with up(env) as suite:
        ports = _free_ports(3)
        second = run_up(env, "--registry-port", str(ports[0]), "--inference-port", str(ports[1]),
                        "--jobs-port", str(ports[2]))  # fmt: skip
        assert second.returncode == 1, second.stdout + second.stderr
        assert second.stderr.strip() == (
            f"modelforge up: another `modelforge up` (pid {suite.process.pid}) runs on {env.data_dir}; stop it, "
            "or set MODELFORGE_DATA_DIR to another directory"
        )
        assert "PostgreSQL" not in second.stdout
        assert cli(env, "models", "ls").returncode == 0  # the first one serves on


@pytest.mark.parametrize(
    ("host", "says"),
    [("999.1.1.1", "Name or service not known"), ("10.99.99.99", "no address"), ("a..b", "an empty label")],
)
def test_a_host_that_is_not_this_machines_stops_up_before_anything_starts(env: Env, host: str, says: str) -> None:
    result = up_registry(env, env.ports[0], "--host", host)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"modelforge up: cannot listen on host {host!r}: ")
    assert says in line and "--host" in line
    assert "PostgreSQL" not in result.stdout  # refused before anything started


def test_a_port_held_by_another_grpc_server_stops_up_before_anything_starts(env: Env) -> None:
    # A gRPC server shares its port (SO_REUSEPORT) and answers health checks: up must not take it for its own.
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    registry_port = server.add_insecure_port(f"127.0.0.1:{env.ports[0]}")
    server.start()
    try:
        result = up_registry(env, registry_port)
    finally:
        server.stop(None)
    assert result.returncode == 1
    assert (
        f"port {registry_port} (registry) is in use by another process (or a connection still closing)" in result.stderr
    )
    assert "ModelForge is up" not in result.stdout


def test_a_worker_that_keeps_dying_at_start_stops_up(env: Env) -> None:
    with up(env) as suite:
        for kill in range(3):
            started = [
                line for line in suite.seen if line.strip().startswith("jobs-worker") and "running (pid " in line
            ]
            os.kill(int(started[-1].rsplit("pid ", 1)[1].rstrip(")")), signal.SIGKILL)  # well within 10 s of its start
            if kill < 2:
                suite.wait_for("jobs-worker exited with code -9; starting it again", 30)
                suite.wait_for("running (pid ", 30)
        suite.wait_for("jobs-worker exited with code -9, 3 times in a row within 10 s of starting; stopping", 30)
        assert suite.process.wait(timeout=120) == 1


def _service_children(pid: int) -> list[int]:
    """The `python -m modelforge_*` processes whose parent is `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The fields after the command name, which is in parentheses and may hold spaces.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
            if int(fields[1]) == pid and any(arg.startswith(b"modelforge_") for arg in argv):
                found.append(int(stat.parent.name))
    return found


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if embedded._alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_killed_up_leaves_nothing_running_and_the_next_up_starts_and_stops_cleanly(env: Env) -> None:
    # SIGKILLed, `up` used to leave every child serving (they run in sessions of their own), an embedded Redis that
    # the next `up` ran a second one beside on the same append-only file, and an embedded PostgreSQL that no
    # later `up` ever stopped again (pgserver kept counting the dead `up` as one of its users).
    env.data_dir.mkdir(parents=True)
    with up(env) as first:
        services = _service_children(first.process.pid)
        assert len(services) == 4  # registry, inference, jobs, one worker
        (redis_pid,) = embedded._redis_servers_in((env.data_dir / "redis").resolve())
        first.process.kill()
        first.process.wait()
        left = _wait_gone(services, timeout=60)  # each one stops once it sees `up` gone
        for pid in left:  # else they would hold `up`'s output open, and the next `up`'s ports
            os.kill(pid, signal.SIGKILL)
        assert left == []
    assert embedded._alive(redis_pid)  # embedded stores run on: the next `up` takes them over

    with up(env) as second:
        assert not embedded._alive(redis_pid)  # stopped before a new Redis started on its files
        (new_redis,) = embedded._redis_servers_in((env.data_dir / "redis").resolve())
        assert new_redis != redis_pid
        assert second.stop() == 0
    assert not embedded._alive(new_redis)
    assert not (env.data_dir / "postgres" / "postmaster.pid").exists()  # PostgreSQL stopped with the suite


def test_a_second_ctrl_c_stops_up_at_once_instead_of_waiting_out_the_grace_period(env: Env) -> None:
    with up(env, extra={"MODELFORGE_GRACE_SECONDS": "300"}) as suite:
        with RegistryClient(env.registry) as registry:
            registry.push(model_bytes(build_counter()), name="counter")
        endless = ThreadPoolExecutor(1)
        inference = InferenceClient(env.inference)
        try:
            # A run that does not end by itself: the first Ctrl-C's stop waits up to 300 s for it.
            steps = np.array([10**12])
            endless.submit(inference.predict, "counter", {"x": np.zeros(1, np.float32), "steps": steps})
            time.sleep(1.0)
            services = _service_children(suite.process.pid)
            suite.process.send_signal(signal.SIGINT)
            suite.wait_for("Ctrl-C again to stop at once", 60)
            suite.process.send_signal(signal.SIGINT)
            suite.process.wait(timeout=60)
            suite.wait_for("stopping now", 10)
            assert _wait_gone(services, timeout=10) == []
        finally:
            inference.close()
            endless.shutdown(wait=False, cancel_futures=True)


def _consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive ports free on 127.0.0.1 right now."""
    while True:
        base = _free_ports(1)[0]
        if base + count > 65536:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return base


def _serves_metrics(port: int, timeout: float = 60.0) -> bool:
    """Whether /metrics answers on `port` within `timeout` s (a worker serves it once it has booted, after `up` has
    announced it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                return response.status == 200 and b"# TYPE " in response.read()
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def test_metrics_port_flags_move_the_suites_metrics_over_the_variables(env: Env) -> None:
    base = _consecutive_free_ports(3)
    (worker,) = _free_ports(1)
    # env.environ() turns metrics off (MODELFORGE_METRICS_PORT=0 and MODELFORGE_WORKER_METRICS_PORT=0): the flags win.
    argv = ("--metrics-port", str(base), "--worker-metrics-port", str(worker))
    with up(env, argv=argv) as suite:
        for port in (base, base + 1, base + 2, worker):  # registry, inference, jobs, then the worker
            assert _serves_metrics(port), port
        assert suite.stop() == 0


def test_metrics_port_flags_are_in_the_help_and_refuse_a_port_out_of_range(env: Env) -> None:
    result = run_up(env, "--metrics-port", "65536")
    assert result.returncode == 2
    assert "--metrics-port: 65536 is out of range: give a number from 0 to 65535" in result.stderr
    shown = subprocess.run([str(MODELFORGE), "up", "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert "--metrics-port PORT" in shown.stdout and "--worker-metrics-port PORT" in shown.stdout
