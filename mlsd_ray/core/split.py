"""Stratified train/val/test assignment and duplicate resolution, on light per-row metadata.

These run on the driver over ids, labels and content hashes only (no pixels), so they stay cheap
and deterministic: rows are sorted by id first, whatever order Ray Data delivered them in.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["resolve", "SPLITS", "stratified_splits"]

SPLITS = ("train", "val", "test")


def stratified_splits(labels: np.ndarray, val_fraction: float, test_fraction: float,
                      seed: int) -> np.ndarray:
    """Assign each row to train/val/test so that every class keeps the same proportions.

    Per class, a seeded shuffle then round(n * fraction) rows to test and to val; a class too
    small to share (one row) stays in train.
    """
    rng = np.random.default_rng(seed)
    assignment = np.full(len(labels), "train", dtype=object)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        if n_test + n_val >= len(members):  # always leave at least one training row
            n_test, n_val = min(n_test, len(members) - 1), 0
        assignment[members[:n_test]] = "test"
        assignment[members[n_test:n_test + n_val]] = "val"
    return assignment


def resolve(meta: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int,
            class_names: list[str] | None = None) -> tuple[pd.DataFrame, dict]:
    """Split valid rows and quarantine exact duplicates.

    `meta` has columns id, label, hash (valid rows only). Splits are drawn over all valid rows;
    then every row whose pixels equal an earlier row's (by id order) is marked `duplicate`.
    Those that would have landed in another split than their twin (train/test leakage) are
    counted separately. Returns meta with `split` (or None), `status`, `detail`, and a summary.
    `class_names` only makes the details readable.
    """
    name = (lambda i: class_names[i]) if class_names else str
    meta = meta.sort_values("id", kind="stable").reset_index(drop=True)
    meta["split"] = stratified_splits(meta["label"].to_numpy(), val_fraction, test_fraction, seed)
    is_duplicate = meta.duplicated("hash", keep="first").to_numpy()
    keeper_index = meta.index.to_series().groupby(meta["hash"]).transform("first").to_numpy()
    keeper = meta["id"].to_numpy()[keeper_index]
    keeper_split = meta["split"].to_numpy()[keeper_index]
    keeper_label = meta["label"].to_numpy()[keeper_index]
    crosses = is_duplicate & (meta["split"].to_numpy() != keeper_split)
    conflicts = is_duplicate & (meta["label"].to_numpy() != keeper_label)

    meta["status"] = np.where(is_duplicate, "duplicate", "ok")
    meta["detail"] = [
        (f"same pixels as {k}"
         + (f"; labels differ ({name(lab)} vs {name(klab)})" if conflict else "")
         + (f"; would have leaked {s} vs {ks}" if cross else "")) if dup else ""
        for dup, k, lab, klab, conflict, s, ks, cross in zip(
            is_duplicate, keeper, meta["label"], keeper_label, conflicts, meta["split"],
            keeper_split, crosses)]
    meta.loc[is_duplicate, "split"] = None
    summary = {"removed": int(is_duplicate.sum()), "cross_split": int(crosses.sum()),
               "conflicting_labels": int(conflicts.sum())}
    return meta, summary
