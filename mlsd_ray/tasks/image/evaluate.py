"""`mlsd evaluate`: a trained model's report on a split of its prepared dataset.

Metrics come from scikit-learn. The report carries a reference row: an SVC on flattened pixels,
fitted on the same train split and scored on the same split in the same run.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlsd_ray.core import storage
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.explain import figure_png
from mlsd_ray.tasks.image.data.prepare import PreparedDataset
from mlsd_ray.training.checkpoint import load_train_state


def classification_metrics(labels, predictions, class_names: list[str]) -> dict:
    """Accuracy, macro precision/recall/F1, a per-class table and the confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    indices = list(range(len(class_names)))
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=indices, average="macro", zero_division=0)
    per_p, per_r, per_f, support = precision_recall_fscore_support(
        labels, predictions, labels=indices, average=None, zero_division=0)
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "macro_precision": float(precision), "macro_recall": float(recall),
            "macro_f1": float(f1),
            "per_class": [{"class": name, "precision": float(p), "recall": float(r),
                           "f1": float(f), "support": int(s)}
                          for name, p, r, f, s in zip(class_names, per_p, per_r, per_f, support)],
            "confusion_matrix": confusion_matrix(labels, predictions, labels=indices).tolist()}


def svc_baseline(dataset: PreparedDataset, split: str) -> dict:
    """scikit-learn's SVC on flattened [0, 1] pixels: train split -> `split`, timed."""
    from sklearn.svm import SVC

    started = time.perf_counter()
    x_train, y_train = dataset.load_split("train")
    x_eval, y_eval = dataset.load_split(split)
    features = x_train.reshape(len(x_train), -1) / 255.0
    # gamma 0.001 on digits' 0-16 scale, the classic setting, is 0.256 on a 0-1 scale for 8x8;
    # "scale" generalises it to any image size.
    model = SVC(gamma="scale").fit(features, y_train)
    predictions = model.predict(x_eval.reshape(len(x_eval), -1) / 255.0)
    return {"model": "sklearn SVC (rbf, gamma=scale) on flattened pixels",
            "accuracy": float((predictions == y_eval).mean()),
            "seconds": round(time.perf_counter() - started, 2)}


def confusion_png(matrix: list[list[int]], class_names: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=class_names).plot(
        ax=ax, colorbar=False, cmap="Blues")
    ax.set_title("confusion matrix")
    return figure_png(fig, dpi=100, tight=True)


def curves_png(history: list[dict]) -> bytes:
    """Loss and accuracy per epoch, train and val."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        loss_ax.plot(epochs, [h[key] for h in history], marker="o", label=label)
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "val")):
        acc_ax.plot(epochs, [h[key] for h in history], marker="o", label=label)
    from matplotlib.ticker import MaxNLocator

    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.legend()
    acc_ax.legend()
    return figure_png(fig, dpi=100, tight=True)


def _markdown(report: dict) -> str:
    m = report["metrics"]
    lines = [f"# Evaluation of `{report['model']}` on the {report['split']} split", "",
             f"Dataset `{report['dataset']}`, {report['samples']} images, {report['created_at']}",
             "", "| model | accuracy | macro precision | macro recall | macro F1 |",
             "|---|---|---|---|---|",
             f"| {report['model_name']} | {m['accuracy']:.4f} | {m['macro_precision']:.4f} | "
             f"{m['macro_recall']:.4f} | {m['macro_f1']:.4f} |",
             f"| {report['baseline']['model']} | {report['baseline']['accuracy']:.4f} | | | |",
             "", "## Per class", "", "| class | precision | recall | F1 | support |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['class']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | "
              f"{r['support']} |" for r in m["per_class"]]
    lines += ["", "![confusion matrix](confusion_matrix.png)", "",
              "![learning curves](learning_curves.png)", "",
              "![where the model looks, per class](class_attribution.png)", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class ImageEvaluation:
    """A classifier's scores on one split beside the SVC reference, and the files written
    (report.md, and report.json beside it, the two plots) in `path`."""

    split: str
    samples: int
    accuracy: float
    macro_f1: float
    macro_precision: float
    macro_recall: float
    baseline_accuracy: float
    path: str
    report: str
    confusion_matrix_png: str
    learning_curves_png: str
    attribution_png: str  # where the model looks, per class (tasks/image/explain.py)

    def to_dict(self) -> dict:
        return asdict(self)

    def headline(self) -> str:
        return (f"accuracy {self.accuracy:.4f}, macro F1 {self.macro_f1:.4f}, SVC reference "
                f"{self.baseline_accuracy:.4f}")

    def describe(self) -> str:
        return (f"{self.split}: {self.samples} images, {self.headline()}\n"
                f"report: {self.report}\n"
                f"plots: {self.confusion_matrix_png}, {self.learning_curves_png}, "
                f"{self.attribution_png}")


def evaluate_checkpoint(checkpoint_dir: str, split: str, workspace: Workspace,
                        dataset_path: str | None = None) -> ImageEvaluation:
    """Write report.json, report.md, confusion_matrix.png, learning_curves.png and
    class_attribution.png."""
    from mlsd_ray.tasks.image.checkpoint import load_model
    from mlsd_ray.tasks.image.explain import class_attribution_png
    from mlsd_ray.tasks.image.train import predict_images

    if not Path(checkpoint_dir).is_dir():
        raise InputError(f"no checkpoint at {checkpoint_dir}")
    loaded = load_model(checkpoint_dir)
    dataset = PreparedDataset.open(dataset_path or loaded.metadata.dataset.path)
    if split not in dataset.manifest["counts"]["splits"]:
        raise InputError(f"unknown split {split!r}; choose train, val or test")
    images, labels = dataset.load_split(split)  # once, for the scores and the attributions
    result = predict_images(loaded, images, labels)  # the model is loaded (and verified) once
    class_names = dataset.manifest["class_names"]
    run = loaded.metadata.run_name
    out = workspace.report(run, split)
    report = {"model": str(checkpoint_dir), "model_name": loaded.model_config["name"],
              "run_name": run, "split": split, "dataset": dataset.path,
              "samples": result.samples,
              "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "metrics": classification_metrics(result.labels, result.predictions, class_names),
              "baseline": svc_baseline(dataset, split)}
    history = load_train_state(checkpoint_dir)["history"]
    storage.write_json(storage.join(out, "report.json"), report)
    storage.write_text(storage.join(out, "report.md"), _markdown(report))
    storage.write_bytes(storage.join(out, "confusion_matrix.png"),
                        confusion_png(report["metrics"]["confusion_matrix"], class_names))
    storage.write_bytes(storage.join(out, "learning_curves.png"), curves_png(history))
    storage.write_bytes(storage.join(out, "class_attribution.png"),
                        class_attribution_png(loaded, images, labels))
    m = report["metrics"]
    return ImageEvaluation(
        split=split, samples=result.samples, accuracy=m["accuracy"], macro_f1=m["macro_f1"],
        macro_precision=m["macro_precision"], macro_recall=m["macro_recall"],
        baseline_accuracy=report["baseline"]["accuracy"], path=out,
        report=storage.join(out, "report.md"),
        confusion_matrix_png=storage.join(out, "confusion_matrix.png"),
        learning_curves_png=storage.join(out, "learning_curves.png"),
        attribution_png=storage.join(out, "class_attribution.png"))
