import pytest

from mlsd_ray.core import storage


def test_uri_detection_and_join():
    assert storage.is_uri("s3://bucket/x") and storage.is_uri("file:///tmp")
    assert not storage.is_uri("/tmp/x") and not storage.is_uri("C://x")
    assert storage.join("s3://b/root", "a", "b") == "s3://b/root/a/b"


def test_home_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("MLSD_HOME", str(tmp_path / "h"))
    assert storage.home() == str(tmp_path / "h")
    assert storage.home("s3://bucket/h") == "s3://bucket/h"
    monkeypatch.delenv("MLSD_HOME")
    assert storage.home().endswith("mlsd-home")


def test_round_trip_through_a_file_uri(tmp_path):
    location = f"file://{tmp_path}/deep/dir/x.json"
    storage.write_json(location, {"a": 1})
    assert storage.read_json(location) == {"a": 1}
    assert (tmp_path / "deep" / "dir" / "x.json").exists()
    assert storage.exists(location) and storage.is_dir(f"file://{tmp_path}/deep")
    assert [i.path for i in storage.list_files(f"file://{tmp_path}")] == [
        str(tmp_path / "deep" / "dir" / "x.json")]
    storage.delete_dir(f"file://{tmp_path}/deep")
    assert not storage.exists(location)


def test_a_write_appears_whole_and_leaves_no_partial_file(tmp_path):
    target = tmp_path / "day" / "rows.parquet"
    storage.write_bytes(str(target), b"x" * 1000)
    storage.write_bytes(str(target), b"y" * 10)  # replaced whole
    assert target.read_bytes() == b"y" * 10
    assert [p.name for p in target.parent.iterdir()] == ["rows.parquet"]
    (tmp_path / "taken").mkdir()  # the rename fails: no partial file is left behind
    with pytest.raises(OSError):
        storage.write_bytes(str(tmp_path / "taken"), b"z")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day", "taken"]
