"""The tabular task: an MLP on a table (fraud detection, or any CSV/parquet with a label).

task.py is the task's face (`TabularTask`); beside it, each stage's part for tables:
sources.py and prepare.py/preprocess.py (the data stage), train.py and stage.py (training,
evaluation beside a baseline), registry.py, serve.py with records.py and rules.py (the scoring
app), monitoring.py and traffic.py (drift), predict.py, retrain.py, pipeline.py.
"""

from mlsd_ray.tasks.tabular.task import TabularTask

__all__ = ["TabularTask"]
