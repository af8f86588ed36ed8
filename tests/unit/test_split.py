import numpy as np
import pandas as pd

from mlsd_ray.data.split import resolve, stratified_splits


def test_stratified_proportions_per_class():
    labels = np.repeat([0, 1, 2], [100, 50, 20])
    splits = stratified_splits(labels, 0.1, 0.2, seed=0)
    for label, n in [(0, 100), (1, 50), (2, 20)]:
        mine = splits[labels == label]
        assert (mine == "test").sum() == round(n * 0.2)
        assert (mine == "val").sum() == round(n * 0.1)


def test_split_is_seeded():
    labels = np.repeat([0, 1], 50)
    a = stratified_splits(labels, 0.2, 0.2, seed=1)
    assert (a == stratified_splits(labels, 0.2, 0.2, seed=1)).all()
    assert (a != stratified_splits(labels, 0.2, 0.2, seed=2)).any()


def test_tiny_class_stays_in_train():
    splits = stratified_splits(np.array([0, 1, 1, 1, 1]), 0.4, 0.4, seed=0)
    assert splits[0] == "train"


def _meta(rows):
    return pd.DataFrame(rows, columns=["id", "label", "hash"])


def test_duplicates_are_quarantined_and_counted():
    rows = [(f"r{i:02d}", i % 2, f"h{i}") for i in range(40)]
    rows += [("z-dup-same", 0, "h0"), ("z-dup-other-label", 1, "h2")]
    decided, summary = resolve(_meta(rows), 0.25, 0.25, seed=0)
    dups = decided[decided["status"] == "duplicate"]
    assert set(dups["id"]) == {"z-dup-same", "z-dup-other-label"}
    assert dups["split"].isna().all()
    assert summary["removed"] == 2 and summary["conflicting_labels"] == 1
    assert "same pixels as r00" in dups.set_index("id").loc["z-dup-same", "detail"]
    assert 0 <= summary["cross_split"] <= 2
    kept = decided[decided["status"] == "ok"]
    assert len(kept) == 40 and kept["hash"].is_unique


def test_cross_split_duplicates_are_reported():
    rows = [(f"r{i:03d}", 0, f"h{i % 10}") for i in range(100)]  # 10 distinct images x 10
    decided, summary = resolve(_meta(rows), 0.2, 0.2, seed=0)
    assert summary["removed"] == 90
    assert summary["cross_split"] > 0  # some copies would have leaked across splits
    assert (decided["status"] == "ok").sum() == 10


def test_decisions_do_not_depend_on_row_order():
    rows = [(f"r{i:02d}", i % 3, f"h{i % 25}") for i in range(60)]
    a, _ = resolve(_meta(rows), 0.2, 0.2, seed=0)
    b, _ = resolve(_meta(rows[::-1]), 0.2, 0.2, seed=0)
    assert a.equals(b)
