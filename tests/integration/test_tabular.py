"""The tabular example on real Ray, MLflow and HTTP: preparation with Ray Data preprocessors,
the MLP on Ray Train beside the HistGradientBoosting baseline, the fraud Serve app with its
threshold, rules and bad-input handling, diabetes regression, and a tabular Tune search."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import requests

from mlsd_ray.core.errors import InputError
from mlsd_ray.core.ports import free_port
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.serve import control
from mlsd_ray.serve.app import ADMIN_TOKEN_ENV
from mlsd_ray.tasks import load_config
from mlsd_ray.tasks.tabular.prepare import prepare_table
from mlsd_ray.tasks.tabular.preprocess import Featurizer
from mlsd_ray.tasks.tabular.stage import run_tabular_train
from tests.conftest import fuzz_openapi, scrape_until, screenshot, texts

pytestmark = pytest.mark.usefixtures("ray_session")
FAST = ["train.epochs=4", "train.num_workers=0"]  # in this process; diabetes uses 2 workers


def test_preparation_imputes_scales_encodes_and_quarantines(tmp_path, workspace):
    """A messy CSV: missing labels quarantined, text in a number column counted and imputed
    (iterative), per-column scaling, the fitted state a JSON round trip away from serving."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"income": rng.normal(50, 10, 300).round(1),
                          "debt": rng.normal(20, 5, 300).round(1),
                          "city": rng.choice(["a", "b", "c"], 300),
                          "bad": (rng.random(300) < 0.3).astype(int)})
    frame["debt"] = frame["debt"].astype(object)
    frame.loc[:9, "income"] = np.nan
    frame.loc[10:14, "debt"] = "unknown"  # text in a number column (n/a would read as NaN)
    frame.loc[15:17, "bad"] = np.nan
    frame.loc[18:20, "city"] = None
    path = tmp_path / "loans.csv"
    frame.to_csv(path, index=False)
    cfg = load_config(None, [f"tabular.source=csv:{path}", "tabular.label=bad",
                             "tabular.columns={income: {impute: iterative, scale: robust}, "
                             "debt: {impute: mean, scale: minmax}}"], example="fraud")
    table = prepare_table(cfg, workspace=workspace)
    m = table.manifest
    assert m["task"] == "binary" and m["counts"]["quarantined"] == 3
    quality = json.loads(open(f"{table.path}/quality.json").read())
    assert quality["columns"]["income"]["missing"] == 10
    assert quality["columns"]["debt"]["not_a_number"] == 5
    assert quality["columns"]["city"]["missing"] == 3
    assert quality["quarantine_by_reason"] == {"missing_label": 3}
    assert m["feature_names"] == ["income", "debt", "city=a", "city=b", "city=c",
                                  "city=missing"]
    train = table.load_split("train")
    features = Featurizer(json.loads(json.dumps(m["preprocessing"])))(train)
    assert np.isfinite(features).all()
    debt = features[:, 1]
    assert debt.min() == pytest.approx(0.0) and debt.max() == pytest.approx(1.0)  # min-max
    assert (features[:, 2:].sum(axis=1) == 1).all()  # one-hot, missing as its own category
    assert prepare_table(cfg, workspace=workspace).reused


@pytest.fixture(scope="module")
def fraud_model(tmp_path_factory, ray_session):
    workspace = Workspace.at(str(tmp_path_factory.mktemp("fraud") / "mlsd-home"))
    cfg = load_config(None, ["tabular.source=fraud-synth:8000", *FAST,
                             "train.batch_size=128"], example="fraud")
    return cfg, run_tabular_train(cfg, workspace=workspace), workspace


def test_mlp_beats_chance_beside_the_baseline(fraud_model):
    cfg, summary, _ = fraud_model
    test, baseline = summary.test, summary.baseline
    rate = test["positives"] / test["rows"]
    print(f"\nfraud MLP: PR-AUC {test['pr_auc']:.4f} ROC-AUC {test['roc_auc']:.4f} "
          f"(chance {rate:.4f}); baseline PR-AUC {baseline['pr_auc']:.4f} "
          f"ROC-AUC {baseline['roc_auc']:.4f}; threshold {summary.decision}")
    assert test["pr_auc"] > 5 * rate and test["roc_auc"] > 0.8
    assert baseline["model"] == "HistGradientBoostingClassifier" and baseline["pr_auc"] > rate
    assert summary.decision["objective"] == "target_precision"
    assert summary.registered.uri == "models:/fraud-mlp/1"
    for path in summary.evaluation.values():
        assert open(path, "rb").read(4)
    assert open(summary.evaluation["pr_curve"], "rb").read(4) == b"\x89PNG"


