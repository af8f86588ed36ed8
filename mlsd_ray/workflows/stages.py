"""The pipelines' stage headings, numbered against the stages a run will have."""

from __future__ import annotations


class StageHeadings:
    """`== stage 2/6: train and register ==`: numbered against the stages this run will have
    (tune, promote, serve and the monitoring loop depend on the options)."""

    def __init__(self, *names: str | None):
        self.names = [name for name in names if name]

    def __call__(self, name: str) -> str:
        return f"== stage {self.names.index(name) + 1}/{len(self.names)}: {name} =="
