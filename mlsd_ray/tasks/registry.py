"""Find a task by name: built in, registered by a package, or `package.module:Name`.

Like models.py's registry of architectures, but open: a package adds a task with an entry
point, with no edit to mlsd_ray,

    [project.entry-points."mlsd.tasks"]
    sentiment = "my_package.tasks:SentimentTask"

and `task: sentiment` (or `--task sentiment`) selects it; `task: my_package.tasks:SentimentTask`
works without installing anything beyond the import path.
"""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from mlsd_ray.core.config import Config, config_tree, validate_config
from mlsd_ray.core.contracts import CheckpointMetadata
from mlsd_ray.core.errors import InputError
from mlsd_ray.tasks.base import Task

ENTRY_POINT_GROUP = "mlsd.tasks"
DEFAULT_TASK = "image"  # what a config that names no task runs
BUILT_IN = {"image": "mlsd_ray.tasks.image.task:ImageTask",
            "tabular": "mlsd_ray.tasks.tabular.task:TabularTask"}


def task_names() -> list[str]:
    """The tasks a config may name: the built-in ones and every installed entry point."""
    return sorted({*BUILT_IN, *(e.name for e in entry_points(group=ENTRY_POINT_GROUP))})


def get_task(name: str) -> Task:
    """The task called `name` (see the module docstring), ready to use.

    InputError when it cannot be found or imported, or when it does not implement the
    interface (the message names the missing methods).
    """
    return _instance(_find(name), name)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                example: str | None = None) -> Config:
    """The config of a run: YAML at `path` (over `example`'s), then the `--set` overrides
    (core/config.py `config_tree`), validated with the config class of the task it names
    (`Task.config_class`; `task:` defaults to the image task). InputError (exit 2) names
    each unknown or bad key, or the task that does not load."""
    tree = config_tree(path, overrides, example)
    return with_served_model(validate_config(tree, config_class_of(tree)))


def stored_config(tree: dict[str, Any]) -> Config:
    """A config mlsd wrote beside its outputs (a checkpoint's, a dataset's), as its task's
    config class; sections of other tasks, which earlier versions wrote too, are left out."""
    return with_served_model(validate_config(tree, config_class_of(tree), stored=True))


def with_served_model(cfg: Config) -> Config:
    """`cfg` with `serve.model` set: when the config leaves it out, the production alias of the
    model that training this config registers (`Task.model_name`, e.g. digits-cnn)."""
    if cfg.serve.model is None:
        cfg.serve.model = f"models:/{get_task(cfg.task).model_name(cfg)}@production"
    return cfg


def config_class_of(tree: dict[str, Any]) -> type[Config]:
    """The config class of the task `tree` names."""
    name = tree.get("task", DEFAULT_TASK)
    if not isinstance(name, str):
        raise InputError(f"config key 'task': a task name, got {name!r}")
    try:
        return get_task(name).config_class
    except InputError as exc:
        raise InputError(f"config key 'task': {exc}") from None


def task_of_checkpoint(directory: str) -> Task:
    """The task that trained the checkpoint in `directory`, read from the config its
    metadata.json records; InputError naming the task when it does not load here."""
    return _task_named(CheckpointMetadata.read(directory).task or DEFAULT_TASK, directory)


def _task_named(name: str, directory: str) -> Task:
    """The task `name` that trained the model in `directory`, or why it does not load."""
    try:
        return get_task(name)
    except InputError as exc:
        raise InputError(f"the model at {directory} was trained by the task {name!r}, which "
                         f"does not load here: {exc}") from None


def model_task(directory: str, cfg: Config) -> tuple[Task, Config]:
    """The task that trained the checkpoint in `directory`, and `cfg` as a config of that
    task: a command that takes a model (predict, monitor, retrain) runs the model's task,
    whichever task its own config names. The shared sections stay as given; the task's own
    sections come from `cfg` where it has them (the same task), else from their defaults."""
    spec = CheckpointMetadata.read(directory).task or DEFAULT_TASK
    task = _task_named(spec, directory)
    if isinstance(cfg, task.config_class):
        return task, cfg
    return task, validate_config({**cfg.to_dict(), "task": spec}, task.config_class,
                                 stored=True)


def _find(name: str) -> object:
    if name in BUILT_IN:
        return _import(BUILT_IN[name], name)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            try:
                return entry.load()
            except Exception as exc:  # a broken plugin: say which one and why
                raise InputError(f"task {name!r} (entry point {entry.value}) does not "
                                 f"import: {type(exc).__name__}: {exc}") from None
    if ":" in name:
        return _import(name, name)
    raise InputError(f"unknown task {name!r}; the tasks are: {', '.join(task_names())}, or "
                     "package.module:ClassName for a task of your own (docs/tasks.md)")


def _import(reference: str, name: str) -> object:
    module_name, _, attribute = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"task {name!r}: cannot import {module_name!r} ({exc}); is its "
                         "package installed, or its folder on PYTHONPATH?") from None
    from mlsd_ray.core.runtime import ship_to_cluster, unpackaged_code

    code = unpackaged_code(module_name)
    if code:
        ship_to_cluster(code)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise InputError(f"task {name!r}: module {module_name!r} has no {attribute!r}") from None


def _purpose(part: str) -> str:
    """What a part of the task interface is for: the first sentence of its docstring."""
    doc = " ".join((inspect.getdoc(getattr(Task, part)) or "").split())
    return re.split(r"\.(?:\s|$)", doc)[0] or "a part of the interface"


def _instance(found: object, name: str) -> Task:
    if not (inspect.isclass(found) and issubclass(found, Task)):
        missing = sorted(m for m in Task.__abstractmethods__ if not callable(getattr(found, m,
                                                                                     None)))
        raise InputError(f"task {name!r} is not a mlsd_ray.tasks.Task subclass"
                         + (f"; it lacks {', '.join(missing)}" if missing else "")
                         + " (docs/tasks.md)")
    if found.__abstractmethods__:
        missing = sorted(found.__abstractmethods__)
        raise InputError(f"task {name!r} does not implement {', '.join(missing)} "
                         f"(docs/tasks.md): " + "; ".join(f"{part}: {_purpose(part)}"
                                                          for part in missing))
    lacking = found.missing_parts()
    if lacking:
        raise InputError(f"task {name!r} lacks " + "; ".join(lacking) + " (docs/tasks.md)")
    for attribute in ("name", "metric"):
        if not isinstance(getattr(found, attribute, None), str):
            raise InputError(f"task {name!r} sets no {attribute!r} (a class attribute string)")
    config_class = getattr(found, "config_class", None)
    if not (inspect.isclass(config_class) and issubclass(config_class, Config)):
        raise InputError(f"task {name!r} sets no 'config_class': the class of its runs' "
                         "config, a subclass of mlsd_ray.core.config.Config with the task's "
                         "own sections as fields (docs/tasks.md)")
    return found()
