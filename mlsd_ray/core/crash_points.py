"""Named places where a fault test may SIGKILL the process: `MLSD_CRASH_AT=NAME[,NAME]`.

A kill from outside lands wherever the process happens to be; the steps that must stay
consistent (a version registered before an alias moves to it, a retrain decision written
before it is applied) are milliseconds apart, so a test that kills on a log line almost never
lands between them. `crash_point(NAME)` kills the process exactly there, with SIGKILL: no
`finally`, no atexit handler, no buffered write runs, as with a real crash. The names are
listed in docs/reliability.md. Unset (always, outside those tests) it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_AT_ENV", "crash_point"]

CRASH_AT_ENV = "MLSD_CRASH_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process if `name` is one of MLSD_CRASH_AT's comma-separated names."""
    wanted = os.environ.get(CRASH_AT_ENV)
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
