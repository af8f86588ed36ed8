"""Each epoch's metrics, from Ray Train's controller to the driver's console, as they happen.

Ray Train calls its callbacks inside the train controller actor. Printing there reaches the
console only when the driver forwards every Ray process's output (`log_to_driver`), and with
it come Ray Data's plans and Serve's access logs. So the callback hands the metrics to a
queue actor instead, and a thread in the driver turns each into one line.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class EpochRelay:
    """Use `callback()` in the trainer's RunConfig and run `fit()` inside `with relay:`."""

    def __init__(self, line: Callable[[dict], str], log: Callable[[str], None]):
        from ray.util.queue import Queue

        self.line, self.log = line, log
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._relay, name="epoch-relay", daemon=True)

    def callback(self):
        """A Ray Train callback that puts each report's (rank 0) metrics on the queue."""
        from ray.train import UserCallback

        queue = self.queue

        class EpochMetricsToDriver(UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                queue.put(metrics[0])

        return EpochMetricsToDriver()

    def __enter__(self) -> EpochRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.queue.shutdown(force=True)

    def _relay(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                metrics = self.queue.get(timeout=0.2)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # the queue actor is gone: nothing more will come
                return
            self.log(self.line(metrics))
