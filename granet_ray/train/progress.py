"""Live progress of a Ray Train run on the driver.

Worker rank 0 sends small events (run start or resume, optimizer steps, epoch metrics) into
a ``ray.util.queue.Queue``; the driver drains it in a thread and draws them with rich
(the progress bar and status line of ``granet_ray.report``).
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

from ray.util.queue import Empty, Queue
from rich.console import Console
from rich.progress import Progress, TaskID

from granet_ray.report import step_status, training_progress


class ProgressSender:
    """Rank 0's side: puts events on the driver's queue. Step events are throttled to one per
    ``interval`` seconds: ask ``due`` before building one (it may cost a device sync)."""

    def __init__(self, queue: Queue, interval: float = 0.5) -> None:
        self.queue = queue
        self.interval = interval
        self._last = -interval

    def due(self, *, force: bool = False) -> bool:
        """Whether to send a step event now: ``force`` (a mask update, an epoch's last
        step) or ``interval`` seconds since the last one."""
        return force or time.monotonic() - self._last >= self.interval

    def send(self, event: dict[str, Any]) -> None:
        self._last = time.monotonic()
        self.queue.put_nowait(event)


def epoch_line(metrics: dict[str, Any]) -> str:
    """One line per finished epoch: losses, accuracies, density, FLOPs, throughput."""
    return (
        f"epoch {metrics['epoch']:>3} step {metrics['step']:>7} | "
        f"train loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.2%} | "
        f"val loss {metrics['val_loss']:.4f} acc {metrics['val_accuracy']:.2%} | "
        f"density {metrics['density']:.4f} | inference FLOPs {metrics['inference_flops']:.3f}x | "
        f"{metrics['samples_per_second']:.0f} samples/s"
    )


class ProgressDisplay:
    """The driver's side: a context manager that draws the events of ``queue`` until exit."""

    def __init__(self, queue: Queue, console: Console, *, title: str = "GraNet") -> None:
        self.queue = queue
        self.title = title
        self._accuracy: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="granet-progress", daemon=True)
        self._bar: Progress = training_progress(console)
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressDisplay:
        self._bar.start()
        self._task = self._bar.add_task(self.title, total=None, status="starting workers")
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._bar.stop()

    def _drain(self) -> None:
        while True:
            try:
                event = self.queue.get(timeout=0.2)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            self.show(event)

    def show(self, event: dict[str, Any]) -> None:
        """Draw one event."""
        assert self._task is not None
        kind = event["kind"]
        if kind == "start":
            self._bar.update(self._task, total=event["total_steps"], completed=event["step"])
            if event["step"] > 0:
                self._bar.console.print(
                    f"[yellow]resumed from the checkpoint of epoch {event['epoch']} "
                    f"(step {event['step']})[/]"
                )
            else:
                self._bar.console.print(
                    f"training on {event['world_size']} worker(s): {event['epochs']} epochs of "
                    f"{event['steps_per_epoch']} steps per worker"
                )
        elif kind == "step":
            self._bar.update(
                self._task,
                completed=event["step"],
                status=step_status(
                    epoch=event["epoch"],
                    loss=event["loss"],
                    density=event["density"],
                    next_update=event["next_update"],
                    accuracy=self._accuracy,
                ),
            )
        elif kind == "epoch":
            self._accuracy = event["val_accuracy"]
            self._bar.console.print(epoch_line(event), soft_wrap=True)
            self._bar.update(
                self._task,
                status=step_status(
                    epoch=event["epoch"],
                    loss=event["train_loss"],
                    density=event["density"],
                    next_update=None if event["next_update"] < 0 else event["next_update"],
                    accuracy=self._accuracy,
                ),
            )
