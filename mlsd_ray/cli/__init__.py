"""The `mlsd` command line: app.py builds the typer app from one module per command group
(support.py holds the shared options and the run/render/exit-code wrapper; serve.py and
monitor.py the serving and monitoring commands); jobs.py is the entry point of the Ray jobs
in jobs/, submit.py of `mlsd submit`."""

from mlsd_ray.cli.app import app, main

__all__ = ["app", "main"]
