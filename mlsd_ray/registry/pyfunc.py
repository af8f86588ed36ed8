"""The MLflow Model that every registered version is, defined as "models from code": MLflow
runs this file to build the model, so loading one unpickles nothing.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/digits-cnn@production")
    model.predict(images)            # uint8 (N, H, W, C) -> class probabilities (N, K)

`load_context` takes the checkpoint the version carries (`artifacts/checkpoint`, the same
folder our own loaders read), verifies its checksums and asks the task that trained it (its
metadata.json names the task) for a predictor: the loading and forward pass of that task's
Serve replica. `mlsd_ray` must be importable where the model is loaded (`--env-manager
local`, or an environment with mlsd-ray installed).
"""

from __future__ import annotations

import warnings

import mlflow
from mlflow.pyfunc import PythonModel

from mlsd_ray.registry import CHECKPOINT

# MLflow warns, when this class is defined (at every load), that `predict` has no type hints;
# the signature is given when the model is logged instead. Its check runs under its own
# "once" filter, which no filter of ours overrides; recording warnings here keeps the
# message off the console of whoever loads the model.
with warnings.catch_warnings(record=True):
    class MlsdModel(PythonModel):
        """A registered mlsd-ray checkpoint as a pyfunc: the trained task predicts."""

        def load_context(self, context) -> None:
            from mlsd_ray.tasks import task_of_checkpoint
            from mlsd_ray.training.checkpoint import verify

            directory = context.artifacts[CHECKPOINT]
            verify(directory)
            self.predict_batch = task_of_checkpoint(directory).predictor(directory)

        # No type hints on predict: MLflow would read them as a second signature (it takes only
        # list[...] or one DataFrame/ndarray type), and ours is given when the model is logged.
        def predict(self, context, model_input, params=None):
            """A batch in the signature's form -> the task's answers (see the module docstring)."""
            return self.predict_batch(model_input)


mlflow.models.set_model(MlsdModel())
