"""Ray Train end to end on the prepared digits: DDP workers, checkpoints, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from mlsd_ray.core.errors import InputError, WorkError
from mlsd_ray.tasks import load_config
from mlsd_ray.tasks.image.checkpoint import load_model
from mlsd_ray.tasks.image.evaluate import evaluate_checkpoint
from mlsd_ray.tasks.image.train import run_train, train_and_register
from mlsd_ray.training.checkpoint import load_train_state
from mlsd_ray.training.trainer import check_resources

pytestmark = pytest.mark.usefixtures("ray_session")

# digits at their original 8×8 (the default upsamples to 16×16): 4× less compute per epoch
FAST = ["data.image_size=8", "data.augment.random_shift=1", "train.batch_size=64", "train.lr=0.005",
        "data.augment.rotation_deg=0"]


def test_the_sessions_ray_processes_ask_the_state_api_about_their_own_cluster():
    """Ray's processes on a Ray that runtime.start_local_ray started name it in RAY_ADDRESS.
    Ray's state API, asked from them with no address (as Ray Train's PlacementGroupCleaner
    asks each second whether a run's controller lives), then answers for this cluster, not
    for the head that `ray start` recorded last on the machine: with one recorded there, a
    live run's placement group was removed (docs/reliability.md)."""
    import ray
    from ray.util.state import get_actor

    @ray.remote(num_cpus=0)
    class Asker:
        def ask_about_itself(self) -> tuple:
            state = get_actor(ray.get_runtime_context().get_actor_id())
            return os.environ.get("RAY_ADDRESS"), state.state if state else None

    asker = Asker.remote()
    try:
        address, state = ray.get(asker.ask_about_itself.remote(), timeout=60)
    finally:
        ray.kill(asker)
    assert address == ray.get_runtime_context().gcs_address
    assert state == "ALIVE"


def test_two_workers_learn_survive_a_killed_worker_and_resume(digits_workspace):
    """Two DDP workers on the prepared digits. SIGKILL one mid-run: the run restarts it from
    the last checkpoint and finishes. The splits stream through Ray Data in that run
    (in_memory_limit_mb=0), the path for data that does not fit in memory. Then the same run
    name with one epoch more continues after the last epoch (from memory, the default path),
    and the checkpoint and its evaluation hold what serving and monitoring read."""
    import ray
    from ray.util.state import list_actors

    workspace = digits_workspace  # the session's prepared digits: this test is about training
    workers = ["train.num_workers=2", "train.cpus_per_worker=0.5"]
    cfg = load_config(None, FAST + workers + ["train.epochs=3", "train.max_failures=1",
                                              "train.in_memory_limit_mb=0"])
    run_dir = Path(workspace.root) / "runs" / "digits-killed"
    killed = []

    def checkpoints():
        return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())

    def kill_after_first_checkpoint():
        deadline = time.time() + 120
        while time.time() < deadline and not checkpoints():
            time.sleep(0.2)
        # The session's own address: left to itself the state API reads Ray's record of the
        # last `ray start` cluster, which need not be this session's.
        alive = list_actors(address=ray.get_runtime_context().gcs_address,
                            filters=[("state", "=", "ALIVE")])
        training = [a for a in alive if a.class_name.endswith("RayTrainWorker")]
        if training:
            os.kill(training[-1].pid, signal.SIGKILL)
            killed.append(training[-1].pid)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    said: list[str] = []
    ctrl_c = signal.getsignal(signal.SIGINT)
    first = run_train(cfg, workspace=workspace, run_name="digits-killed", log=said.append)
    killer.join(timeout=5)
    # Ray Train installs a SIGINT handler from the main thread and leaves it: ours is kept
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is ctrl_c
    assert any("streamed through Ray Data every epoch" in line for line in said), said
    assert any(line.startswith("reusing the prepared dataset") for line in said), said
    assert killed, "no training worker was found to kill"
    assert ray.is_initialized()
    assert first.epochs_run == 3
    latest = checkpoints()[-1]  # Ray keeps the latest checkpoint beside the best ones
    history = load_train_state(latest)["history"]
    assert [h["epoch"] for h in history] == list(range(1, 4))  # resumed, not restarted at 1
    assert first.metrics["val_accuracy"] > 0.5 and first.test_accuracy > 0.5  # chance: 0.1

    def dataset_managers() -> int:
        return len(list_actors(address=ray.get_runtime_context().gcs_address,
                               filters=[("class_name", "=", "DatasetManager")]))

    streamed = dataset_managers()
    assert streamed >= 1  # the streamed run hands out its splits through one
    # the same run name with more epochs continues after epoch 3, not from scratch
    longer = load_config(None, FAST + workers + ["train.epochs=4"])
    resumed = run_train(longer, workspace=workspace, run_name="digits-killed")
    assert dataset_managers() == streamed  # from memory: none started (ray_train_fixes.py)
    assert resumed.epochs_run == 4
    history = load_train_state(checkpoints()[-1])["history"]
    assert [h["epoch"] for h in history] == list(range(1, 5))
    # the two DDP replicas hold bit-identical weights whenever a checkpoint keeps them
    synced = [h["replicas_in_sync"] for h in history if "replicas_in_sync" in h]
    assert synced == [1.0] * len(synced) and "replicas_in_sync" in history[-1]

    checkpoint = Path(resumed.checkpoint)
    for name in ("model.pt", "model.json", "preprocessing.json", "reference.json",
                 "checksums.json", "train_state.pt"):
        assert (checkpoint / name).is_file()
    loaded = load_model(checkpoint)
    assert loaded.model_config["num_classes"] == 10
    assert loaded.preprocessor.class_names == [str(d) for d in range(10)]
    assert sum(loaded.reference["label_counts"].values()) == 1259  # the drift reference
    assert len(loaded.reference["features"]["orientation"]) == 1259
    assert all(0 < c <= 1 for c in loaded.reference["confidence"])

    evaluation = evaluate_checkpoint(resumed.checkpoint, "test", workspace=workspace)
    assert evaluation.samples == 269
    assert evaluation.accuracy == pytest.approx(resumed.test_accuracy)
    assert 0 < evaluation.macro_f1 <= 1
    assert evaluation.baseline_accuracy > 0.9  # the SVC reference row, fitted in the same run
    report = json.loads((Path(evaluation.path) / "report.json").read_text())
    assert len(report["metrics"]["per_class"]) == 10
    assert sum(map(sum, report["metrics"]["confusion_matrix"])) == 269
    for png in ("confusion_matrix.png", "learning_curves.png", "class_attribution.png"):
        assert Image.open(Path(evaluation.path) / png).size[0] > 300
    with pytest.raises(InputError, match="unknown split"):
        evaluate_checkpoint(resumed.checkpoint, "holdout", workspace=workspace)


