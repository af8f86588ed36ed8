"""`mlsd explain` as a user runs it, on the session's small digits model: overlays for the
test digits of one class, the two sanity checks passing on a trained model, and inputs read
from a --source."""

from __future__ import annotations

import json

from tests.conftest import run_mlsd

PNG = b"\x89PNG"


def test_each_7_explained_and_the_maps_pass_the_sanity_checks(digits_registered, tmp_path):
    """Integrated Gradients passes both checks; Grad-CAM passes model randomisation. Its
    deletion curve on these 8×8 digits is as flat as a random order's (measured 0.298 against
    0.297): its 4×4 map marks regions, most of whose pixels are black already, so deleting
    them (setting them to black) changes nothing. The figure is reported, not asserted."""
    out = tmp_path / "sevens"
    result = run_mlsd("explain", "--model", "models:/digits-cnn/1", "--label", "7", "--n", "6",
                  "--out", str(out), "--json", "--home", digits_registered)
    assert result.returncode == 0, result.stderr
    explained = json.loads(result.stdout)
    print("\nsanity:", explained["sanity"])
    assert explained["explained"] == 6 and len(explained["overlays"]) == 6
    for path in explained["overlays"] + explained["figures"]:
        assert open(path, "rb").read(4) == PNG, path
    assert all("label-7-" in path for path in explained["overlays"])
    sanity = explained["sanity"]
    assert sanity["passed"]["integrated_gradients"]
    assert sanity["randomised_correlation"]["grad_cam"] < sanity["max_randomised_correlation"]
    records = json.loads((out / "explanations.json").read_text())["explanations"]
    assert [r["label"] for r in records] == ["7"] * 6
    assert all(len(r["top_pixels"]) == 5 and 0 <= r["probability"] <= 1 for r in records)


def test_inputs_from_a_source_and_bad_requests(digits_registered, tmp_path, ray_session):
    cluster = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    result = run_mlsd("explain", "--model", "models:/digits-cnn/1", "--source", "digits", "--n",
                  "2", "--out", str(tmp_path / "digits"), "--json", "--home", digits_registered,
                  env=cluster)
    assert result.returncode == 0, result.stderr
    explained = json.loads(result.stdout)
    assert explained["explained"] == 2
    for args, message in [(["--label", "cat"], "--label 'cat': the model's classes are 0, 1"),
                          (["--n", "0"], "--n must be at least 1")]:
        refused = run_mlsd("explain", "--model", "models:/digits-cnn/1", *args, "--home",
                       digits_registered)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
