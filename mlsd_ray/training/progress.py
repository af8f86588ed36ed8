"""Each epoch's metrics, from Ray Train's controller to the driver's console, as they happen.

Ray Train calls its callbacks inside the train controller actor. Printing there reaches the
console only when the driver forwards every Ray process's output (`log_to_driver`), and with
it come Ray Data's plans and Serve's access logs. Ray Train places its controller on the
driver's node, so the callback appends each report to a file there, and a thread in the
driver turns each line into one line of progress. (A queue actor did this before: one more
process to start per training run, about 1 s on 2 cores.)
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable

__all__ = ["EpochRelay"]


class EpochRelay:
    """Use `callback()` in the trainer's RunConfig and run `fit()` inside `with relay:`."""

    def __init__(self, line: Callable[[dict], str], log: Callable[[str], None],
                 observe: Callable[[dict], None] | None = None):
        """`line` turns a report into its console line for `log`; `observe`, if given, gets
        each report too (live tracking: registry/tracking.py)."""
        self.line, self.log, self.observe = line, log, observe
        handle, self.path = tempfile.mkstemp(prefix="mlsd-epochs-", suffix=".jsonl")
        os.close(handle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._relay, name="epoch-relay", daemon=True)

    def callback(self):
        """A Ray Train callback that appends each report's (rank 0) metrics to the file."""
        from ray.train import UserCallback

        path = self.path

        class EpochMetricsToDriver(UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                try:  # progress only: a controller that cannot see the file still trains
                    with open(path, "a") as out:
                        out.write(json.dumps(metrics[0], default=float) + "\n")
                except OSError:
                    pass

        return EpochMetricsToDriver()

    def __enter__(self) -> EpochRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        os.unlink(self.path)

    def _relay(self) -> None:
        with open(self.path) as reports:
            pending = ""
            while True:
                stopping = self._stop.is_set()  # read before the last drain: no line is lost
                pending += reports.readline()
                if pending.endswith("\n"):
                    metrics = json.loads(pending)
                    self.log(self.line(metrics))
                    if self.observe:
                        self.observe(metrics)
                    pending = ""
                elif stopping:
                    return
                else:
                    self._stop.wait(0.1)
