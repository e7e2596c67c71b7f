"""The suite under test: `modelforge up` in a subprocess on a temporary data directory and free ports.

PostgreSQL and Redis are the embedded ones unless MODELFORGE_DATABASE_URL / MODELFORGE_REDIS_URL are set; every
other MODELFORGE_* variable of the caller is dropped so that the figures depend only on what the benchmark sets
(and records). The processes' CPU time is read from /proc, so that each measurement can say where the machine's
cores went: the inference service, the load generator, or something else.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import cpus as cpu_sets
from modelforge_server import orphans

READY_LINE = "ModelForge is up."
_KEEP = ("MODELFORGE_DATABASE_URL", "MODELFORGE_REDIS_URL")
_TICKS = os.sysconf("SC_CLK_TCK")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process and its threads; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over cores, from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return (total - idle) / _TICKS, total / _TICKS


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Suite:
    """A running `modelforge up`. Start with `Suite.start(settings)`; `stop()` shuts it down in order."""

    process: subprocess.Popen[str]
    data_dir: Path
    registry: str
    inference: str
    jobs: str
    settings: dict[str, str]
    owns_data_dir: bool
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    log: list[str] = field(default_factory=list)
    replicas: list[subprocess.Popen[str]] = field(default_factory=list)

    @classmethod
    def start(
        cls, settings: dict[str, str], *, workers: int = 1, cpus: frozenset[int] | None = None, timeout: float = 240.0
    ) -> Suite:
        """Starts the suite with `settings` (MODELFORGE_* variables), all its processes on `cpus` (None: any), and
        returns once it says it is up."""
        data_dir = Path(tempfile.mkdtemp(prefix="modelforge-bench-"))
        ports = free_ports(3)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFORGE_") or k in _KEEP}
        env.update(settings)
        env["MODELFORGE_DATA_DIR"] = str(data_dir)
        env.setdefault("MODELFORGE_LOG_LEVEL", "WARNING")
        env.setdefault("MODELFORGE_METRICS_PORT", "0")  # no /metrics listener: none can clash with another suite
        env["PYTHONUNBUFFERED"] = "1"
        command = [
            str(Path(sys.executable).with_name("modelforge")),
            "up",
            "--registry-port",
            str(ports[0]),
            "--inference-port",
            str(ports[1]),
            "--jobs-port",
            str(ports[2]),
            "--workers",
            str(workers),
        ]
        process = _start(command, env, cpus)
        suite = cls(
            process=process,
            data_dir=data_dir,
            registry=f"127.0.0.1:{ports[0]}",
            inference=f"127.0.0.1:{ports[1]}",
            jobs=f"127.0.0.1:{ports[2]}",
            settings=dict(settings),
            owns_data_dir=True,
        )
        threading.Thread(target=suite._pump, daemon=True).start()
        try:
            suite._wait_for(READY_LINE, timeout)
        except BaseException:
            suite.stop()
            raise
        return suite

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"`modelforge up` did not print {text!r} within {timeout:.0f} s") from None
            if line is None:
                tail = "\n".join(self.log[-30:])
                raise RuntimeError(f"`modelforge up` exited with {self.process.wait()} while starting:\n{tail}")
            self.log.append(line)
            if text in line:
                return

    def drain_log(self) -> list[str]:
        """Lines the suite printed since the last call (warnings and errors: it logs at WARNING)."""
        out = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return out
            if line is None:
                return out
            self.log.append(line)
            out.append(line)

    def pid_of(self, module: str) -> int | None:
        """The pid of the child running `python -m module` (e.g. modelforge_inference)."""
        for pid in _children(self.process.pid):
            if f"-m {module}" in _cmdline(pid) and f"-m {module}." not in _cmdline(pid):
                return pid
        return None

    def add_inference_replicas(self, count: int, *, cpus: frozenset[int] | None = None, timeout: float = 60) -> None:
        """Starts `count` more inference processes on the inference port, beside the suite's own, which must have
        been started with MODELFORGE_SHARE_PORT=true; each runs with its environment, on `cpus` (None: any)."""
        pid = self.pid_of("modelforge_inference")
        if pid is None:
            raise RuntimeError("the suite runs no inference service to add replicas to")
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if b"=" in item)
        if env.get("MODELFORGE_SHARE_PORT") != "true":
            raise RuntimeError("replicas need the suite started with MODELFORGE_SHARE_PORT=true")
        env["MODELFORGE_LOG_LEVEL"] = "INFO"  # for the line that says it serves
        env.pop(orphans.UP_PID_ENV, None)  # `up` is not their parent: they would take it for gone and stop
        for _ in range(count):
            # The model file cache is one process's own (it removes what it did not write); Redis is shared.
            env["MODELFORGE_MODEL_DIR"] = str(self.data_dir / f"models-replica-{len(self.replicas) + 1}")
            replica = _start([sys.executable, "-m", "modelforge_inference"], env, cpus)
            self.replicas.append(replica)
            _wait_for_line(replica, "serving ", timeout)

    def inference_pids(self) -> tuple[int, ...]:
        """The inference service's processes: the suite's own, then the replicas added to it, all still running."""
        ended = [r.pid for r in self.replicas if r.poll() is not None]
        if ended:
            raise RuntimeError(f"inference replicas {ended} have exited: the figures would not be theirs")
        pid = self.pid_of("modelforge_inference")
        return tuple(p for p in (pid, *(r.pid for r in self.replicas)) if p)

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.poll() is None:
                replica.send_signal(signal.SIGINT)
        for replica in self.replicas:
            try:
                replica.wait(timeout=30)
            except subprocess.TimeoutExpired:
                replica.kill()
                replica.wait()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def _start(argv: list[str], env: dict[str, str], cpus: frozenset[int] | None) -> subprocess.Popen[str]:
    """`argv` in a session of its own on `cpus`, its output (stdout and stderr) a pipe of text lines."""
    return subprocess.Popen(
        cpu_sets.command(argv, cpus),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for_line(process: subprocess.Popen[str], text: str, timeout: float) -> None:
    """Reads `process`'s output until a line holds `text`; then drains the rest in the background."""
    assert process.stdout is not None
    found = threading.Event()
    seen: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if not found.is_set():
                seen.append(line.rstrip("\n"))
                if text in line:
                    found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        process.kill()
        tail = "\n".join(seen[-20:])
        raise RuntimeError(f"an inference replica did not say {text!r} within {timeout:.0f} s:\n{tail}")


class CpuWindow:
    """CPU seconds taken by some processes and by the whole machine between `begin()` and `end()`."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self._pids = {name: pid for name, pid in pids.items() if pid}
        self._start: dict[str, float] = {}
        self._machine: tuple[float, float] = (0.0, 0.0)
        self._began = 0.0
        self.cores: dict[str, float] = {}
        self.machine_cores = 0.0

    def begin(self) -> None:
        self._began = time.monotonic()
        self._machine = machine_busy_seconds()
        self._start = {name: cpu_seconds(pid) for name, pid in self._pids.items()}

    def end(self) -> None:
        seconds = max(1e-9, time.monotonic() - self._began)
        busy, _ = machine_busy_seconds()
        self.machine_cores = (busy - self._machine[0]) / seconds
        self.cores = {name: (cpu_seconds(pid) - self._start[name]) / seconds for name, pid in self._pids.items()}
