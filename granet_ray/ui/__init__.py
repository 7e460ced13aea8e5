"""What a person sees: rich tables, progress rows and plots. No Ray, no I/O."""

from __future__ import annotations

from rich.console import Console

PIPE_WIDTH = 160  # columns of output that is not a terminal (ray job logs, CI, files)


def console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr); when that is not a terminal, ``PIPE_WIDTH`` columns
    wide instead of rich's 80, so table rows are not cut in job logs and pipes."""
    out = Console(stderr=stderr)
    return out if out.is_terminal else Console(stderr=stderr, width=max(out.width, PIPE_WIDTH))
