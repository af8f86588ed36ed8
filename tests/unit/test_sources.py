"""Source parsing and input checks that need no Ray."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlsd_ray.core.errors import InputError
from mlsd_ray.tasks.image.config import DataConfig
from mlsd_ray.tasks.image.data.sources import parse_source


def test_unknown_source_lists_the_choices():
    with pytest.raises(InputError, match="unknown source 'imagenet'.*digits.*folder"):
        parse_source("imagenet", DataConfig())


def test_folder_problems(tmp_path):
    with pytest.raises(InputError, match="folder not found"):
        parse_source(f"folder:{tmp_path / 'absent'}", DataConfig())
    with pytest.raises(InputError, match="has no files"):
        parse_source(f"folder:{tmp_path}", DataConfig())
    with pytest.raises(InputError, match="needs a path"):
        parse_source("folder", DataConfig())
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="not a folder"):
        parse_source(f"folder:{tmp_path / 'x.txt'}", DataConfig())


def test_home_directory_is_expanded(monkeypatch, image_folder):
    monkeypatch.setenv("HOME", str(image_folder.parent))
    source = parse_source(f"folder:~/{image_folder.name}", DataConfig())
    assert source.arg == str(image_folder)


def test_folder_classes_and_hidden_files(image_folder):
    (image_folder / ".DS_Store").write_bytes(b"junk")
    (image_folder / "loose.png").write_bytes(b"junk")
    source = parse_source(f"folder:{image_folder}", DataConfig())
    assert source.class_names() == ["cat", "dog", "fox"]
    names = [rel for rel, _ in source._files]
    assert ".DS_Store" not in names and "loose.png" in names
    assert source.name == "images"
    configured = parse_source(f"folder:{image_folder}", DataConfig(class_names=["dog", "cat"]))
    assert configured.class_names() == ["dog", "cat"]


def test_fingerprint_input_changes_with_files(image_folder):
    before = parse_source(f"folder:{image_folder}", DataConfig()).identity()
    (image_folder / "cat" / "new.png").write_bytes(b"x")
    after = parse_source(f"folder:{image_folder}", DataConfig()).identity()
    assert before != after


def test_parquet_problems(tmp_path):
    with pytest.raises(InputError, match="not found"):
        parse_source(f"parquet:{tmp_path / 'absent.parquet'}", DataConfig())
    table = pa.table({"pixels": [b"x"], "y": [1]})
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(InputError, match="column 'image'.*columns are: pixels, y"):
        parse_source(f"parquet:{tmp_path / 't.parquet'}", DataConfig())
    ok = parse_source(f"parquet:{tmp_path / 't.parquet'}",
                      DataConfig(image_column="pixels", label_column="y"))
    assert ok.class_names() == ["1"]
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a readable parquet file"):
        parse_source(f"parquet:{tmp_path / 'bad.parquet'}", DataConfig())


def test_parquet_integer_labels_sort_numerically(tmp_path):
    pq.write_table(pa.table({"image": [b""] * 4, "label": [10, 2, 1, None]}),
                   tmp_path / "t.parquet")
    assert parse_source(f"parquet:{tmp_path}", DataConfig()).class_names() == ["1", "2", "10"]


def test_torchvision_and_synthetic_specs():
    with pytest.raises(InputError, match="unknown torchvision dataset"):
        parse_source("torchvision:ImageNet", DataConfig())
    mnist = parse_source("torchvision:mnist:/tmp/x", DataConfig())
    assert (mnist.image_size(), mnist.channels()) == (28, 1)
    assert parse_source("torchvision:CIFAR10", DataConfig()).channels() == 3
    with pytest.raises(InputError, match="positive integer"):
        parse_source("synthetic:abc", DataConfig())
    assert parse_source("synthetic:50", DataConfig()).name == "synthetic-50"


def test_few_rows_are_read_in_this_process_with_the_readers_of_ray_data(image_folder, tmp_path,
                                                                        monkeypatch):
    """`Source.rows_here`: what offline prediction reads without starting Ray; the same batch
    functions as the Ray Data path, so the rows are the same; None past the limit."""
    from PIL import Image

    folder = parse_source(f"folder:{image_folder}", DataConfig())
    rows = folder.rows_here()
    assert sorted(rows["id"]) == sorted(rel for rel, _ in folder._files)
    assert all(len(payload) > 0 for payload in rows["bytes"]) and set(rows["read_error"]) == {""}
    assert {str(label) for label in rows["label"]} == {"cat", "dog", "fox"}

    pixels = [np.asarray(Image.open(image_folder / "cat" / name)) for name in
              sorted(p.name for p in (image_folder / "cat").iterdir())][:2]
    table = pa.table({"image": [p.tobytes() for p in pixels], "label": ["cat", "dog"]})
    pq.write_table(table, tmp_path / "two.parquet")
    parquet = parse_source(f"parquet:{tmp_path / 'two.parquet'}", DataConfig())
    assert list(parse_source("synthetic:12", DataConfig()).rows_here()["label"]) != []
    assert list(parquet.rows_here()["label"]) == ["cat", "dog"]
    assert len(parse_source("digits", DataConfig()).rows_here()["id"]) == 1797

    monkeypatch.setenv("MLSD_IN_PROCESS_ROWS", "1")  # more than that: through Ray Data
    assert folder.rows_here() is None and parquet.rows_here() is None
    assert parse_source("synthetic:12", DataConfig()).rows_here() is None
