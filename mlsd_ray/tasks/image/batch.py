"""Offline batch inference: `mlsd predict --model URI --source SPEC --out PATH`.

Ray Data reads the source with the data stage's readers, decodes and standardises each image to
the model's input (same functions as training and serving), and runs the network on an actor pool
(`map_batches(Predictor, compute=ActorPoolStrategy(...))`: the model loads once per actor, not
once per batch). Rows that cannot be decoded are kept in the output with their reason, not fatal.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from mlsd_ray.core import storage
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.tasks.base import OfflinePrediction
from mlsd_ray.tasks.image.config import ImageConfig
from mlsd_ray.tasks.image.data.transforms import standardize
from mlsd_ray.tasks.image.data.validate import Rejected, coerce_array, decode_bytes, is_missing

if TYPE_CHECKING:
    from mlsd_ray.registry import PinnedModel

OK = "ok"


def decode_rows(batch: dict[str, np.ndarray], size: int, channels: int,
                pixel_range: str) -> dict[str, np.ndarray]:
    """Raw source rows -> standardised uint8 images, with a status per row."""
    is_bytes = "bytes" in batch
    images, status, detail = [], [], []
    read_errors = batch.get("read_error", [""] * len(batch["id"]))
    for payload, read_error in zip(batch["bytes" if is_bytes else "array"], read_errors):
        try:
            if read_error:
                raise Rejected("unreadable_file", read_error)
            raw = decode_bytes(payload) if is_bytes else coerce_array(payload, pixel_range)
            images.append(standardize(raw, size, channels))
            status.append(OK)
            detail.append("")
        except Rejected as rejected:
            images.append(np.zeros((size, size, channels), np.uint8))
            status.append(rejected.reason)
            detail.append(rejected.detail)
    labels = ["" if is_missing(v) else str(v) for v in batch["label"]]
    return {"id": batch["id"], "source": batch["source"],
            "label_name": np.array(labels, dtype=object), "image": np.stack(images),
            "status": np.array(status, dtype=object), "detail": np.array(detail, dtype=object)}


class Predictor:
    """An actor holding the model; one call per batch of decoded rows."""

    def __init__(self, model: PinnedModel, workspace: Workspace, actor: bool = True):
        from mlsd_ray.core.memory import claim_cpus_for_torch
        from mlsd_ray.tasks.image.checkpoint import load_model

        if actor:
            claim_cpus_for_torch(1)  # one actor per CPU: parallelism comes from the pool
        self.loaded = load_model(model.checkpoint_here(workspace))
        self.model = model  # {"uri", "name", "version"}: pinned, for `mlsd monitor --inputs`

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from mlsd_ray.tasks.image.features import FEATURES, image_features

        ok = batch["status"] == OK
        rows = len(ok)
        predicted = np.full(rows, -1, dtype=np.int64)
        confidence = np.zeros(rows, dtype=np.float32)
        features = {name: np.full(rows, np.nan, dtype=np.float32) for name in FEATURES}
        if ok.any():
            pre = self.loaded.preprocessor
            with torch.inference_mode():
                pixels = pre.to_tensor(batch["image"][ok])
                logits = self.loaded.model(pre.normalize(pixels))
                probabilities = torch.softmax(logits.float(), dim=1)
            best = probabilities.max(dim=1)
            predicted[ok] = best.indices.numpy()
            confidence[ok] = best.values.numpy()
            for name, values in image_features(pixels.permute(0, 2, 3, 1).numpy()).items():
                features[name][ok] = values
        names = self.loaded.preprocessor.class_names
        return {"id": batch["id"], "source": batch["source"], "label": batch["label_name"],
                "model_uri": np.full(rows, self.model.uri, dtype=object),
                "model_name": np.full(rows, self.model.name, dtype=object),
                "model_version": np.full(rows, self.model.version, dtype=object),
                **features,
                "predicted_index": predicted,
                "predicted_class": np.array([names[i] if i >= 0 else "" for i in predicted],
                                            dtype=object),
                "confidence": confidence, "status": batch["status"], "detail": batch["detail"]}


def predict_dataset(model: PinnedModel, cfg: ImageConfig, out: str | None, workspace: Workspace,
                    log: Callable[[str], None]) -> OfflinePrediction:
    """Predict every row of `cfg.data.source` with `model` (serve/control.py's
    `registry.pin` pins one); write parquet; return counts and accuracy. A source of few
    images is read and predicted in this process (`Source.rows_here`); more go through Ray
    Data to an actor pool."""
    import pandas as pd

    from mlsd_ray.core.runtime import ray_is_up
    from mlsd_ray.tasks.image.checkpoint import load_model
    from mlsd_ray.tasks.image.data.sources import parse_source

    pre = load_model(model.checkpoint_here(workspace)).preprocessor
    source = parse_source(cfg.data.source, cfg.data, workspace)
    source.class_names()  # lists the inputs: a missing path fails here, before Ray
    out = str(out or workspace.batch_predictions(time.strftime("%Y%m%d-%H%M%S")))
    started = time.perf_counter()
    decode = functools.partial(decode_rows, size=pre.image_size, channels=pre.channels,
                               pixel_range=cfg.data.pixel_range)
    rows = None if ray_is_up() else source.rows_here(then=decode)
    if rows is None:
        frame = _predict_with_ray(source, decode, model, out, workspace, log)
    else:
        log(f"predicting {cfg.data.source} with {model.uri} in this process -> {out}")
        frame = pd.DataFrame(Predictor(model, workspace, actor=False)(rows))
        storage.delete_dir(out)
        storage.write_bytes(storage.join(out, "part-0.parquet"), frame.to_parquet(index=False))
    return summarize(frame, out, time.perf_counter() - started)


def _predict_with_ray(source, decode, model: PinnedModel, out: str, workspace: Workspace,
                      log: Callable[[str], None]):
    """The source through Ray Data, decoded and predicted on an actor pool of one model per
    CPU; the predictions table as written."""
    import ray
    import ray.data

    from mlsd_ray.core.runtime import ray_work

    with ray_work(workspace):
        actors = max(1, int(ray.available_resources().get("CPU", 1)))
        log(f"predicting {source.name} with {model.uri} on {actors} actor(s) -> {out}")
        predictions = source.read(then=decode).map_batches(
            Predictor, fn_constructor_kwargs={"model": model, "workspace": workspace},
            batch_size=256, batch_format="numpy", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors))
        storage.delete_dir(out)
        predictions.write_parquet(out)
        return ray.data.read_parquet(out).to_pandas()


def summarize(frame, out: str, seconds: float) -> OfflinePrediction:
    """Counts, rejection reasons and (where labels are known) accuracy of a predictions table."""
    ok = frame[frame["status"] == OK]
    labelled = ok[ok["label"] != ""]
    scores = {} if not len(labelled) else {"accuracy": round(float(
        (labelled["label"] == labelled["predicted_class"]).mean()), 4)}
    return OfflinePrediction(
        out=out, rows=len(frame), predicted=len(ok), seconds=seconds, labelled=len(labelled),
        rejected=frame.loc[frame["status"] != OK, "status"].value_counts().to_dict(),
        predicted_classes=ok["predicted_class"].value_counts().sort_index().to_dict(),
        scores=scores)