def test_evaluate_finds_the_task_in_the_checkpoint(fraud_model, tmp_path):
    """`mlsd evaluate --model models:/fraud-mlp/1` with no task flag: the checkpoint says the
    tabular task trained it, and its report matches the training stage's test metrics."""
    import subprocess
    import sys

    _, summary, workspace = fraud_model
    result = subprocess.run([sys.executable, "-m", "mlsd_ray.cli", "evaluate", "--model",
                             summary.registered.uri, "--json", "--home", workspace.root],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["task"], report["split"], report["score_name"]) == ("binary", "test",
                                                                        "pr_auc")
    assert report["mlp"]["pr_auc"] == pytest.approx(summary.test["pr_auc"])
    assert report["baseline"]["model"] == "HistGradientBoostingClassifier"
    assert open(report["report_md"]).read().startswith("# Evaluation on the test split")
    assert json.load(open(report["report"]))["mlp"]["pr_auc"] == report["mlp"]["pr_auc"]
    from mlflow import MlflowClient

    from mlsd_ray import registry

    registry.client(workspace)  # the report and its plots joined the version's run
    logged = MlflowClient().list_artifacts(summary.registered.run_id, "evaluation/test")
    assert {"report.json", "report.md"} <= {item.path.rsplit("/", 1)[1] for item in logged}
    on_val = subprocess.run([sys.executable, "-m", "mlsd_ray.cli", "evaluate", "--model",
                             summary.registered.uri, "--split", "val", "--home", workspace.root],
                            capture_output=True, text=True, timeout=300)
    assert on_val.returncode == 2 and "evaluated on its test split" in on_val.stderr


def test_explain_ranks_the_planted_fraud_signals_first(fraud_model, tmp_path):
    """`mlsd explain` on the fraud model: permutation importance on its test split puts
    columns the generator made fraud depend on (tasks/tabular/sources.py:_risk) above
    customer_age, whose weight there is 40x smaller than amount's; each explained record
    gets its columns' Integrated Gradients and a chart."""
    import subprocess
    import sys

    _, summary, workspace = fraud_model
    result = subprocess.run([sys.executable, "-m", "mlsd_ray.cli", "explain", "--model",
                             summary.registered.uri, "--n", "3", "--label", "1", "--out",
                             str(tmp_path / "why"), "--json", "--home", workspace.root],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    explained = json.loads(result.stdout)
    importance = explained["importance"]
    print(f"\npermutation importance (PR-AUC drop): {importance}")
    planted = {"amount", "merchant_category", "country", "device_type", "hour", "velocity_1h",
               "account_age_days"}
    assert list(importance)[0] in planted and "customer_age" not in list(importance)[:3]
    records = json.loads((tmp_path / "why" / "explanations.json").read_text())["explanations"]
    assert len(records) == 3 and all(r["record"]["is_fraud"] == 1 for r in records)
    assert set(records[0]["attributions"]) == set(importance)
    for path in explained["overlays"] + explained["figures"]:
        assert open(path, "rb").read(4) == b"\x89PNG", path


def test_mlsd_serve_serves_the_fraud_model(fraud_model, ray_session):
    """`mlsd serve --model models:/fraud-mlp/1 --detach`: the checkpoint's task picks the fraud
    app; one transaction is scored over HTTP; `serve status` and `serve stop` work on it."""
    import subprocess
    import sys

    _, summary, workspace = fraud_model
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}

    def mlsd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlsd_ray.cli", *args, "--home",
                               workspace.root], capture_output=True, text=True, timeout=300,
                              env=env)

    started = mlsd("serve", "--model", summary.registered.uri, "--detach", "--json",
                   "--port", str(free_port()))
    assert started.returncode == 0, started.stderr
    app = json.loads(started.stdout)
    try:
        assert (app["task"], app["served_version"]) == ("tabular", "1")
        answer = requests.post(app["score_url"], json={"records": [RECORD]}, timeout=30).json()
        assert answer["model_version"] == "1"
        assert answer["results"][0]["decision"] in ("approve", "review", "decline")
        # started without MLSD_ADMIN_TOKEN: scoring is open, changing the rules is not
        locked = requests.put(app["score_url"].removesuffix("/score") + "/rules",
                              data="rules: []\n", timeout=10)
        assert locked.status_code == 403 and "MLSD_ADMIN_TOKEN" in locked.text, locked.text
        status = mlsd("serve", "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["model_version"] == "1"
    finally:
        stopped = mlsd("serve", "stop")
    assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="module")
