"""The data stage end to end on real Ray Data: every source, quarantine, reuse, outputs on disk."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.tasks import load_config
from mlsd_ray.tasks.image.data.prepare import prepare_dataset

pytestmark = pytest.mark.usefixtures("ray_session")


def read_split(dataset, split: str) -> pa.Table:
    return pq.read_table(dataset.split_path(split))


def images_of(table: pa.Table, shape) -> np.ndarray:
    column = table.column("image").combine_chunks()
    return column.to_numpy_ndarray() if hasattr(column, "to_numpy_ndarray") else np.stack(
        [np.asarray(x).reshape(shape) for x in column.to_pylist()])


def test_digits_end_to_end(workspace):
    dataset = prepare_dataset(load_config(), workspace=workspace)
    m = dataset.manifest
    counts = m["counts"]
    assert counts["input"] == 1797
    assert counts["input"] == counts["kept"] + counts["quarantined"]
    assert sum(counts["splits"].values()) == counts["kept"]
    assert m["class_names"] == [str(d) for d in range(10)]
    for name in ("manifest.json", "quality.json", "quality.md", "config.yaml", "samples.png"):
        assert (Path(dataset.path) / name).is_file()
    assert Image.open(Path(dataset.path) / "samples.png").size[0] > 100
    assert Path(dataset.path).parent.parent == Path(workspace.root) / "datasets"

    train = read_split(dataset, "train")
    assert train.num_rows == counts["splits"]["train"]
    assert set(train.column_names) == {"id", "source", "image", "label", "hash"}
    images = images_of(train, (16, 16, 1))  # digits: 8×8 upsampled
    assert images.shape[1:] == (16, 16, 1) and images.dtype == np.uint8
    # normalisation is fitted on the train split only
    pre = m["preprocessing"]
    assert pre["mean"][0] == pytest.approx(images.mean() / 255, abs=1e-6)
    assert pre["std"][0] == pytest.approx((images / 255).std(), abs=1e-6)
    normalized = dataset.preprocessor(images)  # what training will feed the model
    assert normalized.shape == (len(images), 1, 16, 16)
    assert abs(normalized.mean().item()) < 1e-4 and abs(normalized.std().item() - 1) < 1e-3
    # stratified: every class is in every split
    for split in ("train", "val", "test"):
        labels = read_split(dataset, split).column("label").to_numpy()
        assert set(labels) == set(range(10))
    # no id appears in two splits
    ids = [set(read_split(dataset, s).column("id").to_pylist()) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    quality = json.loads((Path(dataset.path) / "quality.json").read_text())
    assert quality["imbalance_ratio"] == pytest.approx(183 / 174, abs=1e-3)
    assert sum(c["total"] for c in quality["classes"].values()) == counts["kept"]

    again = prepare_dataset(load_config(), workspace=workspace)
    assert again.reused and again.path == dataset.path
    # 60 read tasks instead of 2, finishing in any order: the rows keep the source's order,
    # because training deals them by position (the same seed must train the same model)
    forced = prepare_dataset(load_config(None, ["data.rows_per_task=30"]), workspace=workspace,
                             force=True)
    assert not forced.reused and forced.path == dataset.path
    assert forced.manifest["counts"] == counts
    for split in ("train", "val", "test"):
        order = read_split(forced, split).column("id").to_pylist()
        assert order == sorted(order), f"{split} rows are not in the source's order"
    changed = prepare_dataset(load_config(None, ["data.seed=1"]), workspace=workspace)
    assert changed.path != dataset.path


def test_folder_with_corrupt_and_unlabeled_files(tmp_path, workspace):
    from tests.conftest import make_image_folder, write_png

    root = make_image_folder(tmp_path / "imgs", per_class=10)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    write_png(root / "loose.png", np.zeros((20, 20, 3), np.uint8))
    shutil.copy(root / "cat" / "cat000.png", root / "dog" / "zz-copy-of-cat.png")

    dataset = prepare_dataset(load_config(None, [f"data.source=folder:{root}",
                                                 "data.image_size=16"]), workspace=workspace)
    counts = dataset.manifest["counts"]
    assert counts["input"] == 34 and counts["kept"] == 30 and counts["quarantined"] == 4
    assert dataset.manifest["quarantine_by_reason"] == {
        "corrupt_image": 2, "missing_label": 1, "duplicate": 1}
    assert dataset.manifest["duplicates"]["conflicting_labels"] == 1

    index = list(csv.DictReader(io.StringIO(
        (Path(dataset.path) / "quarantine" / "index.csv").read_text())))
    reasons = {row["id"]: row["reason"] for row in index}
    assert reasons == {"cat/broken.png": "corrupt_image", "dog/empty.jpg": "corrupt_image",
                       "loose.png": "missing_label", "dog/zz-copy-of-cat.png": "duplicate"}
    rows = pq.read_table(Path(dataset.path) / "quarantine" / "rows").to_pylist()
    payloads = {r["id"]: r["payload"] for r in rows}
    assert payloads["cat/broken.png"] == (root / "cat" / "broken.png").read_bytes()
    images = images_of(read_split(dataset, "train"), (16, 16, 3))
    assert images.shape[1:] == (16, 16, 3)
    assert "corrupt_image" in (Path(dataset.path) / "quality.md").read_text()


def test_unknown_labels_with_declared_classes(image_folder, workspace):
    cfg = load_config(None, [f"data.source=folder:{image_folder}", "data.class_names=[cat, dog]"])
    dataset = prepare_dataset(cfg, workspace=workspace)
    assert dataset.manifest["quarantine_by_reason"] == {"unknown_label": 10}
    assert dataset.manifest["counts"]["kept"] == 20


def test_folder_without_a_valid_image_is_bad_input(tmp_path, workspace):
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="no valid image.*1 corrupt_image"):
        prepare_dataset(load_config(None, [f"data.source=folder:{tmp_path / 'bad'}"]),
                        workspace=workspace)


def test_files_outside_class_folders_have_no_label(tmp_path, workspace):
    from tests.conftest import write_png

    for i in range(2):
        write_png(tmp_path / "flat" / f"{i}.png", np.full((6, 6, 3), i, np.uint8))
    with pytest.raises(InputError, match="no valid image.*2 missing_label"):
        prepare_dataset(load_config(None, [f"data.source=folder:{tmp_path / 'flat'}"]),
                        workspace=workspace)


def test_parquet_bytes_and_arrays(tmp_path, workspace):
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(30):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (10, 10), dtype=np.uint8)).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    labels = ["even", "odd"] * 15
    encoded[3], labels[4] = b"corrupt", None
    pq.write_table(pa.table({"image": encoded, "label": labels}), tmp_path / "bytes.parquet",
                   row_group_size=8)
    dataset = prepare_dataset(load_config(None, [f"data.source=parquet:{tmp_path/'bytes.parquet'}",
                                                 "data.channels=1", "data.image_size=10"]),
                              workspace=workspace)
    assert dataset.manifest["class_names"] == ["even", "odd"]
    assert dataset.manifest["counts"]["kept"] == 28
    assert dataset.manifest["quarantine_by_reason"] == {"corrupt_image": 1, "missing_label": 1}

    arrays = [rng.random((6, 6)).tolist() for _ in range(20)]
    arrays[0][2][2] = float("nan")
    folder = tmp_path / "arrays"
    folder.mkdir()
    pq.write_table(pa.table({"pixels": arrays[:10], "y": list(range(10))}), folder / "a.parquet")
    pq.write_table(pa.table({"pixels": arrays[10:], "y": list(range(10))}), folder / "b.parquet")
    dataset = prepare_dataset(load_config(None, [
        f"data.source=parquet:{folder}", "data.image_column=pixels", "data.label_column=y",
        "data.val_fraction=0", "data.test_fraction=0"]), workspace=workspace)
    assert dataset.manifest["counts"]["kept"] == 19
    assert dataset.manifest["quarantine_by_reason"] == {"non_finite": 1}
    assert dataset.manifest["schema"]["image"]["shape"] == [32, 32, 3]
    train_ids = set(read_split(dataset, "train").column("id").to_pylist())
    assert "b.parquet#9" in train_ids and "a.parquet#0" not in train_ids


def test_synthetic_is_learnable(workspace):
    cfg = load_config(None, ["data.source=synthetic:300", "data.synthetic.num_classes=3",
                             "data.synthetic.image_size=12", "data.synthetic.channels=1"])
    dataset = prepare_dataset(cfg, workspace=workspace)
    assert dataset.manifest["counts"]["kept"] == 300
    train, test = read_split(dataset, "train"), read_split(dataset, "test")
    x_train = images_of(train, (12, 12, 1)).reshape(train.num_rows, -1) / 255.0
    x_test = images_of(test, (12, 12, 1)).reshape(test.num_rows, -1) / 255.0
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=500).fit(x_train, train.column("label").to_numpy())
    accuracy = model.score(x_test, test.column("label").to_numpy())
    assert accuracy > 0.6  # chance is 1/3


def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: magic (0, 0, dtype 0x08, ndim), big-endian sizes, raw bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_local_files(tmp_path, workspace):
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 255, (40, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(40) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 255, (10, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(10))
    cfg = load_config(None, [f"data.source=torchvision:MNIST:{tmp_path / 'tv'}"])
    dataset = prepare_dataset(cfg, workspace=workspace)
    assert dataset.manifest["counts"]["input"] == 40
    assert dataset.manifest["class_names"][3] == "3 - three"
    assert dataset.manifest["schema"]["image"]["shape"] == [28, 28, 1]


def test_inputs_and_outputs_as_uris(tmp_path, image_folder):
    dataset = prepare_dataset(load_config(None, [f"data.source=folder:file://{image_folder}"]),
                              workspace=Workspace.at(f"file://{tmp_path}/remote-home"))
    assert dataset.manifest["counts"]["kept"] == 30
    assert dataset.path.startswith("file://")
    local = Path(dataset.path.removeprefix("file://"))
    assert (local / "manifest.json").is_file()
    assert pq.read_table(local / "train").num_rows == dataset.manifest["counts"]["splits"]["train"]
