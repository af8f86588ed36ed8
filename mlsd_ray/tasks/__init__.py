"""Tasks: what differs between kinds of model, behind one interface the stages call.

`Task` (base.py) is the interface; `image` (the CNN on images) and `tabular` (the MLP on
tables) are the two built in. `get_task(name)` (registry.py) finds a task by name: a built-in
one, one a package registers under the `mlsd.tasks` entry point group, or `package.module:Name`
for a class of one's own. docs/tasks.md says how to write one.
"""

from mlsd_ray.tasks.base import ServedApp, Task, TrafficRequest
from mlsd_ray.tasks.registry import (
    DEFAULT_TASK,
    get_task,
    load_config,
    model_task,
    stored_config,
    task_names,
    task_of_checkpoint,
    with_served_model,
)

__all__ = ["DEFAULT_TASK", "ServedApp", "Task", "TrafficRequest", "get_task", "load_config",
           "model_task", "stored_config", "task_names", "task_of_checkpoint",
           "with_served_model"]
