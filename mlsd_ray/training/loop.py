"""What every task's Ray Train loop shares, inside each worker: the optimizer and per-step
schedule, sums across the DDP group, where each rank runs, early stopping, resuming from
Ray's latest checkpoint. The loops themselves (the CNN's in tasks/image/train.py, the MLP's in
tasks/tabular/train.py) differ in their batches, losses and scores."""

from __future__ import annotations

import logging
import warnings

import torch

from mlsd_ray.core.config import TrainConfig
from mlsd_ray.training.checkpoint import load_train_state, unwrap


def optimizer_for(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def scheduler_for(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step schedules, so a resumed run continues the same curve."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


def quiet_train_reports() -> None:
    """Ray Train logs every report at INFO under a logger named by its file path, which
    LoggingConfig's level does not reach; our own per-epoch line says the same, shorter."""
    import ray.train.v2._internal.execution.context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Sum per-worker totals across the DDP group (a no-op with one worker).

    Tensors live on the training device: NCCL only reduces CUDA tensors, gloo CPU ones.
    """
    if not distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.cpu().tolist()


def worker_nodes(rank: int) -> list[dict]:
    """Where each rank runs ({"rank", "node_id", "ip"}), gathered from every worker: kept in the
    checkpoint and the run summary, so a multi-node run shows where its replicas were."""
    import ray

    here = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address()}
    if not distributed():
        return [here]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, here)
    return gathered


def should_stop(history: list[dict], patience: int, metric: str) -> bool:
    """Early stopping: no better `metric` (the task's val score) for `patience` epochs."""
    if not patience or len(history) <= patience:
        return False
    best_before = max(h[metric] for h in history[:-patience])
    return all(h[metric] <= best_before for h in history[-patience:])


def fast_forward(scheduler, steps_done: int) -> None:
    """Put a fresh schedule at the step a resumed run had reached.

    Rebuilt rather than restored, so that resuming with more epochs stretches the schedule to
    the new length instead of running past its saved end.
    """
    if scheduler is None or not steps_done:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for _ in range(steps_done):
            scheduler.step()


def restore(checkpoint, model, optimizer) -> tuple[int, list[dict]]:
    """Continue from Ray's latest checkpoint (after a failure, or a re-run of the same name)."""
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        state = load_train_state(directory)
        weights = torch.load(f"{directory}/model.pt", map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state["history"])