def fraud_url(fraud_model):

    cfg, summary, workspace = fraud_model
    log = cfg.serve.prediction_log.model_copy(update={"flush_seconds": 0.5})
    # Two replicas (routes and model in each): a policy set through one reaches both.
    two = cfg.serve.autoscaling.model_copy(update={"min_replicas": 2, "max_replicas": 2})
    settings = cfg.serve.model_copy(update={"model": summary.registered.uri,
                                            "port": free_port(), "num_cpus": 0.25,
                                            "autoscaling": two, "max_body_bytes": 4096,
                                            "prediction_log": log})
    os.environ[ADMIN_TOKEN_ENV] = ADMIN_TOKEN  # read where the app starts: its replicas get
    try:                                        # only the digest
        served = control.start(settings, workspace, log=print)  # its checkpoint says: tabular
    finally:
        del os.environ[ADMIN_TOKEN_ENV]
    assert (served.task, served.route_prefix) == ("tabular", "/")
    yield served.endpoint("score_url").removesuffix("/score")
    control.remove_app(settings.app_name)  # and Serve with it: the next app picks its port
    control.state_file(workspace, settings.app_name).unlink(missing_ok=True)


RECORD = {"amount": 12000.0, "merchant_category": "crypto", "country": "NG", "hour": 3,
          "device_type": "unknown", "customer_age": 30, "velocity_1h": 2,
          "account_age_days": 3}
SAFE = {**RECORD, "amount": 15.0, "merchant_category": "grocery", "country": "US", "hour": 12,
        "device_type": "mobile", "velocity_1h": 0, "account_age_days": 2000}


def test_scores_decisions_and_rules_over_http(fraud_url):
    answer = requests.post(f"{fraud_url}/score", json={"records": [RECORD, SAFE]}, timeout=30)
    assert answer.status_code == 200, answer.text
    risky, safe = answer.json()["results"]
    print(f"\nrisky: {risky}\nsafe: {safe}")
    assert risky["score"] > safe["score"]
    assert {r["name"] for r in risky["rules_fired"]} == {"large_foreign_amount",
                                                         "new_account_crypto"}
    assert risky["decision"] in ("review", "decline") and safe["decision"] == "approve"
    assert safe["rules_fired"] == []


def test_explain_names_each_columns_share_and_is_rate_limited(fraud_url):
    """POST /v1/fraud/explain: per record, every input column's attribution to the fraud
    score, largest first; the risky record's score owes more to its planted signals (amount,
    new account, crypto) than the safe one's; bad records get the /score errors; past
    serve.explain_per_second (2 per replica, 2 replicas) a burst gets 429 with Retry-After."""
    from concurrent.futures import ThreadPoolExecutor

    answer = requests.post(f"{fraud_url}/explain", json={"records": [RECORD, SAFE]},
                           timeout=30)
    assert answer.status_code == 200, answer.text
    risky, safe = answer.json()["explanations"]
    print(f"\nrisky: {risky}\nsafe: {safe}")
    assert set(risky["attributions"]) == set(RECORD) and risky["explained"] == "score of '1'"
    assert risky["output"] > safe["output"]
    shares = list(risky["attributions"].values())
    assert shares == sorted(shares, key=abs, reverse=True)
    planted = ("amount", "account_age_days", "merchant_category")
    assert sum(risky["attributions"][c] for c in planted) > sum(
        safe["attributions"][c] for c in planted)
    bad = requests.post(f"{fraud_url}/explain", timeout=30,
                        json={"records": [{**RECORD, "amount": "lots"}]})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_record", bad.text

    def one(_):
        return requests.post(f"{fraud_url}/explain", json={"records": [SAFE]}, timeout=30)

    with ThreadPoolExecutor(12) as pool:
        burst = list(pool.map(one, range(12)))
    codes = sorted(r.status_code for r in burst)
    assert set(codes) == {200, 429}, codes
    assert all(r.headers["retry-after"] == "1" for r in burst if r.status_code == 429)


# docs/export.md's script for tables: numpy and onnxruntime, nothing of mlsd_ray
NUMPY_SCORES = """
import json, math, sys
import numpy as np, onnxruntime as ort

folder, records = sys.argv[1], json.loads(sys.argv[2])
meta = json.load(open(f"{folder}/metadata.json"))

def features(record):
    row = []
    for f in meta["input"]["features"]:
        v = record.get(f["column"])
        if f["kind"] == "number":
            t = None if v is None else (math.copysign(math.log1p(abs(v)), v) if f["log"] else v)
            row.append(f["if_missing"] if t is None else f["weight"] * t + f["bias"])
        else:
            row.append(float((f["if_missing"] if v is None else str(v)) == f["equals"]))
    return row

session = ort.InferenceSession(f"{folder}/{meta['model_file']}")
x = np.nan_to_num(np.array([features(r) for r in records], np.float32))
print(json.dumps(session.run(None, {"features": x})[0][:, 1].tolist()))
"""


