"""The pipeline's last stage: serve the new model, classify test images over HTTP, stop.

Checks the whole path a user's request takes (HTTP -> ingress -> batching -> model) with the
preprocessing read from the checkpoint, not the training code's copy of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mlsd_ray.core.config import ServeConfig
from mlsd_ray.tasks.image.data.prepare import PreparedDataset

if TYPE_CHECKING:
    from mlsd_ray.workflows.loop import LoopSteps

SMOKE_IMAGES = 32


def serve_smoke_check(settings: ServeConfig, model: str, dataset_path: str, home: str | None,
                      keep_serving: bool, log: Callable[[str], None],
                      then: Callable[[str, str], LoopSteps] | None = None) -> dict:
    """Start the app on `model`, send SMOKE_IMAGES test images, report accuracy; then stop.

    `then(url, served_uri)` runs while the app is up (the monitoring loop); its result is
    returned under "loop", and the app is stopped even when it fails."""
    from mlsd_ray.serve import control
    from mlsd_ray.serve.client import post_json

    updates: dict[str, Any] = {"model": model}
    if not keep_serving and control.port_in_use(settings.host, settings.port):
        updates["port"] = control.free_port(settings.host)  # a check only: any port will do
    app = control.start(settings.model_copy(update=updates), home, log=log)
    images, labels = PreparedDataset.open(dataset_path).load_split("test")
    images, labels = images[:SMOKE_IMAGES], labels[:SMOKE_IMAGES]
    answer = post_json(app.endpoint("predict_url"),
                       {"instances": [image.tolist() for image in images]})
    predicted = [p["class_index"] for p in answer["predictions"]]
    correct = sum(int(p == y) for p, y in zip(predicted, labels))
    result = {"url": app.url, "model_version": answer["model_version"],
              "images": len(predicted), "correct": correct,
              "accuracy": round(correct / len(predicted), 4),
              "seconds_to_healthy": app.seconds_to_healthy, "kept_serving": keep_serving}
    log(f"served {answer['model_name']} version {answer['model_version']} at {app.url}: "
        f"{correct}/{len(predicted)} test images right over HTTP")
    try:
        if then is not None:
            result["loop"] = then(app.url, app.model.uri)
    finally:
        if keep_serving:
            control.serve_until_interrupted(app, log)
        else:
            control.remove_app(settings.app_name)
            control.state_file(home, settings.app_name).unlink(missing_ok=True)
    return result
