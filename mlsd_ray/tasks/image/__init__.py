"""The image task: a CNN classifying images (the embedded digits, folders, torchvision sets).

task.py is the task's face (`ImageTask`); beside it, each stage's part for images: data/ (the
data stage: sources, validation, transforms, splits' report), models.py, engine.py and train.py
(the Ray Train loop), evaluate.py, serve.py (the Serve app), batch.py (offline prediction),
features.py, traffic.py and loop.py (drift), retrain.py, tune.py, pipeline.py, smoke.py.
"""

from mlsd_ray.tasks.image.task import ImageTask

__all__ = ["ImageTask"]