def test_onnx_export_gives_the_apps_scores_with_numpy_alone(fraud_model, fraud_url, tmp_path):
    """`mlsd export` of the fraud model: the MLP as ONNX and its preparation as a recipe of
    numbers in metadata.json, checked on the test split; a script with numpy and onnxruntime
    only gives the scores the app gives, for a record with a missing column too. int8 is
    refused, saying why."""
    import subprocess
    import sys

    from mlsd_ray.registry import resolve
    from mlsd_ray.tasks import get_task

    _, summary, workspace = fraud_model
    uri = summary.registered.uri
    out = tmp_path / "fraud-onnx"
    result = get_task("tabular").export(resolve(uri, workspace), "onnx", None, str(out), uri,
                                        workspace)
    print(f"\n{result.describe()}")
    assert result.parity.agreement == 1.0 and result.parity.max_abs_diff < 1e-3
    assert result.parity.samples > 1000 and result.registered
    records = [RECORD, SAFE, {k: v for k, v in SAFE.items() if k != "amount"}]
    scored = requests.post(f"{fraud_url}/score", json={"records": records}, timeout=30).json()
    script = subprocess.run([sys.executable, "-c", NUMPY_SCORES, str(out), json.dumps(records)],
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0, script.stderr
    reproduced = json.loads(script.stdout)
    served = [r["score"] for r in scored["results"]]
    print(f"served {served}, numpy + onnxruntime {reproduced}")
    assert reproduced == pytest.approx(served, abs=1e-3)

    with pytest.raises(InputError, match="int8 is for image models"):
        get_task("tabular").export(resolve(uri, workspace), "onnx", "int8", str(tmp_path / "q"),
                                   uri, workspace)


def test_the_version_is_an_mlflow_model_scoring_as_the_app_does(fraud_model, fraud_url):
    """Plain MLflow loads models:/fraud-mlp/1: its signature is the table's columns; for
    test rows it gives the scores the app gives, and the class at the model's threshold."""
    import mlflow

    from mlsd_ray.tasks.tabular.prepare import PreparedTable
    from mlsd_ray.tasks.tabular.traffic import records

    _, summary, workspace = fraud_model
    mlflow.set_tracking_uri(workspace.tracking_uri)
    uri = summary.registered.uri
    signature = mlflow.models.get_model_info(uri).signature
    table = PreparedTable.open(summary.dataset)
    columns = [entry["name"] for entry in table.manifest["preprocessing"]["plan"]]
    assert signature.inputs.input_names() == columns
    assert signature.outputs.input_names()[:2] == ["score", "predicted_class"]

    rows = table.load_split("test")[columns].head(12).reset_index(drop=True)  # < 4 KB bodies
    answers = mlflow.pyfunc.load_model(uri).predict(rows)
    served = requests.post(f"{fraud_url}/score", json={"records": records(rows)}, timeout=30)
    assert served.status_code == 200, served.text
    np.testing.assert_allclose(answers["score"], [r["score"] for r in served.json()["results"]],
                               atol=1e-6)
    threshold, classes = summary.decision["threshold"], table.manifest["classes"]
    assert answers["predicted_class"].tolist() == [
        str(classes[int(score >= threshold)]) for score in answers["score"]]


@pytest.mark.slow  # a real browser: Debian's chromium, which `run.py test --all` installs
def test_the_page_to_score_one_transaction_in_a_real_browser(fraud_url, browser):
    """GET / on the fraud app in chromium: a form built from the model's columns; a risky
    transaction typed in gets its score, decision and the rules that fired."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(fraud_url.removesuffix("/v1/fraud") + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda driver: driver.find_elements(By.ID, "field-amount"))
    for name, value in RECORD.items():
        field = browser.find_element(By.ID, f"field-{name}")
        if field.tag_name == "select":
            Select(field).select_by_value(value)
        else:
            field.clear()
            field.send_keys(str(value))
    browser.find_element(By.ID, "score").click()
    decision = wait.until(lambda driver: driver.find_elements(By.ID, "decision"))[0]
    assert decision.text.split(" ")[0] in ("review", "decline"), decision.text
    rules = browser.find_element(By.ID, "rules").text
    assert "large_foreign_amount" in rules and "new_account_crypto" in rules, rules
    assert not browser.find_element(By.ID, "error").text
    screenshot(browser, "page-fraud.png")


ADMIN_TOKEN = "admin-token-of-the-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_threshold_and_rules_change_live(fraud_url):
    # the OpenAPI says which routes want the bearer token: the changes (the admin token)
    paths = requests.get(f"{fraud_url.removesuffix('/v1/fraud')}/openapi.json",
                         timeout=10).json()["paths"]
    assert paths["/v1/fraud/policy"]["put"]["security"] == [{"bearer": []}]
    assert "security" not in paths["/v1/fraud/score"]["post"]
    before = requests.get(f"{fraud_url}/policy", timeout=10).json()
    anyone = requests.put(f"{fraud_url}/policy", json={"threshold": 0.0}, timeout=10)
    assert anyone.status_code == 401 and "MLSD_ADMIN_TOKEN" in anyone.text, anyone.text
    changed = requests.put(f"{fraud_url}/policy", json={"threshold": 0.0}, headers=ADMIN,
                           timeout=10)
    assert changed.status_code == 200 and changed.json()["threshold"] == 0.0
    # The PUT reached one replica; the other reads the policy file. Requests go in bursts of
    # 6 at once until both replicas have answered. Serve's router trusts the queue lengths it
    # caches for 10 s (RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S), so one request at a time all
    # go to a replica that its cache calls idler (60 in a row, once in CI); requests in flight
    # raise that replica's cached length and send the next ones to the other.
    from concurrent.futures import ThreadPoolExecutor

    def score_safe(_: int) -> dict:
        return requests.post(f"{fraud_url}/score", json={"records": [SAFE]}, timeout=30).json()

    replicas: set[str] = set()
    with ThreadPoolExecutor(6) as pool:
        for _ in range(20):
            for safe in pool.map(score_safe, range(6)):
                assert safe["results"][0]["model_decision"] != "approve"  # all reach 0.0
                assert safe["threshold"] == 0.0
                replicas.add(safe["replica"])
            if len(replicas) == 2:
                break
    assert len(replicas) == 2, replicas
    bad = requests.put(f"{fraud_url}/rules", data="rules:\n  - name: x\n    when: amount >> 1\n"
                       "    action: review\n", headers=ADMIN, timeout=10)
    assert bad.status_code == 400 and "line 3" in bad.json()["error"]["message"]
    assert requests.get(f"{fraud_url}/policy", timeout=10).json()["rules"] == before["rules"]
    huge = requests.put(f"{fraud_url}/rules", data="rules:\n  - name: huge\n    when: amount "
                        "in [0] * 1000000000\n    action: review\n", headers=ADMIN, timeout=10)
    assert huge.status_code == 400 and "rule 'huge'" in huge.json()["error"]["message"]
    good = requests.put(f"{fraud_url}/rules", data="rules:\n  - name: tiny\n    when: amount "
                        "< 20\n    action: decline\n", headers=ADMIN, timeout=10)
    assert good.status_code == 200 and [r["name"] for r in good.json()["rules"]] == ["tiny"]
    fired = requests.post(f"{fraud_url}/score", json={"records": [SAFE]}, timeout=30).json()
    assert fired["results"][0]["decision"] == "decline"
    requests.put(f"{fraud_url}/policy", json={"threshold": before["threshold"]}, headers=ADMIN,
                 timeout=10)
    requests.put(f"{fraud_url}/rules", data=open(
        "mlsd_ray/examples/fraud-rules.yaml").read(), headers=ADMIN, timeout=10)


@pytest.mark.parametrize("body, headers, status, code", [
    (b"{not json", {"content-type": "application/json"}, 400, "malformed_json"),
    (b'{"records": [1]}', {"content-type": "text/plain"}, 415, "unsupported_media_type"),
    (json.dumps({"rows": []}).encode(), None, 422, "missing_records"),
    (json.dumps({"records": [{**RECORD, "amount": "lots"}]}).encode(), None, 422,
     "invalid_record"),
    (json.dumps({"records": [{"amount": 1.0}] * 400}).encode(), None, 413, "body_too_large"),
])
def test_bad_input_gets_4xx(fraud_url, body, headers, status, code):
    answer = requests.post(f"{fraud_url}/score", data=body,
                           headers=headers or {"content-type": "application/json"}, timeout=30)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code


@pytest.mark.slow  # schemathesis for 10 s
def test_schemathesis_finds_no_server_error(fraud_url, tmp_path):
    """Generated requests for every operation of /openapi.json, all of schemathesis's checks:
    no 5xx, and every answer matches the schema the app publishes. (Without the admin token
    its PUTs change nothing: 401.)"""
    code, output = fuzz_openapi(fraud_url.removesuffix("/v1/fraud"), tmp_path)
    print(output[output.find("SUMMARY"):])
    assert code == 0, output[-6000:]


def test_a_route_of_another_task_is_a_404_naming_this_one(fraud_url):
    answer = requests.post(f"{fraud_url}/predict", json={"instances": [[[0]]]}, timeout=10)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
    assert "tabular task: POST /v1/fraud/score" in answer.json()["error"]["message"]
    # a method the path does not take: 405, and Allow names each one it does (GET and PUT
    # are two routes; Starlette's own answer named the first only)
    answer = requests.delete(f"{fraud_url}/policy", timeout=10)
    assert answer.status_code == 405 and answer.headers["allow"] == "GET, PUT", answer.headers


def test_open_inference_protocol_scores_columns_and_records(fraud_url):
    """/v2 with Triton's client: one tensor per column (JSON, then binary), and BYTES JSON
    records; the same scores and decisions as /v1/fraud/score."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=fraud_url.removeprefix("http://")
                                          .removesuffix("/v1/fraud"))
    metadata = client.get_model_metadata("fraud-mlp")
    kinds = {t["name"]: t["datatype"] for t in metadata["inputs"]}
    assert kinds["amount"] == "FP64" and kinds["country"] == "BYTES"
    assert [o["name"] for o in metadata["outputs"]] == ["score", "decision"]
    expected = requests.post(f"{fraud_url}/score", json={"records": [RECORD, SAFE]},
                             timeout=30).json()["results"]
    for binary in (False, True):
        inputs = []
        for name, datatype in kinds.items():
            column = np.array([RECORD[name], SAFE[name]],
                              dtype=object if datatype == "BYTES" else np.float64)
            if datatype == "BYTES":
                column = np.array([v.encode() for v in column], dtype=object)
            tensor = triton.InferInput(name, [2], datatype)
            tensor.set_data_from_numpy(column, binary_data=binary)
            inputs.append(tensor)
        result = client.infer("fraud-mlp", inputs)
        assert result.as_numpy("score").tolist() == pytest.approx(
            [r["score"] for r in expected], abs=1e-5)
        assert texts(result.as_numpy("decision")) == [r["decision"] for r in expected]
    records = triton.InferInput("records", [2], "BYTES")
    records.set_data_from_numpy(np.array([json.dumps(RECORD).encode(),
                                          json.dumps(SAFE).encode()], dtype=object))
    scored = client.infer("fraud-mlp", [records])
    assert texts(scored.as_numpy("decision")) == [r["decision"] for r in expected]


