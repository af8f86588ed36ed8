"""The data-quality report: per-class counts, imbalance, quarantine reasons, sizes, pixel stats."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlsd_ray.core.split import SPLITS
from mlsd_ray.explain import figure_png
from mlsd_ray.tasks.image.data.transforms import moments_to_mean_std


def _summary(values: pd.Series) -> dict:
    if values.empty:
        return {"min": None, "max": None, "mean": None}
    return {"min": int(values.min()), "max": int(values.max()), "mean": round(float(values.mean()),
                                                                                 2)}


def _warnings(per_class: dict, kept: int) -> list[str]:
    """Things a person should know before training on this dataset."""
    notes = []
    present = [n for n, c in per_class.items() if c["total"]]
    if len(present) < 2:
        notes.append(f"only {len(present)} class has images: a classifier needs two or more")
    for split in SPLITS[1:]:
        if kept and not any(c[split] for c in per_class.values()):
            notes.append(f"the {split} split is empty")
            continue
        lacking = [n for n in present if not per_class[n][split]]
        if lacking:
            shown = ", ".join(lacking[:5]) + (", ..." if len(lacking) > 5 else "")
            notes.append(f"{len(lacking)} of {len(present)} classes have no {split} rows "
                         f"({shown}): too few images to split")
    empty = [n for n, c in per_class.items() if not c["total"]]
    if empty:
        notes.append(f"{len(empty)} declared classes have no images: {', '.join(empty[:5])}")
    totals = [per_class[n]["total"] for n in present]
    if len(totals) > 1 and max(totals) / min(totals) > 10:
        notes.append(f"classes are imbalanced: largest/smallest = {max(totals) / min(totals):.1f}")
    return notes


def build_quality(rows: pd.DataFrame, class_names: list[str], pixel_stats: dict,
                  duplicates: dict, output_shape: list[int]) -> dict:
    """The quality report as a dict.

    `rows` holds every input row after all decisions: id, label (index or -1), split (or None),
    status, detail, orig_height, orig_width.
    """
    kept = rows[rows["status"] == "ok"]
    per_class: dict[str, dict[str, int]] = {}
    for index, name in enumerate(class_names):
        of_class = kept[kept["label"] == index]
        per_class[name] = {s: int((of_class["split"] == s).sum()) for s in SPLITS}
        per_class[name]["total"] = int(len(of_class))
    totals = [c["total"] for c in per_class.values()]
    quarantined = rows[rows["status"] != "ok"]
    sizes = kept.groupby(["orig_height", "orig_width"]).size().sort_values(ascending=False)
    return {
        "warnings": _warnings(per_class, len(kept)),
        "classes": per_class,
        "imbalance_ratio": round(max(totals) / min(totals), 3) if min(totals, default=0) else None,
        "empty_classes": [n for n, c in per_class.items() if c["total"] == 0],
        "quarantine": {
            "total": int(len(quarantined)),
            "by_reason": {k: int(v) for k, v in quarantined["status"].value_counts().items()},
            "examples": quarantined.head(20)[["id", "status", "detail"]]
            .rename(columns={"status": "reason"}).to_dict("records"),
        },
        "duplicates": duplicates,
        "image_size": {
            "original_height": _summary(kept["orig_height"]),
            "original_width": _summary(kept["orig_width"]),
            "most_common_original": [{"height": int(h), "width": int(w), "count": int(n)}
                                     for (h, w), n in sizes.head(5).items()],
            "output": output_shape,
        },
        "pixels": pixel_stats,
    }


def pixel_statistics(moments: pd.DataFrame) -> dict:
    """Per-channel mean/std in [0, 1] per split and overall, from per-batch moments."""
    stats = {}
    for split, group in list(moments.groupby("split")) + [("all", moments)]:
        count = float(group["count"].sum())
        total = np.sum(np.stack(group["sum"].to_numpy()), axis=0)
        sumsq = np.sum(np.stack(group["sumsq"].to_numpy()), axis=0)
        mean, std = moments_to_mean_std(count, total, sumsq)
        stats[split] = {"mean": mean, "std": std, "pixels": int(count)}
    return stats


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def render_markdown(manifest: dict, quality: dict) -> str:
    """A short human-readable summary of a prepared dataset."""
    counts = manifest["counts"]
    lines = [f"# Dataset `{manifest['name']}` ({manifest['fingerprint']})", "",
             f"Source: `{manifest['source']}`  ", f"Prepared: {manifest['created_at']}", "",
             "| input | kept | quarantined | train | val | test |", "|---|---|---|---|---|---|",
             f"| {counts['input']} | {counts['kept']} | {counts['quarantined']} | "
             + " | ".join(str(counts["splits"][s]) for s in SPLITS) + " |", "",
             *(f"**Warning:** {w}  " for w in quality["warnings"]),
             "", "## Classes", "", "| class | train | val | test | total |",
             "|---|---|---|---|---|"]
    for name, c in quality["classes"].items():
        lines.append(f"| {name} | {c['train']} | {c['val']} | {c['test']} | {c['total']} |")
    lines += ["", f"Imbalance ratio (largest / smallest class): {quality['imbalance_ratio']}", "",
              "## Quarantine", ""]
    by_reason = quality["quarantine"]["by_reason"]
    if by_reason:
        lines += ["| reason | rows |", "|---|---|"] + [f"| {r} | {n} |" for r, n in
                                                      by_reason.items()]
        lines += ["", "Every quarantined row, with its reason, is listed in "
                  "`quarantine/index.csv`; the rows themselves are in `quarantine/rows/`."]
    else:
        lines.append("Nothing was quarantined.")
    dup = quality["duplicates"]
    lines += ["", "Examples of each class: `samples.png`."]
    lines += ["", f"Exact duplicates removed: {dup['removed']} ({dup['cross_split']} would have "
              f"crossed splits, {dup['conflicting_labels']} with a different label).", "",
              "## Images", ""]
    size = quality["image_size"]
    height, width = size["original_height"], size["original_width"]
    lines.append(f"Original height {height['min']}–{height['max']} px (mean {height['mean']}), "
                 f"width {width['min']}–{width['max']} px (mean {width['mean']}); "
                 f"stored as {'×'.join(map(str, size['output']))} uint8.")
    pix, pre = quality["pixels"]["all"], manifest["preprocessing"]
    lines.append(f"Pixel mean {_fmt(pix['mean'])} and std {_fmt(pix['std'])} (0-1 scale); "
                 f"normalisation uses the train split only: mean {_fmt(pre['mean'])}, "
                 f"std {_fmt(pre['std'])}.")
    return "\n".join(lines) + "\n"


def sample_grid_png(images: np.ndarray, labels: np.ndarray, class_names: list[str],
                    per_class: int = 8) -> bytes:
    """A PNG with up to `per_class` example images per class, one row per class (20 at most)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    class_names = class_names[:20]
    rows = len(class_names)
    fig, axes = plt.subplots(rows, per_class, figsize=(per_class * 0.9, rows * 0.9 + 0.4),
                             squeeze=False)
    for row, name in enumerate(class_names):
        members = images[labels == row][:per_class]
        for col in range(per_class):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(members):
                image = members[col]
                ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray",
                          vmin=0, vmax=255, interpolation="nearest")
        axes[row][0].set_title(name, fontsize=7, loc="left")
    fig.suptitle("training examples per class", fontsize=9)
    fig.tight_layout()
    return figure_png(fig, dpi=80)
