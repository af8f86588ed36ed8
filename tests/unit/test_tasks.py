"""The task registry: built-in tasks, a user's task by `package.module:Class` and by entry
point (a package installed on the path, found by importlib.metadata), and the sentences a task
that cannot load gets."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from mlsd_ray.core.errors import InputError, WorkError
from mlsd_ray.tasks import Task, get_task, load_config, task_names
from mlsd_ray.tasks.image.task import ImageTask
from mlsd_ray.tasks.tabular.task import TabularTask

USER_TASK = '''
from mlsd_ray.tasks.tabular.task import TabularTask


class ChurnTask(TabularTask):
    """A user's task: tables, with its own name and default source."""

    name = "churn"

    def set_source(self, cfg, source, label=None):
        super().set_source(cfg, source, label or "churned")


class Incomplete:
    def prepare(self, cfg, workspace, log, force=False):
        return None
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """`churnpkg` in a folder of its own, outside mlsd_ray, put on the import path."""
    package = tmp_path / "site" / "churnpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(USER_TASK))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m.partition(".")[0] == "churnpkg"]:
        monkeypatch.delitem(sys.modules, name)  # another test's copy, from its own folder
    return tmp_path / "site"


def test_built_in_tasks_by_name():
    assert {"image", "tabular"} <= set(task_names())
    assert isinstance(get_task("image"), ImageTask) and get_task("image").cross_validation
    assert isinstance(get_task("tabular"), TabularTask)
    assert (get_task("image").metric, get_task("tabular").metric) == ("val_accuracy",
                                                                        "val_score")


def test_a_users_task_by_module_and_class(user_package):
    task = get_task("churnpkg:ChurnTask")
    assert isinstance(task, Task) and task.name == "churn"
    cfg = load_config(None, ["task=churnpkg:ChurnTask"])
    task.set_source(cfg, "csv:/data/customers.csv")
    assert (cfg.tabular.source, cfg.tabular.label) == ("csv:/data/customers.csv", "churned")


def test_a_users_task_by_entry_point(user_package):
    """What `pip install` of a package declaring [project.entry-points."mlsd.tasks"] leaves."""
    info = user_package / "churnpkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: churnpkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mlsd.tasks]\nchurn = churnpkg:ChurnTask\n")
    assert "churn" in task_names()
    assert get_task("churn").name == "churn"
    assert load_config(None, ["task=churn"]).task == "churn"


@pytest.mark.parametrize("name, message", [
    ("imag", "unknown task 'imag'; the tasks are: image, tabular"),
    ("no_such_module:Task", "cannot import 'no_such_module'"),
    ("churnpkg:Missing", "module 'churnpkg' has no 'Missing'"),
    ("churnpkg:Incomplete", "not a mlsd_ray.tasks.Task subclass; it lacks open_prepared, "
                            "render_data"),
    ("mlsd_ray.tasks.base:Task", "does not implement open_prepared, prepare, render_data"),
    ("mlsd_ray.tasks.base:Task", "prepare: The data stage: validate, quarantine, split"),
])
def test_a_task_that_cannot_load_is_named_with_what_is_wrong(user_package, name, message):
    with pytest.raises(InputError) as error:
        get_task(name)
    assert message in str(error.value)
    with pytest.raises(InputError) as from_config:  # the config says the same, naming the key
        load_config(None, [f"task={name}"])
    assert str(from_config.value) == f"config key 'task': {error.value}"



def test_a_checkpoint_names_the_task_that_trained_it(tmp_path):
    from mlsd_ray.tasks import task_of_checkpoint

    def checkpoint(task: str):
        folder = tmp_path / task.replace(":", "-")
        folder.mkdir()
        (folder / "metadata.json").write_text(json.dumps(
            {"run_name": "r", "dataset": {"path": "/d"}, "config": {"task": task}}))
        return str(folder)

    assert task_of_checkpoint(checkpoint("tabular")).name == "tabular"
    assert task_of_checkpoint(checkpoint("image")).name == "image"
    with pytest.raises(InputError, match="trained by the task 'loans_pkg:LoansTask', which "
                                         "does not load here: .*cannot import 'loans_pkg'"):
        task_of_checkpoint(checkpoint("loans_pkg:LoansTask"))
    with pytest.raises(InputError, match="no checkpoint at"):
        task_of_checkpoint(str(tmp_path / "nothing"))