def test_missing_extra_and_unseen_fields_are_handled(fraud_url):
    partial = {"amount": 50.0, "country": "ZZ", "shoe_size": 44}
    answer = requests.post(f"{fraud_url}/score", json={"records": [partial]}, timeout=30)
    assert answer.status_code == 200, answer.text
    notes = answer.json()["results"][0]["notes"]
    assert "ignored field(s) ['shoe_size']" in notes and "hour imputed" in notes
    assert "country: unseen category 'ZZ' encoded as none" in notes


def test_scored_records_are_logged_and_a_shifted_column_is_named_by_the_monitor(
        fraud_model, fraud_url, ray_session):
    """The monitoring loop on tables: unshifted traffic raises nothing; `mlsd simulate-traffic
    --shift scale --column amount` does, and the monitor names the column."""
    import datetime as dt
    import subprocess
    import sys

    from mlsd_ray.monitor.run import monitor
    from mlsd_ray.serve.predlog import log_location, read_log, wait_for_rows
    from mlsd_ray.tasks.tabular.prepare import PreparedTable
    from mlsd_ray.tasks.tabular.traffic import simulate_table_traffic

    cfg, summary, workspace = fraud_model
    root = fraud_url.removesuffix("/v1/fraud")
    location = log_location(cfg.serve.prediction_log, workspace)
    table = PreparedTable.open(summary.dataset)

    since = dt.datetime.now(dt.timezone.utc)
    sent = simulate_table_traffic(root, table, count=300)
    assert sent.failed_requests == 0 and sent.answered == 300 and sent.unit == "records"
    assert wait_for_rows(location, since, 300, timeout_s=30) == 300
    rows = read_log(location, since)
    assert rows["model_uri"].eq("models:/fraud-mlp/1").all()
    assert {"input.amount", "input.country", "score", "predicted_class"} <= set(rows)
    calm = monitor(cfg, workspace, since=since.isoformat(), log=print)
    print(f"\nunshifted: {calm.summary}")
    assert calm.verdict == "no drift"

    since = dt.datetime.now(dt.timezone.utc)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    shifted = subprocess.run(
        [sys.executable, "-m", "mlsd_ray.cli", "simulate-traffic", "--example", "fraud",
         "--url", root, "--shift", "scale", "--column", "amount", "--amount", "5",
         "--count", "300", "--home", workspace.root, "--set", "tabular.source=fraud-synth:8000",
         *[f"--set={o}" for o in FAST], "--set", "train.batch_size=128", "--json"],
        capture_output=True, text=True, timeout=180, env=env)
    assert shifted.returncode == 0, shifted.stderr
    assert json.loads(shifted.stdout)["failed_requests"] == 0
    assert wait_for_rows(location, since, 300, timeout_s=30) == 300
    alarm = monitor(cfg, workspace, since=since.isoformat(), log=print)
    print(f"scaled amounts: {alarm.summary}")
    assert alarm.verdict == "drift"
    [model] = alarm.models.values()
    assert "amount" in model.drifted_features and "features drifted: amount" in model.summary
    assert "| amount |" in open(alarm.outputs["report.md"]).read()
    # the app's requests reach Prometheus by route template and status (serve/app.py)
    scored = 'route="/v1/fraud/score"'
    text = scrape_until(scored, 'model_name="fraud-mlp"', "ray_mlsd_predictions_total{")
    assert scored in text and 'status="200"' in text
    # the model's own series, as for images: the version it serves and answers by class
    loaded = [line for line in text.splitlines() if line.startswith("ray_mlsd_model_loaded{")]
    assert any('model_name="fraud-mlp"' in line and 'model_version="1"' in line
               for line in loaded)
    assert re.search(r'ray_mlsd_predictions_total\{[^}]*outcome="[^"]+"', text)