def test_tampered_checkpoint_is_refused(digits_model, tmp_path):
    checkpoint = shutil.copytree(digits_model.result.checkpoint, tmp_path / "checkpoint")
    weights = checkpoint / "model.pt"
    state = torch.load(weights, weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, weights)
    with pytest.raises(InputError, match="does not match its checksum"):
        load_model(checkpoint)


def test_nan_loss_names_the_epoch_and_the_fix(workspace, digits_model):
    """`mlsd train`'s path: the error names the epoch and the fix, and the MLflow run that
    tracked it live ends FAILED, with its params and dataset."""
    from mlflow import MlflowClient

    from mlsd_ray import registry

    cfg = load_config(None, ["data.image_size=8", "data.augment.random_shift=1", "train.epochs=2",
                             "train.num_workers=0", "train.optimizer=sgd", "train.lr=1e6",
                             "train.max_failures=0", "train.run_name=diverges"])
    with pytest.raises(WorkError, match=r"loss became nan in epoch 1: lower train\.lr"):
        # the session's prepared data
        train_and_register(cfg, workspace=workspace, dataset=digits_model.dataset,
                           log=lambda _: None)
    experiment = registry.client(workspace).get_experiment_by_name(registry.EXPERIMENT)
    [run] = MlflowClient().search_runs([experiment.experiment_id],
                                       "attributes.run_name = 'diverges'")
    assert run.info.status == "FAILED" and run.data.params["train.lr"] == "1000000.0"
    [tracked] = run.inputs.dataset_inputs
    assert tracked.dataset.digest == digits_model.dataset.manifest["fingerprint"][:36]


def test_more_workers_than_cpus_fails_fast():
    cfg = load_config(None, ["train.num_workers=8"]).train
    with pytest.raises(InputError, match="need 8 CPUs; the Ray cluster has 2"):
        check_resources(cfg)
    with pytest.raises(InputError, match="GPU"):
        check_resources(load_config(None, ["train.use_gpu=true"]).train)
