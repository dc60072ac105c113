"""metrics.jsonl: the training loop's log of metrics by step (`JsonLines`), written by process 0
and cut back to the resumed checkpoint's step when a killed run resumes."""

from __future__ import annotations

import json
from typing import Any

from etils import epath

from multitower_jax import fileio
from multitower_jax import workdir as workdir_lib


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line cut short by a kill (so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class JsonLines:
    """metrics.jsonl, written by process 0: appended to locally; object stores (gs://) cannot
    append, so there the whole file is rewritten on each write (a few KB per log line).

    Lines past ``resume_step`` were logged by a run killed after its last checkpoint; the
    resumed run logs those steps again, so they are dropped first.
    """

    def __init__(self, path: epath.Path, resume_step: int):
        self.path = path
        old = path.read_text().splitlines(keepends=True) if path.exists() else []
        self.lines = [line for line in old if _logged_step(line) <= resume_step]
        if len(self.lines) != len(old):
            fileio.write_text(path, "".join(self.lines))
        self.file = None if workdir_lib.is_remote(path) else path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self.file is None:
            self.lines.append(line)
            fileio.write_text(self.path, "".join(self.lines))
        else:
            self.file.write(line)
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
