"""Closed request loops over real HTTP for the fault tests: how many requests a client
without retries, and one that retries once, got answered while something was broken."""

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


@dataclass
class Tally:
    """What one request loop saw: answers by status (or the exception's name)."""

    retries: int
    outcomes: Counter = field(default_factory=Counter)

    @property
    def success_rate(self) -> float:
        return self.outcomes[200] / max(sum(self.outcomes.values()), 1)


def request_loop(url: str, body: bytes, tally: Tally, stop: threading.Event) -> None:
    """One client: a request, its answer, the next request; a failed one is retried
    `tally.retries` times. After a failure it waits 50 ms, so a refused connection does not
    spin the CPU."""
    session = requests.Session()
    while not stop.is_set():
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
    """Seconds until `condition()` holds (polled every 0.1 s); fails after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic() - start


def report(fault: str, tallies: tuple[Tally, Tally], **figures) -> None:
    print("\n" + json.dumps({
        "fault": fault, **figures,
        "requests": sum(tallies[0].outcomes.values()) + sum(tallies[1].outcomes.values()),
        "success_no_retry": round(tallies[0].success_rate, 4),
        "success_one_retry": round(tallies[1].success_rate, 4),
        "failures": {str(k): v for k, v in (tallies[0].outcomes + tallies[1].outcomes).items()
                     if k != 200}}))