def test_predict_offline_with_ray_data_and_online_from_a_csv(fraud_model, fraud_url,
                                                             ray_session, tmp_path):
    """`mlsd predict --model URI --source SPEC` for a table (its checkpoint says tabular),
    and CSV rows sent to the scoring app."""
    import subprocess
    import sys

    from mlsd_ray.tasks.tabular.predict import predict_files
    from mlsd_ray.tasks.tabular.sources import fraud_synth

    _, summary, workspace = fraud_model
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "MLSD_IN_PROCESS_ROWS": "0"}  # 3,000 rows would be predicted in the CLI's process
    out = tmp_path / "predictions"
    offline = subprocess.run(
        [sys.executable, "-m", "mlsd_ray.cli", "predict", "--model", "models:/fraud-mlp/1",
         "--source", "fraud-synth:3000", "--out", str(out), "--home", workspace.root, "--json"],
        capture_output=True, text=True, timeout=180, env=env)
    assert offline.returncode == 0, offline.stderr
    assert "actor(s)" in offline.stderr  # Ray Data's actor pool, not this process
    result = json.loads(offline.stdout)
    print(f"\noffline: {result}")
    assert result["rows"] == result["predicted"] == result["labelled"] == 3000
    assert result["pr_auc"] > 5 * 0.015  # far above the fraud rate
    rows = pd.read_parquet(out)
    assert {"input.amount", "score", "predicted_class", "model_uri"} <= set(rows)
    assert rows["model_uri"].eq("models:/fraud-mlp/1").all()

    csv = tmp_path / "rows.csv"
    fraud_synth(120, seed=3).to_csv(csv, index=False)  # with an id and the label: not sent
    online = predict_files(fraud_url.removesuffix("/v1/fraud"), [csv])
    [answer] = online.files
    assert len(answer.results) == 120 and answer.model_version == "1"
    assert set(answer.outcomes) <= {"approve", "review", "decline"}
    assert online.describe().splitlines()[-1] == "model fraud-mlp version 1"


