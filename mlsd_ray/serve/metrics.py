"""Prometheus metrics of the Serve app, through `ray.serve.metrics` (Ray adds the deployment,
replica and application tags and exports them from every node's metrics agent; names get Ray's
`ray_` prefix, counters a `_total` suffix):

    ray_mlsd_requests_total{route, status}       requests answered, by HTTP status
    ray_mlsd_request_latency_ms                  end-to-end latency in the ingress (histogram)
    ray_mlsd_batch_size                          inputs per forward pass (histogram)
    ray_mlsd_predictions_total{model_version, outcome}  by class, decision, or "value"
    ray_mlsd_model_loaded{model_name, model_version}  1 on each replica serving that version
    ray_mlsd_drift_score{model_version}          latest `mlsd monitor` score (max feature PSI)
    ray_mlsd_prediction_log_dropped_rows         rows the bounded log buffer had to drop so
                                                 far (a gauge from 0: the series exists
                                                 before the first drop, so dashboards and
                                                 alerts see 0, not "no data")

Metrics are created inside a replica (Ray needs the replica's context), once per process.
"""

from __future__ import annotations

import functools

__all__ = ["BATCH_BOUNDS", "ingress_metrics", "LATENCY_MS_BOUNDS", "model_metrics"]

LATENCY_MS_BOUNDS: list[float] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH_BOUNDS: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@functools.cache
def ingress_metrics() -> dict:
    from ray.serve.metrics import Counter, Gauge, Histogram

    return {"requests": Counter("mlsd_requests", "Requests answered, by HTTP status.",
                                tag_keys=("route", "status")),
            "latency": Histogram("mlsd_request_latency_ms", "End-to-end request latency in "
                                 "the ingress, in milliseconds.", boundaries=LATENCY_MS_BOUNDS,
                                 tag_keys=("route",)),
            "drift": Gauge("mlsd_drift_score", "Latest drift score from `mlsd monitor` (the "
                           "largest feature PSI).", tag_keys=("model_version",))}


@functools.cache
def model_metrics() -> dict:
    from ray.serve.metrics import Counter, Gauge, Histogram

    return {"batch": Histogram("mlsd_batch_size", "Inputs per forward pass.",
                               boundaries=BATCH_BOUNDS),
            "predictions": Counter("mlsd_predictions", "Predictions, by outcome: the class "
                                   "or decision answered, or \"value\" for a number.",
                                   tag_keys=("model_version", "outcome")),
            "version": Gauge("mlsd_model_loaded", "1 for the model version this replica "
                             "serves.", tag_keys=("model_name", "model_version")),
            "dropped": Gauge("mlsd_prediction_log_dropped_rows", "Prediction-log rows this "
                             "replica dropped so far because the buffer was full.")}
