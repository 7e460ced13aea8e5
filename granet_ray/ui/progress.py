"""Live progress: one rich bar over optimizer steps (a run) or trials (a sweep) with a status
line, lines printed above it as things happen, and the drawing of a run's progress events.

A run's events are the typed events of ``granet_ray.events``, the same whether they come from
this process or from a Ray worker through a queue: ``Started`` (the run starts or resumes),
``Stepped``, ``EpochEnded`` (its metrics) and ``Resized`` (an elastic run restarted on another
number of workers).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from granet_ray.events import EpochEnded, EpochMetrics, Event, Resized, Started, Stepped


def step_status(
    *, epoch: int, loss: float, density: float, next_update: int | None, accuracy: float | None
) -> str:
    """One status line: epoch, loss, accuracy, density, next mask update step."""
    parts = [f"epoch {epoch}", f"loss {loss:.4f}"]
    if accuracy is not None:
        parts.append(f"val acc {accuracy:.2%}")
    parts.append(f"density {density:.4f}")
    parts.append(f"next update {next_update}" if next_update is not None else "masks final")
    return " | ".join(parts)


def epoch_line(metrics: EpochMetrics) -> str:
    """One line per finished epoch: losses, accuracies, density, FLOPs, throughput."""
    return (
        f"epoch {metrics['epoch']:>3} step {metrics['step']:>7} | "
        f"train loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.2%} | "
        f"val loss {metrics['val_loss']:.4f} acc {metrics['val_accuracy']:.2%} | "
        f"density {metrics['density']:.4f} | inference FLOPs {metrics['inference_flops']:.3f}x | "
        f"{metrics['samples_per_second']:.0f} samples/s"
    )


class LiveBar:
    """A context manager drawing one progress bar with a status field on ``console``;
    ``print`` writes a line above it. Draws nothing unless ``enabled``."""

    def __init__(
        self,
        console: Console,
        title: str,
        *,
        total: float | None = None,
        completed: float = 0,
        status: str = "",
        enabled: bool = True,
    ) -> None:
        self.console = console
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            disable=not enabled,
        )
        self.task: TaskID = self.bar.add_task(
            title, total=total, completed=completed, status=status
        )

    def __enter__(self) -> LiveBar:
        self.bar.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.bar.stop()

    def update(self, **fields: Any) -> None:
        """Change the bar (``total``, ``completed``, ``status``...)."""
        self.bar.update(self.task, **fields)

    def print(self, text: str) -> None:
        """A line above the bar (rich markup)."""
        if self.enabled:
            self.bar.console.print(text, highlight=False, soft_wrap=True)


class RunView(LiveBar):
    """The bar of a training run over its global steps, drawing its events (``show``).
    ``started``: a ``Started`` event arrived (the workers are up)."""

    def __init__(self, console: Console, *, title: str = "GraNet", enabled: bool = True) -> None:
        super().__init__(console, title, status="starting", enabled=enabled)
        self._accuracy: float | None = None
        self.started = False

    def show(self, event: Event) -> None:
        """Draw one event."""
        if isinstance(event, Started):
            self.started = True
            self.update(total=event.total_steps, completed=event.step)
            where = f"{event.world_size} worker(s)"
            if event.checkpoint:
                self.print(
                    f"[yellow]resumed on {where} from {escape(event.checkpoint)} "
                    f"(epoch {event.epoch}, step {event.step})[/]"
                )
            else:
                self.print(
                    f"training on {where}: {event.epochs} epochs of "
                    f"{event.steps_per_epoch} steps of {event.global_batch} samples"
                )
        elif isinstance(event, Resized):
            self.print(
                f"[yellow]resized from {event.old_size} to {event.new_size} worker(s) "
                f"at step {event.step}: resumed from {escape(event.checkpoint)}, "
                f"{event.seconds_lost:.0f} s lost[/]"
            )
        elif isinstance(event, Stepped):
            status = step_status(
                epoch=event.epoch,
                loss=event.loss,
                density=event.density,
                next_update=event.next_update,
                accuracy=self._accuracy,
            )
            self.update(completed=event.step, status=status)
        elif isinstance(event, EpochEnded):
            metrics = event.metrics
            self._accuracy = metrics["val_accuracy"]
            self.print(escape(epoch_line(metrics)))
            next_update = None if metrics["next_update"] < 0 else metrics["next_update"]
            status = step_status(
                epoch=metrics["epoch"],
                loss=metrics["train_loss"],
                density=metrics["density"],
                next_update=next_update,
                accuracy=self._accuracy,
            )
            self.update(completed=metrics["step"], status=status)
