"""Starts or stops a PostgreSQL of a test's own, from a separate process.

`python -m tests.integration.registry.pgcontrol start DIR` prints the server's URL and leaves it running;
`... stop DIR` stops it. A separate process, because pgserver forks to switch users, and forking a process whose
gRPC threads are busy can crash the child: the test process only spawns this helper, which has no gRPC.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path


def main(action: str, directory: str) -> None:
    import pgserver

    pgdata = Path(directory).resolve() / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    if action == "start":
        server = pgserver.get_server(pgdata, cleanup_mode=None)  # outlives this helper
        print(server.get_uri(), flush=True)
    elif action == "stop":
        pgserver.get_server(pgdata, cleanup_mode="stop").cleanup()  # this helper holds the last handle
    else:
        raise SystemExit(f"unknown action {action!r}: use start or stop")


async def run(action: str, directory: Path) -> str:
    """Runs this helper in a child process; returns what it printed (the URL, for start)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.registry.pgcontrol",
        action,
        str(directory),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"pgcontrol {action} failed ({process.returncode}): {err.decode()[-2000:]}")
    return out.decode().strip().splitlines()[-1] if out.strip() else ""


if __name__ == "__main__":
    main(*sys.argv[1:3])
