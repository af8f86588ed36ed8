"""The console contract of core/runtime.py: what reaches a command's stdout while it works."""

from __future__ import annotations

import io

from mlsd_ray.core.runtime import RayEchoFilter


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