def test_retrain_on_new_rows_is_gated_and_rolls_the_app_over(fraud_model, fraud_url):
    """`mlsd retrain` for tables: new labelled rows (the smoke source: 2,000 new
    transactions), a challenger fine-tuned on old + new, both scored by PR-AUC on the same
    holdout, the alias and the running app moved only when the challenger wins."""
    from mlsd_ray import registry
    from mlsd_ray.tasks import get_task
    from mlsd_ray.workflows.retrain import retrain

    cfg, _, workspace = fraud_model
    cfg = cfg.model_copy(deep=True)
    cfg.retrain.epochs = 3
    registry.promote("fraud-mlp", 1, "production", workspace)  # the champion
    source = get_task("tabular").smoke_retrain_source(workspace, print)
    decision = retrain(cfg, source, workspace, log=print)
    print(f"\nfraud retrain: {decision.reason}; scores {decision.to_dict()['scores']}")
    assert (decision.task, decision.metric) == ("tabular", "pr_auc")
    champion, challenger = decision.champion_scores, decision.challenger_scores
    assert challenger.holdout.samples == champion.holdout.samples > 1200
    assert decision.promote == (decision.gain > cfg.retrain.margin)
    production = registry.show("models:/fraud-mlp@production", workspace).version
    served = requests.get(f"{fraud_url}/model", timeout=10).json()["model_version"]
    expected = decision.challenger.rsplit("/", 1)[1] if decision.promote else "1"
    assert str(production) == served == expected
    assert "pr_auc of each model" in open(decision.outputs["markdown"]).read()


