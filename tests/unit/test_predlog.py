"""The prediction log keeps its buffered rows when the process is told to stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from mlsd_ray.serve.predlog import read_log

# A process that logs rows the way a model replica does, with flushes 10 minutes apart, and
# handles SIGTERM as a Ray worker does (worker.py's main_loop: SystemExit, then atexit).
LOGGER = textwrap.dedent("""
    import signal, sys, time
    from mlsd_ray.core.config import PredictionLogConfig
    from mlsd_ray.serve.predlog import PredictionLog

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    log = PredictionLog(sys.argv[1], PredictionLogConfig(flush_seconds=600), "replica-1")
    log.record([{"time": time.time(), "request_id": str(i), "predicted_class": "7"}
                for i in range(7)])
    print("logged", flush=True)
    time.sleep(600)
""")


def test_rows_buffered_at_sigterm_are_written(tmp_path):
    location = str(tmp_path / "predictions")
    process = subprocess.Popen([sys.executable, "-c", LOGGER, location],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "logged"
    assert read_log(location).empty  # nothing written yet: the next flush is minutes away
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 1
    rows = read_log(location)
    assert sorted(rows["request_id"]) == [str(i) for i in range(7)]
