"""`mlsd monitor`: drift and skew of a window of the prediction log (or of a set of inputs).

Rows are grouped by the model version that served them; each group is tested against that
version's own reference (from its registered checkpoint), never another's. Writes
report.json, report.md and histograms.png under $MLSD_HOME/monitor/<time>/, and
$MLSD_HOME/monitor/latest.json, which the Serve app publishes as the drift-score metric.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlsd_ray.core import storage
from mlsd_ray.core.config import Config, MonitorConfig
from mlsd_ray.core.contracts import DRIFT_REFERENCE
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.runtime import log_stderr
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.explain import figure_png
from mlsd_ray.monitor import drift
from mlsd_ray.serve.predlog import log_location, read_log

__all__ = ["histograms_png", "load_reference", "markdown", "monitor", "MonitorReport", "window"]


@dataclass
class MonitorReport:
    """One `mlsd monitor` run: the window, its rows, the verdict over all model versions and
    each version's tests (`models`, by URI); `outputs` names report.json, report.md and
    histograms.png (none when the window was empty)."""

    since: str | None
    until: str | None
    rows: int
    thresholds: MonitorConfig
    verdict: str = drift.NO_DATA
    models: dict[str, drift.ModelDrift] = field(default_factory=dict)
    summary: str = ""
    outputs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """report.json, and `mlsd monitor --json`."""
        plain = {"window": {"since": self.since, "until": self.until}, "rows": self.rows,
                 "thresholds": self.thresholds.model_dump(),
                 "models": {uri: model.to_dict() for uri, model in self.models.items()},
                 "verdict": self.verdict, "summary": self.summary}
        return {**plain, "outputs": self.outputs} if self.outputs else plain


def load_reference(model_uri: str, workspace: Workspace) -> dict:
    """The reference profile stored in a model version's checkpoint (checksums verified)."""
    from mlsd_ray import registry
    from mlsd_ray.training.checkpoint import verify

    directory = registry.resolve(model_uri, workspace)
    verify(directory)
    return DRIFT_REFERENCE.read(storage.join(directory, "reference.json"))


def window(since: str | None, until: str | None) -> tuple[dt.datetime | None, dt.datetime | None]:
    """`--since 1h` (relative) or ISO times -> UTC datetimes; InputError when unparsable."""
    from mlsd_ray.serve.predlog import parse_since

    now = dt.datetime.now(dt.timezone.utc)

    def parse(text: str | None) -> dt.datetime | None:
        if not text:
            return None
        try:
            return now - parse_since(text)
        except ValueError:
            pass
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError as exc:
            raise InputError(f"time {text!r}: use a duration (90s, 15m, 1h, 2d) or an ISO time "
                             "(2026-11-22T10:00)") from exc
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)

    return parse(since), parse(until)


def monitor(cfg: Config, workspace: Workspace, since: str | None = "1h",
            until: str | None = None, frame: pd.DataFrame | None = None, out: str | None = None,
            log: Callable[[str], None] = log_stderr) -> MonitorReport:
    """Test the window (or `frame`, e.g. batch predictions) and write the reports."""
    start, end = window(since, until)
    if frame is None:
        location = log_location(cfg.serve.prediction_log, workspace)
        frame = read_log(location, start, end)
        log(f"{len(frame)} logged predictions in the window from {location}")
    report = MonitorReport(since=start.isoformat() if start else None,
                           until=end.isoformat() if end else None, rows=len(frame),
                           thresholds=cfg.monitor)
    if frame.empty:
        report.summary = ("no predictions in this window: nothing to test (send traffic, or "
                          "widen --since)")
        return report
    references = {uri: load_reference(uri, workspace) for uri in frame["model_uri"].unique()}
    for uri, rows in frame.groupby("model_uri", sort=False):
        result = drift.check_model(rows, references[uri], cfg.monitor)
        result.model_version = str(rows["model_version"].iloc[0])
        report.models[str(uri)] = result
    verdicts = [m.verdict for m in report.models.values()]
    report.verdict = (drift.DRIFT if drift.DRIFT in verdicts else drift.NO_DRIFT
                      if drift.NO_DRIFT in verdicts else drift.TOO_FEW)
    report.summary = "; ".join(f"{uri}: {m.summary}" for uri, m in report.models.items())
    _write(report, frame, references, workspace, out, log)
    return report


