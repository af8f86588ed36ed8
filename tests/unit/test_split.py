import numpy as np
import pandas as pd

from mlsd_ray.core.split import resolve, stratified_splits


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


def test_quality_warnings_name_the_problems():
    from mlsd_ray.tasks.image.data.report import _warnings

    def counts(train, val, test):
        return {"train": train, "val": val, "test": test, "total": train + val + test}

    assert _warnings({"a": counts(10, 2, 2), "b": counts(9, 2, 2)}, 27) == []
    single = _warnings({"a": counts(2, 0, 0)}, 2)
    assert any("only 1 class" in w for w in single)
    assert any("val split is empty" in w for w in single)
    notes = _warnings({"a": counts(200, 20, 20), "b": counts(3, 0, 1), "c": counts(0, 0, 0)}, 244)
    assert any("1 of 2 classes have no val rows (b)" in w for w in notes)
    assert any("declared classes have no images: c" in w for w in notes)
    assert any("imbalanced" in w for w in notes)
