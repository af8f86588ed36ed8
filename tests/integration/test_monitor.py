"""The monitoring loop on real parts: a Serve app logging predictions, `monitor` over its log,
Prometheus metrics from Ray's metrics agent, and `retrain` with gated promotion and a rolling
update under load, on the session's small digits model (tests/conftest.py).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from mlsd_ray import registry
from mlsd_ray.core.config import ServeConfig
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.ports import free_port
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.monitor.run import MonitorReport, monitor
from mlsd_ray.registry import promote
from mlsd_ray.serve import control
from mlsd_ray.serve.predlog import log_location, wait_for_rows
from mlsd_ray.tasks import get_task, load_config
from mlsd_ray.tasks.image.traffic import simulate_traffic
from mlsd_ray.tasks.image.train import log_and_register
from mlsd_ray.workflows.loop import BackgroundLoad
from mlsd_ray.workflows.retrain import retrain
from tests.conftest import SMALL_DIGITS, scrape_until

pytestmark = pytest.mark.usefixtures("ray_session")
ROOT = Path(__file__).resolve().parents[2]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


@pytest.fixture(scope="module")
def live(tmp_path_factory, digits_model):
    """The session's digits model registered, promoted and served with the prediction log on."""
    from ray import serve

    root = tmp_path_factory.mktemp("monitor")
    home = str(root / "mlsd-home")
    cfg = load_config(None, [*SMALL_DIGITS, "train.epochs=4",
                             "serve.prediction_log.flush_seconds=0.5"])
    dataset = digits_model.dataset
    workspace = Workspace.at(home)
    log_and_register(digits_model.result, cfg, dataset, "digits-cnn", workspace)
    promote("digits-cnn", 1, "production", workspace)
    cfg.serve = ServeConfig(model="models:/digits-cnn@production", port=free_port(),
                            num_cpus=0.25, ingress_num_cpus=0.1,
                            autoscaling={"min_replicas": 1, "max_replicas": 1},
                            prediction_log={"flush_seconds": 0.5})
    app = control.start(cfg.serve, workspace=workspace, log=lambda _: None)
    yield {"home": home, "workspace": workspace, "cfg": cfg, "dataset": dataset, "url": app.url,
           "root": root}
    serve.shutdown()


def traffic_then_monitor(live, shift: str, **options) -> MonitorReport:
    since = now()
    sent = simulate_traffic(live["url"], live["dataset"], shift, **options)
    assert sent.failed_requests == 0, sent.delivery
    location = log_location(live["cfg"].serve.prediction_log, live["workspace"])
    wait_for_rows(location, dt.datetime.fromisoformat(since), sent.answered, 30)
    return monitor(live["cfg"], live["workspace"], since=since, until=now(), log=lambda _: None)


def test_unshifted_traffic_is_logged_and_raises_no_drift(live):
    report = traffic_then_monitor(live, "none", count=150, seed=3)
    assert report.rows == 150  # every image logged, once
    result = report.models["models:/digits-cnn/1"]  # compared with version 1's reference
    assert report.verdict == "no drift", result.summary
    assert set(result.features) >= {"brightness", "orientation", "edges"}
    for name in ("report.json", "report.md", "histograms.png"):
        with open(report.outputs[name], "rb") as handle:
            assert len(handle.read()) > 100
    written = json.loads(open(report.outputs["report.json"]).read())
    assert written["models"]["models:/digits-cnn/1"]["features"]["edges"]["psi"] == \
        result.features["edges"].psi


@pytest.mark.parametrize("shift, feature", [("rotate", "orientation"), ("invert", "brightness"),
                                            ("noise", "edges")])
def test_shifted_traffic_is_flagged_naming_the_feature(live, shift, feature):
    report = traffic_then_monitor(live, shift, count=150, seed=4)
    result = report.models["models:/digits-cnn/1"]
    assert report.verdict == "drift" and feature in result.drifted_features
    assert feature in result.summary


def test_imbalanced_traffic_is_flagged_as_skew(live):
    report = traffic_then_monitor(live, "imbalance", count=150, seed=5)
    skew = report.models["models:/digits-cnn/1"].skew
    assert skew is not None and skew.drifted


def test_an_empty_window_says_no_data(live):
    report = monitor(live["cfg"], live["workspace"], since="2000-01-01T00:00",
                     until="2000-01-02T00:00", log=lambda _: None)
    assert report.verdict == "no data" and report.rows == 0 and not report.outputs


def test_serving_metrics_reach_prometheus(live):
    import ray  # noqa: F401  (the session's instance: ray.nodes() lists its metrics agent)

    assert control.metrics_endpoints()
    sent = simulate_traffic(live["url"], live["dataset"], "none", count=16, seed=9)
    assert sent.failed_requests == 0  # its own traffic: the test passes alone, too
    text = scrape_until("ray_mlsd_predictions_total", "ray_mlsd_batch_size_bucket",
                        'route="/v1/predict"')
    assert 'ray_mlsd_requests_total{' in text and 'status="200"' in text
    assert 'route="/v1/predict"' in text  # the template FastAPI matched (serve/app.py)
    assert 'ray_mlsd_predictions_total{' in text and 'outcome="' in text
    assert "ray_mlsd_request_latency_ms_bucket" in text and "ray_mlsd_batch_size_bucket" in text


