"""core/runtime.py: what reaches a command's stdout while it works, and the environment that
the processes it starts inherit."""

from __future__ import annotations

import io
import os
import sys

from mlsd_ray.core.runtime import RayEchoFilter, environment, native_lines_off_console


def test_ray_echoes_are_dropped_and_our_lines_kept_whole():
    out = io.StringIO()
    stream = RayEchoFilter(out)
    stream.write("epoch 1/2: train loss 1.9")
    stream.write("632\n")
    # what Ray's driver prints when Serve shuts down (colour codes included), in two writes
    stream.write("\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed.")
    stream.write("\n")
    stream.write("(pid=4242) a worker's line\n(raylet, ip=10.0.0.2) another\n")
    stream.write("a line that mentions (raylet) in passing\nno newline yet")
    stream.flush()
    assert out.getvalue() == ("epoch 1/2: train loss 1.9632\n"
                              "a line that mentions (raylet) in passing\nno newline yet")
    assert stream.encoding == out.encoding  # the rest is the real stream's


def test_native_ray_lines_stay_off_stderr_and_the_rest_passes(capfd):
    """What Ray's C++ core writes to file descriptor 2 itself (sys.stderr never sees it)."""
    with native_lines_off_console():
        os.write(2, b"[2026-11-30 03:41:43,346 E 32216 32216] core_worker.cc:2465: Actor with "
                    b"class name: 'MapWorker(MapBatches(Predictor))' has constructor arguments\n")
        print("predicting folder:x with models:/m/1", file=sys.stderr, flush=True)
        os.write(2, b"a partial line, then the rest\n")
    print("after", file=sys.stderr, flush=True)
    err = capfd.readouterr().err
    assert "core_worker.cc" not in err
    assert err.splitlines() == ["predicting folder:x with models:/m/1",
                                "a partial line, then the rest", "after"]


def test_an_environment_for_the_processes_started_meanwhile_is_put_back(monkeypatch):
    import subprocess

    monkeypatch.setenv("MLSD_TEST_KEPT", "before")
    monkeypatch.delenv("MLSD_TEST_NEW", raising=False)
    with environment(MLSD_TEST_KEPT="during", MLSD_TEST_NEW="added"):
        show = "import os; print(os.environ['MLSD_TEST_KEPT'], os.environ['MLSD_TEST_NEW'])"
        seen = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True,
                              check=True).stdout.split()
    assert seen == ["during", "added"]
    assert os.environ["MLSD_TEST_KEPT"] == "before" and "MLSD_TEST_NEW" not in os.environ
    try:
        with environment(MLSD_TEST_NEW="added"):
            raise RuntimeError("a failed ray.init")
    except RuntimeError:
        pass
    assert "MLSD_TEST_NEW" not in os.environ
