"""Request loops over real HTTP for the fault tests: how many requests a client without
retries, and one that retries once, got answered while something was broken.

Each loop sends at most PER_SECOND requests a second. Unpaced, two loops kept a core busy
between themselves, Serve's proxy and the replicas (about 110 requests a second on 2 cores):
CPU the test suite's other workers need, for no more faults found."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import requests

JSON = {"content-type": "application/json"}
PER_SECOND = 10  # per loop: two loops send 20 a second, about 7 to each of 3 replicas


@dataclass
class Tally:
    """What one request loop saw: answers by status (or the exception's name)."""

    retries: int
    outcomes: Counter = field(default_factory=Counter)

    @property
    def success_rate(self) -> float:
        return self.outcomes[200] / max(sum(self.outcomes.values()), 1)


def request_loop(url: str, body: bytes, tally: Tally, stop: threading.Event) -> None:
    """One client: a request, its answer, the next request at the next of PER_SECOND slots
    a second (at once when the answer came later); a failed one is retried `tally.retries`
    times. After a failure it waits 50 ms, so a refused connection does not spin the CPU."""
    session = requests.Session()
    next_at = time.monotonic()
    while not stop.is_set():
        next_at += 1 / PER_SECOND
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at = max(next_at, time.monotonic() - 1 / PER_SECOND)  # no burst after a stall
        for _attempt in range(tally.retries + 1):
            try:
                outcome: int | str = session.post(url, data=body, headers=JSON,
                                                  timeout=30).status_code
            except requests.RequestException as exc:
                outcome = type(exc).__name__
                session = requests.Session()
            if outcome == 200:
                break
            time.sleep(0.05)
        tally.outcomes[outcome] += 1


@contextlib.contextmanager
def under_load(url: str, body: bytes) -> Iterator[tuple[Tally, Tally]]:
    """Two request loops, without and with one retry, while inside."""
    tallies, stop = (Tally(retries=0), Tally(retries=1)), threading.Event()
    loops = [threading.Thread(target=request_loop, args=(url, body, tally, stop), daemon=True)
             for tally in tallies]
    for loop in loops:
        loop.start()
    try:
        yield tallies
    finally:
        stop.set()
        for loop in loops:
            loop.join(timeout=60)


def wait_for(condition, timeout_s: float = 60) -> float:
    """Seconds until `condition()` holds (polled every 0.5 s); fails after `timeout_s`. The
    conditions the fault tests wait on ask Ray's state API (through the dashboard) and
    Serve's controller: asked every 0.1 s, the asking took CPU the faults' recovery needs."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.5)
    return time.monotonic() - start


def report(fault: str, tallies: tuple[Tally, Tally], **figures) -> None:
    print("\n" + json.dumps({
        "fault": fault, **figures,
        "requests": sum(tallies[0].outcomes.values()) + sum(tallies[1].outcomes.values()),
        "success_no_retry": round(tallies[0].success_rate, 4),
        "success_one_retry": round(tallies[1].success_rate, 4),
        "failures": {str(k): v for k, v in (tallies[0].outcomes + tallies[1].outcomes).items()
                     if k != 200}}))


