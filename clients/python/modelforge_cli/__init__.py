"""The ``modelforge`` console script's entry point: a Ctrl-C while the command is still starting ends it with
status 130 and one line, as it does later.

Importing the SDK (gRPC, protobuf, numpy) takes a few tenths of a second, before :func:`modelforge.cli.main` can
catch an interrupt, and an interrupt meanwhile printed a traceback. This module imports nothing of it: it holds
SIGINT first, then imports the command. (Python's own start, before any of our code runs, is not covered.)
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["main"]


def _interrupted(signum: int, frame: object) -> None:
    os.write(2, b"modelforge: interrupted\n")  # nothing of the command's has run: no output to flush
    os._exit(130)


def main() -> int:
    """Runs ``modelforge`` (see :mod:`modelforge.cli`) and returns its exit status."""
    signal.signal(signal.SIGINT, _interrupted)
    from modelforge.cli import main as run

    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the command's own handling from here
        return run()
    except KeyboardInterrupt:  # between the two lines above
        print("modelforge: interrupted", file=sys.stderr)
        return 130
