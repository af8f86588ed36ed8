"""`mlsd explain` for a parts task: why the model answered what it did.

- Per row, Integrated Gradients (Captum) over every position of the model's input (the codec's
  `encode`; for a window of a series, one number per step), towards the prediction (or the
  predicted class's score), drawn as a bar chart per row.
- Over the test split, permutation importance: how much the model part's metric drops when
  one input column is shuffled across rows.
- The sanity checks of mlsd_ray/explain, as for images. The same network with fresh random
  weights must be attributed otherwise: a Spearman rank correlation of 0.5 or more means the
  attributions describe the input rather than the model. And deleting the most attributed
  input positions first (set to the baseline, 0) must take the answer to where deleting all
  of them takes it faster than deleting them in a random order.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd

from mlsd_ray import explain
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.stages.data import PreparedRows, read_rows
from mlsd_ray.stages.model import LoadedModel
from mlsd_ray.stages.traffic import instances

__all__ = ["explain_rows", "permutation_importance", "sanity_checks"]

IG_STEPS = 32


def permutation_importance(loaded: LoadedModel, rows: pd.DataFrame,
                           seed: int = 0) -> dict[str, float]:
    """Per input column, the drop of the metric when the column is shuffled, largest first."""
    metric = loaded.parts.model.metric
    return explain.permutation_importance(lambda shuffled: loaded.scores(shuffled)[metric],
                                          rows, loaded.parts.data.inputs, seed, digits=4)


def attributions(module, inputs: np.ndarray) -> np.ndarray:
    """Integrated Gradients of each row's output (the predicted class's, for several
    outputs) from an all-zero baseline: one number per input position (rows × positions)."""
    import torch
    from captum.attr import IntegratedGradients

    x = torch.from_numpy(np.ascontiguousarray(inputs))
    with torch.no_grad():
        outputs = module(x)
    target = outputs.argmax(1).tolist() if outputs.dim() > 1 and outputs.shape[1] > 1 else None

    def forward(batch: torch.Tensor) -> torch.Tensor:
        out = module(batch)
        return out.reshape(len(batch), -1).squeeze(1) if target is None else out

    with torch.backends.cudnn.flags(enabled=False):  # recurrent layers' backward in eval mode
        found = IntegratedGradients(forward).attribute(x, target=target, n_steps=IG_STEPS)
    return found.detach().reshape(len(inputs), -1).numpy()


def _row_chart(values: np.ndarray, index: int, prediction) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 2.4))
    axis.bar(np.arange(len(values)), values,
             color=["#c0504d" if v > 0 else "#4878a8" for v in values])
    axis.set_xlabel("input position (the codec's encoding)")
    axis.set_ylabel("integrated gradients")
    shown = prediction if isinstance(prediction, str) else f"{float(prediction):.4g}"
    axis.set_title(f"row {index}: prediction {shown}", fontsize=9)
    figure.tight_layout()
    return explain.figure_png(figure)


def _rows(loaded: LoadedModel, prepared: PreparedRows, source: str | None, label: str | None,
          count: int) -> pd.DataFrame:
    """`count` rows of the test split, or of `source` (its unusable rows left out); with
    `label`, only rows whose target is that value."""
    if source is None:
        rows = prepared.load_split("test")
    else:
        section = loaded.section.model_copy(update={"source": source})
        rows = read_rows(loaded.parts, section, need_target=False)
        rows = rows[loaded.parts.data.problems(rows, section).fillna("") == ""]
    if label is not None:
        rows = rows[rows[loaded.parts.data.target].astype(str) == label]
    if rows.empty:
        raise InputError(f"no usable row{' with target ' + repr(label) if label else ''} to "
                         f"explain in {source or 'the test split'}")
    return rows.head(count).reset_index(drop=True)


def _answer(module, target: list[int] | None):
    """The input -> one number per row: the output, or the `target` class's score."""
    import torch

    def answer(inputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)))
        out = out.reshape(len(inputs), -1).float().numpy()
        return out[:, 0] if target is None else out[np.arange(len(out)), target]
    return answer


def sanity_checks(module, randomised, encoded: np.ndarray, found: np.ndarray,
                  seed: int = 0) -> explain.SanityChecks:
    """The randomisation and deletion checks of Integrated Gradients' `found` (rows ×
    positions) on `encoded`, for the trained `module` and its `randomised` copy."""
    import torch

    with torch.no_grad():
        outputs = module(torch.from_numpy(np.ascontiguousarray(encoded)))
    outputs = outputs.reshape(len(encoded), -1)
    target = outputs.argmax(1).tolist() if outputs.shape[1] > 1 else None
    answer = _answer(module, target)
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(found.shape[1]) for _ in range(len(found))])
    ranked = np.argsort(-np.abs(found), axis=1, kind="stable")
    method = "integrated_gradients"
    return explain.SanityChecks(
        randomised_correlation={method: round(explain.rank_correlation(
            found, attributions(randomised, encoded)), 4)},
        deletion_auc={method: round(float(explain.remaining_answer_curve(
            answer, encoded, ranked).mean()), 4)},
        random_deletion_auc=round(float(explain.remaining_answer_curve(
            answer, encoded, shuffled).mean()), 4))


def explain_rows(loaded: LoadedModel, source: str | None, label: str | None, count: int,
                 out: str | None, workspace: Workspace) -> explain.ExplanationResult:
    """Explain `count` rows (see the module docstring); write the charts and JSON to `out`."""
    import torch

    prepared = PreparedRows.open(loaded.metadata.dataset.path)
    importance = permutation_importance(loaded, prepared.load_split("test"))
    rows = _rows(loaded, prepared, source, label, count)
    encoded = loaded.parts.codec.encode(rows, loaded.state)
    found = attributions(loaded.module, encoded)
    torch.manual_seed(1)
    randomised = loaded.parts.model.build(loaded.section, encoded).eval()
    sanity = sanity_checks(loaded.module, randomised, encoded, found)
    predictions = loaded.predict(rows)
    out = out or workspace.explanations(loaded.metadata.run_name, time.strftime("%Y%m%d-%H%M%S"))
    charts = [explain.write_output(out, f"rows/{i:03d}.png", _row_chart(values, i, answer))
              for i, (values, answer) in enumerate(zip(found, predictions))]
    explained = [{"instance": instance, "prediction": loaded.parts.codec.answer(p),
                  "attributions": np.round(values, 6).tolist()}
                 for instance, p, values in zip(instances(rows, loaded.parts.data.inputs),
                                                predictions, found)]
    json_file = explain.write_output(out, "explanations.json", json.dumps(
        {"permutation_importance": importance, "sanity": sanity.to_dict(),
         "explanations": explained}, indent=2).encode())
    return explain.ExplanationResult(out=out, explained=len(rows), overlays=charts, figures=[],
                                     json_file=json_file, sanity=sanity, importance=importance)
