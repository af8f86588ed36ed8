"""The layout of MLSD_HOME: where each stage keeps what it writes, in one place.

`Workspace.at(home)` resolves the root once (`--home`, else `$MLSD_HOME`, else ./mlsd-home; a
path or a URI, see storage.py) and names every location under it. The edges build it: each
`mlsd` command, each Ray job (cli/jobs.py) and Serve's application builder (serve/app.py
`build_app`). Every stage below them takes the `Workspace` as an argument and never resolves
a home again; it is a frozen dataclass of one string, so it travels to Ray actors and Serve
replicas as it is. A stage asks the workspace for "the runs folder" or "this dataset's
folder" instead of joining folder names itself, so the layout below is the only place that
knows them:

    datasets/<name>/<fingerprint>/   prepared splits, quarantine, quality report (data stage)
    runs/<run>/                      Ray Train's checkpoints and results (train)
    reports/<run>/<split>/           evaluation reports and plots (evaluate)
    tune/<search>/                   searches: results, curves, best config (tune)
    mlflow.db, mlflow-artifacts/     the embedded MLflow store (registry); with
                                     MLFLOW_TRACKING_URI a database, only the artifacts
    registry-cache/<name>/<version>/ registered checkpoints copied to this machine
    serve/<app>.json                 what `mlsd serve` started, for status/deploy/stop
    predictions/date=<day>/          the served requests' prediction log (monitor input)
    monitor/<stamp>/, monitor/latest.json   drift reports, the last verdict
    incoming/<stamp>/                labelled traffic kept as new data (simulate-traffic)
    retrain/<stamp>/                 the promotion gate's decisions (retrain)
    batch-predictions/<name>/        offline predictions (predict --source)
    downloads/                       datasets fetched by their library (torchvision)
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from mlsd_ray.core import storage
from mlsd_ray.core.errors import InputError

__all__ = ["fresh_name", "USER_TRACKING_URI", "Workspace"]

# Read once, at import: mlflow.set_tracking_uri() writes the variable back into os.environ,
# which would otherwise make a later call (another MLSD_HOME) or a child process see our
# sqlite file as "the user's server".
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def fresh_name(stem: str) -> str:
    """A new run or search name, <stem>-<date>-<time>-<4 hex>. A name whose folder exists
    resumes that run, which is what `--run-name` asks for, so a generated name must never
    repeat: the time alone is to the second, and a retrain's two challengers once started
    within one, and the second went on from the first's checkpoints."""
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Workspace:
    """The locations under one MLSD_HOME (`root`: an absolute path or a URI)."""

    root: str

    @classmethod
    def at(cls, home: str | None = None) -> Workspace:
        """The workspace of `home`, else `$MLSD_HOME`, else ./mlsd-home."""
        return cls(storage.home(home))

    def _under(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def dataset(self, name: str, fingerprint: str) -> str:
        """A prepared dataset's folder: the same inputs and config give the same one."""
        return self._under("datasets", name, fingerprint)

    @property
    def runs(self) -> str:
        """Ray Train's storage path: one folder per training run."""
        return self._under("runs")

    def report(self, run: str, split: str) -> str:
        """The evaluation report of a run's model on one split."""
        return self._under("reports", run, split)

    @property
    def searches(self) -> str:
        """Ray Tune's storage: one folder per search."""
        return self._under("tune")

    @property
    def monitor(self) -> str:
        """Drift reports, one folder per check, and latest.json (the last verdict)."""
        return self._under("monitor")

    @property
    def predictions(self) -> str:
        """The prediction log that served requests write (partitioned by day)."""
        return self._under("predictions")

    def incoming(self, name: str) -> str:
        """New labelled data, kept from traffic for a retrain."""
        return self._under("incoming", name)

    def retrain(self, stamp: str) -> str:
        """One retrain's promotion decision."""
        return self._under("retrain", stamp)

    def explanations(self, run: str, stamp: str) -> str:
        """One `mlsd explain` of a run's model: overlays, sanity figures, JSON."""
        return self._under("explanations", run, stamp)

    def batch_predictions(self, name: str) -> str:
        """An offline prediction run's outputs."""
        return self._under("batch-predictions", name)

    @property
    def downloads(self) -> str:
        """Datasets that their own library downloads (torchvision)."""
        return self._under("downloads")

    # The MLflow store, the registry cache and Serve's records live on this machine's disk.

    def local(self, *parts: str) -> Path:
        """A local path under the root (sqlite, the registry cache and Serve's records need
        one: see `tracking_uri` for the error when the root is a URI)."""
        return Path(self.root, *parts)

    @property
    def serve_state(self) -> Path:
        """`mlsd serve`'s records: <app>.json per running app, the Ray head's log."""
        return self.local("serve")

    @property
    def registry_cache(self) -> Path:
        """Registered checkpoints copied to this machine, by name and version."""
        return self.local("registry-cache")

    @property
    def mlflow_artifacts(self) -> str:
        """Where MLflow keeps the artifacts of a store without a server (sqlite, PostgreSQL):
        a file:// URI, or the root's own scheme (s3://...) when the root is a URI."""
        if storage.is_uri(self.root):
            return self._under("mlflow-artifacts")
        return self.local("mlflow-artifacts").as_uri()

    @property
    def mlflow_db(self) -> Path:
        return self.local("mlflow.db")

    @property
    def tracking_uri(self) -> str:
        """The MLflow store: `MLFLOW_TRACKING_URI` (an MLflow server, or a database such as
        postgresql://USER@HOST/DB), else a sqlite file under the root (which must be local
        then: InputError otherwise)."""
        if USER_TRACKING_URI:
            return USER_TRACKING_URI
        if storage.is_uri(self.root):
            raise InputError(f"MLSD_HOME is {self.root}: an embedded sqlite registry needs a "
                             "local folder; set MLFLOW_TRACKING_URI to an MLflow server")
        os.makedirs(self.root, exist_ok=True)
        return f"sqlite:///{self.mlflow_db}"
