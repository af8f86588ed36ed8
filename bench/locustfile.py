"""Locust user for the serving benchmarks: POST one digit to /v1/predict, no think time.

Run by bench/serve_load.py and bench/autoscale.py as `locust --headless -f bench/locustfile.py`;
BENCH_PAYLOAD names a JSON file with the request body.
"""

from __future__ import annotations

import os
from pathlib import Path

from locust import FastHttpUser, constant, task

BODY = Path(os.environ["BENCH_PAYLOAD"]).read_bytes()


class Client(FastHttpUser):
    wait_time = constant(0)  # closed loop: each user sends its next request on the answer

    @task
    def predict(self) -> None:
        self.client.post("/v1/predict", data=BODY,
                         headers={"content-type": "application/json"})
