"""The pipeline's last stage: serve the new model, classify test images over HTTP, stop.

Checks the whole path a user's request takes (HTTP -> ingress -> batching -> model) with the
preprocessing read from the checkpoint, not the training code's copy of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlsd_ray.core.config import ServeConfig
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.tasks.base import ServeCheck
from mlsd_ray.tasks.image.data.prepare import PreparedDataset

if TYPE_CHECKING:
    from mlsd_ray.workflows.loop import LoopSteps

SMOKE_IMAGES = 32


@dataclass(kw_only=True)
class ImageServeCheck(ServeCheck):
    """How many of the test images sent over HTTP the served model classified right, and
    whether the app was left running (`--keep-serving`)."""

    images: int
    correct: int
    kept_serving: bool

    @property
    def accuracy(self) -> float:
        return round(self.correct / self.images, 4)

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "model_version": self.model_version, "images": self.images,
                "correct": self.correct, "accuracy": self.accuracy,
                "seconds_to_healthy": self.seconds_to_healthy,
                "kept_serving": self.kept_serving}

    def describe(self) -> str:
        stopped = "" if self.kept_serving else " (stopped; `mlsd serve --detach` to run it)"
        return (f"serve check: {self.correct}/{self.images} test images right over HTTP from "
                f"version {self.model_version} at {self.url}{stopped}")


def serve_smoke_check(settings: ServeConfig, model: str, dataset_path: str, workspace: Workspace,
                      keep_serving: bool, log: Callable[[str], None],
                      then: Callable[[str, str], LoopSteps] | None = None
                      ) -> tuple[ImageServeCheck, LoopSteps | None]:
    """Start the app on `model`, send SMOKE_IMAGES test images, report accuracy; then stop.

    `then(url, served_uri)` runs while the app is up (the monitoring loop); its result is
    returned beside the check, and the app is stopped even when it fails."""
    from mlsd_ray.serve import control
    from mlsd_ray.serve.client import post_json

    settings = settings.model_copy(update={"model": model})
    with control.app_for_a_check(settings, workspace, keep_serving, log) as app:
        images, labels = PreparedDataset.open(dataset_path).load_split("test")
        images, labels = images[:SMOKE_IMAGES], labels[:SMOKE_IMAGES]
        answer = post_json(app.endpoint("predict_url"),
                           {"instances": [image.tolist() for image in images]})
        predicted = [p["class_index"] for p in answer["predictions"]]
        correct = sum(int(p == y) for p, y in zip(predicted, labels))
        check = ImageServeCheck(url=app.url, model_version=str(answer["model_version"]),
                                seconds_to_healthy=app.seconds_to_healthy,
                                images=len(predicted), correct=correct,
                                kept_serving=keep_serving)
        log(f"served {answer['model_name']} version {answer['model_version']} at {app.url}: "
            f"{correct}/{len(predicted)} test images right over HTTP")
        return check, then(app.url, app.model.uri) if then is not None else None
