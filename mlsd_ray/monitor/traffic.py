"""Traffic sent to a running app, for any task: the concurrent sending loop and the typed
report that `mlsd simulate-traffic`, the pipeline's monitoring loop and the load behind a
rolling update all read.

A task decides what it sends (images, records) and how to read one answer; this module owns
sending it, counting failures and versions, and the report's shape.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

__all__ = ["deliver", "Delivery", "MAX_ERRORS_KEPT", "TrafficReport"]

MAX_ERRORS_KEPT = 5


@dataclass
class Delivery:
    """How the app answered: requests sent and failed (with the first few errors), answers
    received, the model versions that gave them, and the wall time."""

    requests: int = 0
    failed_requests: int = 0
    errors: list[str] = field(default_factory=list)
    answered: int = 0
    model_versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def per_second(self) -> float | None:
        """Answers per second (None before anything was timed)."""
        return round(self.answered / self.seconds, 1) if self.seconds else None

    def add(self, other: Delivery) -> None:
        """Fold `other` into this one (the totals of a load that sends many rounds)."""
        self.requests += other.requests
        self.failed_requests += other.failed_requests
        self.errors = (self.errors + other.errors)[:MAX_ERRORS_KEPT]
        self.answered += other.answered
        self.model_versions = dict(Counter(self.model_versions) + Counter(other.model_versions))

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "failed_requests": self.failed_requests,
                "errors": self.errors, "answered": self.answered,
                "model_versions": self.model_versions, "seconds": self.seconds,
                "per_second": self.per_second}


def deliver(endpoint: str, bodies: list[dict], concurrency: int,
            answers_of: Callable[[dict], list]) -> tuple[Delivery, list[list]]:
    """POST every body to `endpoint`, `concurrency` at a time. `answers_of` picks the list of
    answers out of a response. Returns the delivery and each body's answers, in body order
    ([] for a request that failed: it is counted and the rest go on)."""
    from mlsd_ray.serve.client import post_json

    def one(body: dict) -> tuple[list, str | None, str | None]:
        try:
            response = post_json(endpoint, body)
        except Exception as exc:  # counted and reported, the run goes on
            return [], None, f"{type(exc).__name__}: {exc}"
        return answers_of(response), response["model_version"], None

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = list(pool.map(one, bodies))
    errors = [error for _, _, error in results if error]
    delivery = Delivery(requests=len(bodies), failed_requests=len(errors),
                        errors=errors[:MAX_ERRORS_KEPT],
                        answered=sum(len(answers) for answers, _, _ in results),
                        model_versions=dict(Counter(v for _, v, _ in results if v)),
                        seconds=round(time.perf_counter() - started, 2))
    return delivery, [answers for answers, _, _ in results]


@dataclass
class TrafficReport:
    """What a task's `simulate_traffic` sent or saved, and how the app answered.

    `inputs` counts what was drawn from the split, in the task's `unit` ("images",
    "records"); `column` is the shifted column where the shift has one; `delivery` is set
    when it was sent, `saved` (where the inputs and their labels went) when it was saved.
    `outcomes` counts the answers (a class, a decision); `scores` are the task's own metrics
    of the answers against the labels of what it sent, where it knows them (images:
    {"accuracy": ...}).
    """

    unit: str
    inputs: int
    shift: str
    amount: float
    split: str
    seed: int
    column: str | None = None
    url: str | None = None
    delivery: Delivery | None = None
    outcomes: dict[str, int] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    saved: str | None = None

    @property
    def failed_requests(self) -> int:
        return self.delivery.failed_requests if self.delivery else 0

    @property
    def answered(self) -> int:
        return self.delivery.answered if self.delivery else 0

    def quality(self) -> str:
        """How the traffic was answered: the task's scores where it measures them, else the
        outcomes."""
        if self.scores:
            return ", ".join(f"{name} {value}" for name, value in self.scores.items())
        return f"outcomes {self.outcomes}"

    def describe(self) -> str:
        """One line for a person: what was sent with which shift, and how it was answered."""
        of = f" of {self.column}" if self.column else ""
        line = f"{self.inputs} {self.unit}, shift {self.shift}{of} ({self.amount:g})"
        if self.delivery:
            sent = self.delivery
            line += (f": {sent.requests} requests, {sent.failed_requests} failed, "
                     f"{self.quality()}, versions {sent.model_versions}, {sent.seconds} s")
        return line + (f"; saved to {self.saved}" if self.saved else "")

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "inputs": self.inputs, "shift": self.shift,
                "amount": self.amount, "column": self.column, "split": self.split,
                "seed": self.seed, "url": self.url, "saved": self.saved,
                "outcomes": self.outcomes, **self.scores,
                **(self.delivery.to_dict() if self.delivery else {})}
