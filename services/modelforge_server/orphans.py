"""A child of `modelforge up` stops when `up` itself is gone.

`up` starts its children in sessions of their own (a terminal's Ctrl-C reaches `up` alone, which stops them in
order), so nothing stops them when `up` is killed outright (SIGKILL, an out-of-memory kill): they would keep
serving, hold the suite's ports and refuse the next `up`. `up` names itself to each child in UP_PID_ENV; the child
checks every second that `up` is still its parent and, once it is not, stops as on SIGTERM: gracefully, its calls
in flight and its jobs handed back as usual.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

__all__ = ["UP_PID_ENV", "stop_when_up_is_gone"]

log = logging.getLogger("modelforge.orphans")

UP_PID_ENV = "MODELFORGE_UP_PID"
"""Set by `up` in its children's environment: its own process id. Not a setting: nothing else sets it."""

_INTERVAL_SECONDS = 1.0


def stop_when_up_is_gone(interval: float = _INTERVAL_SECONDS) -> threading.Thread | None:
    """Starts a daemon thread that sends this process SIGTERM once the `up` that started it has exited; None (and
    nothing started) for a process that `up` did not start."""
    value = os.environ.get(UP_PID_ENV, "")
    if not value.isdigit():
        return None
    up = int(value)

    def watch() -> None:
        stopped = threading.Event()
        while not stopped.wait(interval):
            if os.getppid() != up:  # re-parented: `up` has exited
                log.warning("modelforge up (pid %d) is gone; stopping", up)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="modelforge-up-watch", daemon=True)
    thread.start()
    return thread
