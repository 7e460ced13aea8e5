"""Run hooks for tests and demonstrations of crash-resume and elastic training: a crash, a
pause until a file appears, and a per-sample log. Never on the runtime's main path: pass
them with ``build_trainer(..., hooks=[...])`` or ``fit_local(..., hooks=[...])``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from granet_ray.distributed import gather_objects
from granet_ray.recipe import Hooks, Run, StepInfo


@dataclass(frozen=True)
class CrashAt(Hooks):
    """Worker ``rank`` ends its process abruptly (``os._exit(1)``, a real crash for Ray)
    right after global step ``step``, once: it creates the file ``marker`` first and never
    fires while it exists. ``marker`` must be on a disk that worker sees."""

    step: int
    marker: str
    rank: int = 0

    def on_step(self, run: Run, info: StepInfo) -> None:
        if run.rank != self.rank or info.step != self.step:
            return
        path = Path(self.marker)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os._exit(1)


@dataclass(frozen=True)
class PauseAt(Hooks):
    """After global step ``step`` every worker waits until the file ``release`` exists
    (rank 0 first creates ``reached``, holding the number of workers), so a test can change
    the cluster while a run is at a known step. Passes at once once released."""

    step: int
    reached: str
    release: str
    timeout_s: float = 600.0

    def on_step(self, run: Run, info: StepInfo) -> None:
        if info.step != self.step or Path(self.release).exists():
            return
        if run.rank == 0:
            Path(self.reached).write_text(str(run.world))
        deadline = time.monotonic() + self.timeout_s
        while not Path(self.release).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.release} did not appear in {self.timeout_s} s")
            time.sleep(0.1)


class SampleLog(Hooks):
    """Every worker appends one JSON line per global step to ``folder/<group>-<rank>.jsonl``:
    the step, its epoch, the group's size and the dataset indices this worker trained on.
    ``group`` is rank 0's start time (shared by the whole worker group, larger for a later
    group), so an audit can keep, for every step, the records of the last group that ran it
    (the work of a failed group after its last checkpoint is done again by the next)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._file: Path | None = None

    def on_step(self, run: Run, info: StepInfo) -> None:
        if self._file is None:
            group = gather_objects(time.time_ns())[0]  # every worker: its first step
            self._file = Path(self.folder, f"{group}-{run.rank}.jsonl")
            self._file.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "step": info.step,
            "epoch": info.epoch,
            "world": run.world,
            "indices": info.share.indices.tolist(),
        }
        with open(self._file, "a") as out:
            out.write(json.dumps(record) + "\n")


def audit(folder: str) -> dict[int, dict[int, list[int]]]:
    """The effective per-sample log of a ``SampleLog`` folder: epoch -> step -> the dataset
    indices of that step, from the last worker group that ran it (all its ranks)."""
    last: dict[int, tuple[int, int, list[int]]] = {}  # step -> (group, epoch, indices)
    for path in sorted(Path(folder).glob("*.jsonl")):
        group = int(path.stem.split("-")[0])
        for line in path.read_text().splitlines():
            record = json.loads(line)
            step = record["step"]
            known = last.get(step)
            if known is None or known[0] < group:
                last[step] = (group, record["epoch"], list(record["indices"]))
            elif known[0] == group:
                known[2].extend(record["indices"])
    epochs: dict[int, dict[int, list[int]]] = {}
    for step, (_, epoch, indices) in sorted(last.items()):
        epochs.setdefault(epoch, {})[step] = sorted(indices)
    return epochs
