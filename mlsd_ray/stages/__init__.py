"""The stages of a task built from parts: one implementation of each stage, for any task that
supplies a few small typed parts (parts.py) and subclasses `PartsTask` (task.py).

data.py prepares rows (Ray Data checks, quarantine, splits, the codec fitted on train);
train.py trains with Ray Train and registers in MLflow; model.py loads a trained model for
everything that predicts; serve.py is the Serve app (/v1, /v2, the page); predict.py,
traffic.py, check.py, retrain.py, export.py and explain.py are the other commands' stages.
docs/tasks.md writes a task of a new kind from these parts.
"""

from mlsd_ray.stages.data import ParquetSplits, PreparedRows, RowsSummary, read_table
from mlsd_ray.stages.model import LoadedModel
from mlsd_ray.stages.parts import (
    Codec,
    DataPart,
    ModelPart,
    MonitoringPart,
    Parts,
    RowsSection,
    regression_scores,
    vector,
)
from mlsd_ray.stages.task import PartsTask

__all__ = ["Codec", "DataPart", "LoadedModel", "ModelPart", "MonitoringPart", "ParquetSplits",
           "Parts", "PartsTask", "PreparedRows", "RowsSection", "RowsSummary", "read_table",
           "regression_scores", "vector"]