def _write(report: MonitorReport, frame: pd.DataFrame, references: dict, workspace: Workspace,
           out: str | None, log: Callable[[str], None]) -> None:
    root = workspace.monitor
    out = out or storage.join(root, time.strftime("%Y%m%d-%H%M%S"))
    report.outputs = {name: storage.join(out, name)
                      for name in ("report.json", "report.md", "histograms.png")}
    busiest = frame["model_uri"].value_counts().index[0]
    storage.write_bytes(report.outputs["histograms.png"],
                        histograms_png(frame[frame["model_uri"] == busiest],
                                       references[busiest], busiest))
    storage.write_text(report.outputs["report.md"], markdown(report))
    storage.write_json(report.outputs["report.json"], report.to_dict())
    latest = {"time": dt.datetime.now(dt.timezone.utc).isoformat(), "verdict": report.verdict,
              "report": report.outputs["report.json"],
              "drift_score_by_version": {m.model_version: m.drift_score
                                         for m in report.models.values()}}
    storage.write_text(storage.join(root, "latest.json"), json.dumps(latest, indent=2))
    log(f"monitor report: {report.outputs['report.md']}")


def _yes(flag: bool, word: str = "**yes**", otherwise: str = "no") -> str:
    return word if flag else otherwise


def markdown(report: MonitorReport) -> str:
    """A person's view of the report: verdict, then one table per model version."""
    lines = [f"# Monitor: {report.verdict}", "",
             f"Window {report.since or 'start'} to {report.until or 'now'}; {report.rows} "
             "predictions.", ""]
    for uri, model in report.models.items():
        lines += [f"## {uri} ({model.rows} predictions): {model.summary}", ""]
        if model.note:
            lines += [f"Note: {model.note}", ""]
        lines += _model_tables(model)
    return "\n".join(lines) + "\n"


def _model_tables(model: drift.ModelDrift) -> list[str]:
    """One model version's tests as markdown: a table per kind of column, then a line each
    for the scores, the predicted classes and the confidence."""
    lines: list[str] = []
    if model.features:
        lines += ["| feature | reference mean | current mean | PSI | KS p-value | drifted |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {f.reference_mean} | {f.current_mean} | {f.psi} | "
                  f"{f.ks_pvalue:.2e} | {_yes(f.drifted)} |" for name, f in model.features.items()]
        lines.append("")
    if model.categories:
        lines += ["| column | chi2 | p-value | TV distance | shares now | drifted |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {c.chi2} | {c.pvalue:.2e} | {c.total_variation} | "
                  f"{_shares(c.current_share)} | {_yes(c.drifted)} |"
                  for name, c in model.categories.items()]
        lines.append("")
    if model.missing:
        lines += ["| column | missing in training | missing now | p-value | changed |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {m.reference_rate} | {m.current_rate} | {m.pvalue:.2e} | "
                  f"{_yes(m.drifted)} |" for name, m in model.missing.items()]
        lines.append("")
    if model.score:
        score = model.score
        lines += [f"Model scores: mean {score.current_mean} (reference {score.reference_mean}), "
                  f"PSI {score.psi}, KS p {score.ks_pvalue:.2e}.", ""]
    if model.skew:
        skew = model.skew
        lines += [f"Predicted classes vs training labels: chi2 {skew.chi2}, p "
                  f"{skew.pvalue:.2e}, total variation {skew.total_variation} "
                  f"({_yes(skew.drifted, '**skewed**', 'no skew')}).", ""]
    if model.confidence:
        conf = model.confidence
        lines += [f"Mean confidence {conf.current_mean} (reference {conf.reference_mean}, KS p "
                  f"{conf.ks_pvalue:.2e}).", ""]
    return lines


def _shares(shares: dict[str, float], top: int = 4) -> str:
    biggest = sorted(shares.items(), key=lambda item: -item[1])[:top]
    return ", ".join(f"{name} {share:.2f}" for name, share in biggest)


def histograms_png(rows: pd.DataFrame, reference: dict, title: str) -> bytes:
    """Reference-vs-current histogram per feature, plus the class shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = reference.get("log_prefix", "")
    names = [n for n in reference.get("features", {}) if prefix + n in rows][:7]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, name in zip(axes.flat, names):
        ref = np.asarray(reference["features"][name], float)
        now = pd.to_numeric(rows[prefix + name], errors="coerce").dropna().to_numpy(float)
        edges = np.histogram_bin_edges(np.concatenate([ref, now]), bins=30)
        ax.hist(ref, edges, density=True, alpha=0.5, label="reference (training)")
        ax.hist(now, edges, density=True, alpha=0.5, label="current")
        ax.set_title(name)
    counts = reference.get("label_counts", {})
    ax = axes.flat[-1]
    if counts:
        classes = list(counts)
        share = np.array(list(counts.values()), float) / max(sum(counts.values()), 1)
        current = rows["predicted_class"].astype(str).value_counts(normalize=True)
        x = np.arange(len(classes))
        ax.bar(x - 0.2, share, 0.4, label="training labels")
        ax.bar(x + 0.2, current.reindex(classes, fill_value=0).to_numpy(), 0.4,
               label="predicted")
        ax.set_xticks(x, classes)
        ax.set_title("classes")
        ax.legend(fontsize=8)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return figure_png(fig, dpi=80)