def test_the_pipelines_monitoring_loop_runs_on_tables(fraud_model, fraud_url):
    """workflows/loop.py on the live fraud app, as `mlsd pipeline --example fraud` runs it:
    unshifted traffic (no drift), the task's drift drill (a numeric column tripled, saved as
    labelled rows), drift found in that column, a challenger judged by the gate, and a
    promoted one rolled out under load with no failed request."""
    from mlsd_ray.tasks import get_task
    from mlsd_ray.tasks.tabular.prepare import PreparedTable
    from mlsd_ray.workflows.loop import monitoring_loop, render_loop

    cfg, summary, workspace = fraud_model
    cfg = cfg.model_copy(deep=True)
    cfg.retrain.epochs = 1
    cfg.serve.prediction_log.flush_seconds = 0.5
    served = requests.get(f"{fraud_url}/model", timeout=10).json()
    steps = monitoring_loop(get_task("tabular"), cfg, fraud_url.removesuffix("/v1/fraud"),
                            served["uri"], PreparedTable.open(summary.dataset), workspace, print)
    render_loop(steps)
    assert steps.traffic_unshifted.failed_requests == 0
    assert steps.monitor_unshifted.rows == 200
    assert steps.monitor_unshifted.verdict == "no drift"
    shifted = steps.traffic_shifted
    assert (shifted.shift, shifted.column, shifted.failed_requests) == ("scale", "amount", 0)
    assert steps.monitor_shifted.verdict == "drift"
    assert "amount" in (steps.monitor_shifted.summary or "")
    retrained = steps.retrain
    assert retrained and retrained.challenger.startswith("models:/fraud-mlp/")
    assert retrained.promote == (retrained.gain > cfg.retrain.margin)
    if retrained.promote:
        assert steps.rollout and steps.rollout.load.failed_requests == 0
        assert steps.rollout.update.served_version == retrained.challenger.rsplit("/", 1)[1]
    assert json.loads(json.dumps(steps.to_dict()))["retrain"]["promote"] == retrained.promote


def test_diabetes_regression_beside_the_baseline(workspace):
    cfg = load_config(None, ["tabular.source=diabetes", "train.epochs=12", "train.lr=0.02",
                             "train.batch_size=32", "train.num_workers=2",
                             "train.cpus_per_worker=0.5", "registry.auto_register=false"],
                      example="fraud")
    summary = run_tabular_train(cfg, workspace=workspace)
    mlp, baseline = summary.test, summary.baseline
    print(f"\ndiabetes: MLP MSE {mlp['mse']:.1f} R² {mlp['r2']:.3f}; "
          f"HistGradientBoosting MSE {baseline['mse']:.1f} R² {baseline['r2']:.3f}")
    assert summary.task == "regression" and mlp["r2"] > 0.25 and baseline["r2"] > 0.1
    assert "pr_curve" not in summary.evaluation


@pytest.mark.slow
def test_tune_searches_the_tabular_model(workspace, capsys):
    from mlsd_ray.tuning.search import run_tune

    cfg = load_config(None, ["tabular.source=breast-cancer", "train.epochs=3",
                             "tune.space={train.lr: [0.003, 0.03]}", "tune.scheduler=none"],
                      example="fraud")
    summary = run_tune(cfg, workspace=workspace)
    print(f"\ntabular tune: {summary.configurations}")
    assert summary.metric == "val_score" and summary.finished == 2
    assert summary.best.score > 0.8  # PR-AUC on breast cancer: far above chance
    assert open(summary.best_config).read().count("lr")
    # the best trial is registered, with its test metrics beside the baseline's
    assert summary.registered.uri == "models:/fraud-mlp/1"
    assert summary.best_model["test"]["pr_auc"] > 0.8
    assert summary.best_test.startswith("test pr_auc 0.")
    from mlsd_ray.cli.app import _render_tune

    _render_tune(summary)  # what `mlsd tune` prints: it once read an image-only key
    printed = capsys.readouterr().out
    assert "test pr_auc 0." in printed and "registered models:/fraud-mlp/1" in printed


def test_cli_data_stage_and_bad_source(tmp_path, ray_session):
    import os
    import subprocess
    import sys

    mlsd = [sys.executable, "-m", "mlsd_ray.cli"]
    home = str(tmp_path / "h")
    # joins the session's Ray, as a user's command joins a cluster (no Ray of its own to start)
    cluster = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    ok = subprocess.run([*mlsd, "data", "--example", "fraud", "--source", "fraud-synth:1000",
                         "--home", home, "--json"], capture_output=True, text=True, timeout=300,
                        env=cluster)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["task"] == "binary" and summary["features"] == 28
    assert sum(summary["counts"]["splits"].values()) == 1000
    bad = subprocess.run([*mlsd, "train", "--example", "fraud", "--source", "csv:/no/such.csv",
                          "--label", "y", "--home", home], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "csv file or folder not found: /no/such.csv" in bad.stderr