def test_a_retrain_rolls_out_to_the_app_that_serves_the_model(tmp_path):
    """`mlsd serve` names its app after its config ("mlsd" by default), not after the model:
    a retrain finds the app by the model it serves."""
    import json

    from mlsd_ray.core.workspace import Workspace
    from mlsd_ray.serve.control import apps_serving

    workspace = Workspace.at(str(tmp_path))
    serve = tmp_path / "serve"
    serve.mkdir()
    (serve / "mlsd.json").write_text(json.dumps({"app_name": "mlsd", "model": {
        "name": "fraud-mlp", "uri": "models:/fraud-mlp/1"}}))
    (serve / "digits.json").write_text(json.dumps({"app_name": "digits", "model": {
        "name": "digits-cnn", "uri": "models:/digits-cnn/3"}}))
    (serve / "mlsd-policy.json").write_text(json.dumps({"threshold": 0.5}))
    (serve / "broken.json").write_text("{")
    assert apps_serving(workspace, "fraud-mlp") == ["mlsd"]
    assert apps_serving(workspace, "digits-cnn") == ["digits"]
    assert apps_serving(workspace, "loans-mlp") == []


def test_a_running_app_record_reads_back_as_it_was_written(tmp_path):
    """APP.json is what status, deploy and stop know of an app: written by `start`, read back
    typed; a damaged record is an error that names the file, not a KeyError."""
    from mlsd_ray.core.config import ServeConfig
    from mlsd_ray.core.workspace import Workspace
    from mlsd_ray.registry import PinnedModel
    from mlsd_ray.serve.control import RayHead, RunningApp, read_state

    workspace = Workspace.at(str(tmp_path))
    app = RunningApp(app_name="fraud", task="tabular", url="http://127.0.0.1:8123",
                     route_prefix="/", model_path="/v1/fraud/model",
                     model=PinnedModel("models:/fraud-mlp/2", "fraud-mlp", "2", "/x"),
                     served_version="2", settings=ServeConfig(port=8123, app_name="fraud"),
                     head=RayHead("127.0.0.1:6390", 4242, "http://127.0.0.1:8266"),
                     workspace=workspace,
                     detached=True, seconds_to_healthy=3.5,
                     endpoints={"score_url": "http://127.0.0.1:8123/v1/fraud/score"})
    app.save()
    assert read_state(workspace, "fraud") == app
    assert app.to_dict()["score_url"].endswith("/v1/fraud/score")  # `--json` keeps it flat
    assert app.docs == "http://127.0.0.1:8123/docs"
    with pytest.raises(WorkError, match="has no predict_url; it has score_url"):
        app.endpoint("predict_url")
    app.state_file.write_text('{"app_name": "fraud"}')
    with pytest.raises(InputError, match="fraud.json of app 'fraud' is unreadable"):
        read_state(workspace, "fraud")


def test_a_registered_model_needs_the_package_of_its_task(user_package, tmp_path):
    """The MLflow Model of a version pins the distribution that holds its task, or ships the
    task's code when no installed distribution holds it, so `mlflow models serve` in a fresh
    environment can import the task."""
    from mlsd_ray.registry import task_package

    def checkpoint(task: str):
        folder = tmp_path / "ckpt" / task.replace(":", "-")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metadata.json").write_text(json.dumps(
            {"run_name": "r", "dataset": {"path": "/d"}, "config": {"task": task}}))
        return str(folder)

    assert task_package(checkpoint("image")) == ([], [])
    assert task_package(checkpoint("churnpkg:ChurnTask")) == (
        [], [str(user_package / "churnpkg")])
    info = user_package / "churn_tasks-1.0.dist-info"  # what pip install leaves
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: churn-tasks\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("churnpkg\n")
    assert task_package(checkpoint("churnpkg:ChurnTask")) == (["churn-tasks==1.0"], [])


def test_a_command_on_a_model_runs_the_models_task_with_the_shared_sections(tmp_path):
    """`mlsd predict --model`, `monitor --inputs` and `retrain` run the task that trained the
    model, whatever task their own config names: the config becomes that task's, its shared
    sections as given."""
    from mlsd_ray.tasks import model_task
    from mlsd_ray.tasks.tabular.config import TabularTaskConfig
    from mlsd_ray.tasks.tabular.task import TabularTask

    folder = tmp_path / "fraud-checkpoint"
    folder.mkdir()
    (folder / "metadata.json").write_text(json.dumps(
        {"run_name": "r", "dataset": {"path": "/d"}, "config": {"task": "tabular"}}))
    image_cfg = load_config(None, ["serve.port=8123", "train.epochs=3", "data.seed=4"])
    task, cfg = model_task(str(folder), image_cfg)
    assert isinstance(task, TabularTask) and isinstance(cfg, TabularTaskConfig)
    assert (cfg.task, cfg.serve.port, cfg.train.epochs) == ("tabular", 8123, 3)
    assert cfg.tabular.source == "fraud-synth" and not hasattr(cfg, "data")
    same = load_config(None, ["task=tabular", "tabular.seed=2"])
    assert model_task(str(folder), same)[1] is same  # already the model's task's config
