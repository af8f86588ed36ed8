"""Multi-node clusters: every node must reach the same storage.

On one machine MLSD_HOME can be any folder. Once the Ray cluster spans machines, Ray Data tasks
write dataset parts, Train workers write checkpoints and Serve replicas read models on whichever
node runs them, so MLSD_HOME and the MLflow store must be shared: a URI (s3://, gs://), a network
mount (NFS, ...), an MLflow server. `check_shared_storage` stops a stage at its start with what to
set, instead of losing a dataset or a checkpoint to one node's disk halfway through.

Nodes are told apart by IP address: several Ray nodes on one machine (`ray.cluster_utils.Cluster`,
a laptop with two `ray start`) share its disk, so a local path is fine for them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mlsd_ray.core import storage
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace

__all__ = ["check_shared_storage", "cluster_machines", "local_only", "mount_type",
           "NETWORK_FILESYSTEMS", "REMOTE_TRACKING_SCHEMES", "SHARED_ENV", "storage_problems",
           "tracking_path"]

SHARED_ENV = "MLSD_SHARED_STORAGE"
# Mount types whose files every machine that mounts them sees.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "cephfs", "glusterfs", "lustre", "gpfs",
    "beegfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.goofys", "fuse.sshfs",
    "fuse.mountpoint-s3", "fuse.ceph", "efs", "9p", "virtiofs"})
# MLflow stores that are servers or databases, reachable from any node by their URI.
REMOTE_TRACKING_SCHEMES = ("http://", "https://", "databricks", "postgresql", "mysql", "mssql")


def cluster_machines() -> list[str]:
    """The distinct IP addresses of the alive nodes of the connected Ray cluster."""
    import ray

    return sorted({node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")})


def mount_type(path: str) -> str | None:
    """The filesystem type of the mount holding `path` (Linux /proc/mounts); None if unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def local_only(location: str, fs_type: Callable[[str], str | None] = mount_type) -> str | None:
    """Why `location` is on one machine only (e.g. "a local ext4 path"), or None if shared."""
    if storage.is_uri(location) and not location.startswith("file://"):
        return None
    path = location.removeprefix("file://")
    kind = fs_type(path)
    if kind in NETWORK_FILESYSTEMS:
        return None
    return f"a path on this machine's {kind or 'local'} filesystem"


def tracking_path(uri: str) -> str | None:
    """The local file behind an MLflow tracking URI (sqlite, file, bare path); None for servers."""
    if uri.startswith(REMOTE_TRACKING_SCHEMES):
        return None
    if uri.startswith("sqlite:///"):
        return uri.removeprefix("sqlite://")
    if storage.is_uri(uri) and not uri.startswith("file://"):
        return None
    return uri.removeprefix("file://")


def storage_problems(root: str, tracking_uri: str, machines: list[str],
                     fs_type: Callable[[str], str | None] = mount_type) -> list[str]:
    """What is not shared across `machines` (empty on one machine or when all is shared)."""
    if len(machines) < 2 or os.environ.get(SHARED_ENV) == "1":
        return []
    problems = []
    why = local_only(root, fs_type)
    if why:
        problems.append(f"MLSD_HOME is {root}, {why}")
    path = tracking_path(tracking_uri)
    if path is not None:
        why = local_only(path, fs_type)
        if why:
            problems.append(f"the MLflow store is {tracking_uri}, {why}")
    return problems


def check_shared_storage(workspace: Workspace) -> None:
    """InputError (exit 2) when the cluster spans machines and the outputs would not be shared."""
    machines = cluster_machines()
    if len(machines) < 2:
        return
    problems = storage_problems(workspace.root, workspace.tracking_uri, machines)
    if problems:
        raise InputError(
            f"this Ray cluster spans {len(machines)} machines ({', '.join(machines)}), but "
            + "; ".join(problems) + ". Datasets, checkpoints and models written on one node "
            "would be missing on the others. Set MLSD_HOME to storage every node reaches "
            "(s3://BUCKET/PATH, gs://BUCKET/PATH or an NFS mount) and MLFLOW_TRACKING_URI to an "
            f"MLflow server (http://HOST:5000); set {SHARED_ENV}=1 if the path is shared in a "
            "way this check does not detect.")
