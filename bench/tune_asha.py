"""Benchmark: the same random search with ASHA and without a scheduler.

Both searches draw the same trials (the sampler is seeded) over the same space on the same
prepared digits, one after the other in one process. Prints one JSON line with the total
trial-epochs, wall time and best val accuracy of each, and the ratios.
Target: ASHA uses <= 50% of the trial-epochs and its best accuracy is within 0.5 points.

    python bench/tune_asha.py [--samples 8] [--epochs 20] [--grace-period 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsd_ray.core.workspace import Workspace  # noqa: E402
from mlsd_ray.tasks import load_config  # noqa: E402
from mlsd_ray.tuning.search import run_tune  # noqa: E402

SPACE = "{train.lr: {loguniform: [1.0e-4, 3.0e-2]}, train.batch_size: [32, 64, 128]}"


def search(workspace: Workspace, scheduler: str, args) -> dict:
    cfg = load_config(None, [f"tune.space={SPACE}", f"tune.num_samples={args.samples}",
                             f"tune.max_epochs={args.epochs}", f"tune.scheduler={scheduler}",
                             f"tune.grace_period={args.grace_period}",
                             "tune.reduction_factor=3", "registry.auto_register=false"])
    summary = run_tune(cfg, workspace=workspace, name=f"bench-{scheduler}", log=lambda _: None,
                       register=False)
    return {"trial_epochs": summary["trial_epochs"], "wall_s": summary["wall_seconds"],
            "best_val_accuracy": round(summary["best"]["val_accuracy"], 4),
            "stopped_early": summary["stopped_early"], "trials": summary["trials"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--grace-period", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        workspace = Workspace.at(folder)
        none = search(workspace, "none", args)
        asha = search(workspace, "asha", args)
    print(json.dumps({
        "bench": "tune_asha", "samples": args.samples, "max_epochs": args.epochs,
        "none": none, "asha": asha,
        "trial_epochs_ratio": round(asha["trial_epochs"] / none["trial_epochs"], 3),
        "wall_ratio": round(asha["wall_s"] / none["wall_s"], 3),
        "best_accuracy_gap_points": round(100 * (none["best_val_accuracy"]
                                                 - asha["best_val_accuracy"]), 2)}))


if __name__ == "__main__":
    main()
