"""The pipelines' stage headings, numbered against the stages a run will have."""

from __future__ import annotations

from typing import Literal


class StageHeadings:
    """`== stage 2/6: train and register ==`: numbered against the stages this run will have
    (tune, promote, serve and the monitoring loop depend on the options: a stage this run
    skips is passed as False or None, e.g. `tune and "tune"`)."""

    def __init__(self, *names: str | Literal[False] | None):
        self.names = [name for name in names if name]

    def __call__(self, name: str) -> str:
        return f"== stage {self.names.index(name) + 1}/{len(self.names)}: {name} =="