def dashboard_metric_names() -> set[str]:
    """The series names the Grafana dashboard queries (ray_* in its PromQL expressions)."""
    dashboard = json.loads((ROOT / "cluster/monitoring/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return {name for expr in exprs for name in re.findall(r"\bray_[a-z_]+", expr)}


def prometheus_query(url: str, query: str) -> list[dict]:
    answer = requests.get(f"{url}/api/v1/query", params={"query": query}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.slow  # needs Debian's prometheus package, which .ci/run installs
def test_a_real_prometheus_scrapes_the_app_and_has_every_dashboard_metric(live, tmp_path):
    """Debian's `prometheus`, with cluster/monitoring/prometheus.yml's scrape job (its
    discovery file written here, naming the session's nodes), scrapes the live app while
    traffic runs (after one `mlsd monitor` run, whose score the app publishes): PromQL through
    Prometheus's HTTP API gives a non-zero request rate and the served model version, and
    every metric the dashboard queries has been scraped."""
    binary, promtool = shutil.which("prometheus"), shutil.which("promtool")
    assert binary and promtool, "install Debian's prometheus package (.ci/run does)"
    shipped = ROOT / "cluster/monitoring/prometheus.yml"
    checked = subprocess.run([promtool, "check", "config", str(shipped)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load(shipped.read_text())
    targets = [url.split("//")[1].removesuffix("/metrics") for url in control.metrics_endpoints()]
    (tmp_path / "targets.json").write_text(json.dumps([{"targets": targets}]))
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(tmp_path / "targets.json")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    traffic_then_monitor(live, "none", count=60, seed=7)  # a drift score for the app to publish
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        rate, versions, missing = [], [], set(dashboard_metric_names())
        # Generous: on 2 busy cores Ray's metrics agent can take a while to export Serve's
        # own series, and the drift gauge is refreshed at most every 10 s.
        deadline = time.monotonic() + 180
        with BackgroundLoad(get_task("image"), live["dataset"], live["url"]):
            while time.monotonic() < deadline and (not rate or not versions or missing):
                time.sleep(2)
                if server.poll() is not None:
                    break
                try:
                    rate = [r for r in prometheus_query(
                        url, 'sum(rate(ray_mlsd_requests_total{status="200"}[30s]))')
                        if float(r["value"][1]) > 0]
                    versions = prometheus_query(url, "sum by (model_version) "
                                                     "(ray_mlsd_model_loaded)")
                    names = requests.get(f"{url}/api/v1/label/__name__/values",
                                         timeout=10).json()["data"]
                except requests.ConnectionError:  # still starting
                    continue
                missing = dashboard_metric_names() - set(names)
        assert server.poll() is None, server.communicate()[1][-2000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    seen = f"rate {rate}, versions {versions}, never scraped {sorted(missing)}"
    assert rate, f"no request rate in Prometheus: {seen}"
    print(f"\nPrometheus: {float(rate[0]['value'][1]):.1f} requests/s; versions "
          f"{[v['metric'] for v in versions]}")
    assert [v["metric"]["model_version"] for v in versions] == ["1"], seen
    assert not missing, f"dashboard metrics never scraped: {seen}"


@pytest.fixture(scope="module")
def incoming(live):
    """New labelled data: the train split rotated by 30°, sent as traffic and saved."""
    folder = live["root"] / "rotated"
    simulate_traffic(live["url"], live["dataset"], "rotate", count=0, split="train",
                     save=str(folder))
    return folder


def test_retrain_rejects_a_weak_challenger_and_promotes_a_better_one(live, incoming):
    workspace, cfg = live["workspace"], live["cfg"]

    weak = cfg.model_copy(deep=True)
    weak.retrain.mode, weak.retrain.epochs, weak.retrain.lr = "scratch", 1, 1e-4
    rejected = retrain(weak, f"folder:{incoming}", workspace, log=lambda _: None)
    assert not rejected.promote and rejected.gain <= weak.retrain.margin
    assert registry.show("models:/digits-cnn@production", workspace).version == 1  # alias stays

    strong = cfg.model_copy(deep=True)
    strong.retrain.epochs = 4
    with BackgroundLoad(get_task("image"), live["dataset"], live["url"]) as load:
        decision = retrain(strong, f"folder:{incoming}", workspace, log=lambda _: None)
    assert decision.promote, decision.reason
    assert decision.metric == "accuracy"
    assert decision.challenger_scores.new_test.score > decision.champion_scores.new_test.score
    version = int(decision.challenger.rsplit("/", 1)[1])
    assert registry.show("models:/digits-cnn@production", workspace).version == version
    assert decision.rollout is not None and decision.rollout.served_version == str(version)
    assert load.totals.failed_requests == 0, load.totals.errors
    assert set(load.totals.model_versions) == {"1", str(version)}  # switched under load
    with open(decision.outputs["markdown"]) as handle:
        assert "promoted" in handle.read()
    with open(decision.outputs["json"]) as handle:  # decision.json: the JSON form
        saved = json.load(handle)
    assert saved["scores"]["challenger"]["holdout"]["score"] == \
        decision.challenger_scores.holdout.score and saved["promote"] is True


def test_retrain_refuses_another_label_set(live, incoming):
    partial = live["root"] / "partial"
    shutil.copytree(incoming, partial, dirs_exist_ok=True)
    shutil.rmtree(partial / "9")
    with pytest.raises(InputError, match=r"missing from it: \['9'\]"):
        retrain(live["cfg"], f"folder:{partial}", live["workspace"], log=lambda _: None)


def test_monitor_checks_a_set_of_inputs_instead_of_the_log(live, incoming, ray_session):
    """`mlsd monitor --inputs SPEC`: the inputs predicted offline (Ray Data), then tested
    against the model's training reference; rotated digits are drift, named by feature."""
    import os
    import sys

    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    done = subprocess.run(
        [sys.executable, "-m", "mlsd_ray.cli", "monitor", "--inputs", f"folder:{incoming}",
         "--model", "models:/digits-cnn/1", "--home", live["home"], "--json"],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    result = report["models"]["models:/digits-cnn/1"]
    assert report["rows"] == len(list(incoming.rglob("*.png")))
    assert report["verdict"] == "drift" and "orientation" in result["drifted_features"]
