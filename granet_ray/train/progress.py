"""Live progress of a Ray Train run on the driver: worker rank 0 puts the run's events (see
``granet_ray.ui.progress``) on a ``ray.util.queue.Queue``; a thread of the driver drains it
into a ``RunView``."""

from __future__ import annotations

import threading
from types import TracebackType

from ray.util.queue import Empty, Queue

from granet_ray.ui.progress import RunView


class QueueDrain:
    """A context manager whose thread draws every event of ``queue`` on ``view`` until exit
    (then the events still queued too)."""

    def __init__(self, queue: Queue, view: RunView) -> None:
        self.queue = queue
        self.view = view
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="granet-progress", daemon=True)

    def __enter__(self) -> QueueDrain:
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

    def _drain(self) -> None:
        while True:
            try:
                event = self.queue.get(timeout=0.2)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            self.view.show(event)
