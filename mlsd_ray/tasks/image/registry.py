"""Image models in the registry: the training run (params, per-epoch metrics, test accuracy)
and the checkpoint as an MLflow Model whose signature is uint8 images in, class
probabilities out, registered as a new version with its metrics and schema as tags."""

from __future__ import annotations

import numpy as np

from mlsd_ray.core.workspace import Workspace
from mlsd_ray.registry import (
    RegisteredVersion,
    client,
    flat_params,
    log_checkpoint_model,
    new_version,
    version_tags,
)

EXAMPLE_IMAGES = 2  # test-split images stored with the model as its input example


def image_signature(dataset):
    """uint8 (-1, H, W, C) in, float32 class probabilities (-1, K) out: the trained size,
    which is also what the model's input example has (other sizes are resized)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    shape = dataset.manifest["schema"]["image"]["shape"]
    classes = len(dataset.manifest["class_names"])
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *shape))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]))


def run_params(cfg, dataset) -> dict:
    """The params of an image training run: the model, the training settings, the data."""
    return {**flat_params("model", cfg.model.model_dump()),
            **flat_params("train", cfg.train.model_dump()),
            "data.source": cfg.data.source, "data.fingerprint": dataset.manifest["fingerprint"]}


def log_and_register(result, cfg, dataset, model_name: str, workspace: Workspace,
                     nested: bool = False, live: bool = False) -> RegisteredVersion:
    """Log a finished training run to MLflow and register its best checkpoint as a new version.

    `live`: the run is the active one, opened with its params and fed each epoch while it
    trained (registry/tracking.py); else a run is opened here and the history replayed into
    it. `nested`: that run is a child of the active run (a tune search's best trial).
    """
    import mlflow

    from mlsd_ray.registry.tracking import registration_run

    mlflow_client = client(workspace)
    manifest = dataset.manifest
    schema = {"input": {"image": manifest["schema"]["image"], "accepts": "uint8 H×W×C or "
                        "encoded PNG/JPEG; resized and normalised as in preprocessing.json"},
              "output": {"class_index": "int", "class_name": manifest["class_names"],
                         "probabilities": f"float[{len(manifest['class_names'])}]"}}
    tags = version_tags(task="image", run_name=result.run_name, score_name="accuracy",
                        val_score=result.metrics["val_accuracy"],
                        test_score=result.test_accuracy, best_epoch=result.best_epoch,
                        model=cfg.model.name, dataset=dataset.path,
                        fingerprint=manifest["fingerprint"], schema=schema)
    with registration_run(result.run_name, run_params(cfg, dataset), result.checkpoint,
                          live, nested) as run:
        mlflow.log_metrics({"test_accuracy": result.test_accuracy,
                            "best_val_accuracy": result.metrics["val_accuracy"]})
        mlflow.set_tags(tags)
        test_images, _ = dataset.load_split("test")
        log_checkpoint_model(result.checkpoint, image_signature(dataset),
                             test_images[:EXAMPLE_IMAGES])
        run_id = run.info.run_id
    return new_version(mlflow_client, model_name, run_id, tags,
                       f"{cfg.model.name} on {manifest['name']} (mlsd-ray)")
