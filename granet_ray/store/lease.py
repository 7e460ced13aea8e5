"""One writer per run: a lease object in the run's folder, local or on S3.

The lease (``lease.json``) names its holder (a random id, host, process id, start time) and
when it was last renewed; the holder renews it every ``renew_s`` seconds from a daemon
thread. A lease not renewed for ``LEASE_PERIODS`` periods has expired, and so has one whose
holder ran on this host (and PID namespace) and whose process is gone: either is taken over
at once. A live
lease of another holder refuses the start (``LeaseHeldError``).

Neither local disk through this API nor S3 offers an atomic create-if-absent, so a start
writes its lease, waits ``settle_s`` and reads it back: of two starts that overlap, the
later write wins and the earlier start sees the other holder and is refused. The window
left: a start that read no lease, then paused longer than ``settle_s`` before writing,
overwrites a lease taken meanwhile; the other holder sees that at its next renewal
(``lost``) and warns. Clocks of the hosts are assumed to agree to well within a period.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from granet_ray.store.errors import CheckpointError, StorageError
from granet_ray.store.storage import Storage, open_storage

LEASE_NAME = "lease.json"
LEASE_PERIODS = 3  # renewal periods without a renewal after which a lease has expired
SETTLE_S = {"local": 0.05, "s3": 1.0}  # wait between writing a lease and reading it back


class LeaseHeldError(CheckpointError):
    """Another live run holds the lease on the run's folder."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: a random ``id``, ``host``, ``pid`` (in the process namespace
    ``pid_ns``), ``started`` and ``renewed`` (POSIX seconds) and its renewal period
    ``renew_s``."""

    id: str
    host: str
    pid: int
    started: float
    renewed: float
    renew_s: float
    pid_ns: str = ""

    def expired(self, now: float) -> bool:
        """Whether the lease has expired at ``now``: not renewed for ``LEASE_PERIODS``
        periods, or held by a process of this host that is gone."""
        if now - self.renewed > LEASE_PERIODS * self.renew_s:
            return True
        here = self.host == socket.gethostname() and self.pid_ns == _pid_namespace() != ""
        return here and not _alive(self.pid)

    def describe(self, now: float) -> str:
        """``host pid N, running for 3m12s (renewed 4 s ago)``."""
        age = max(0.0, now - self.started)
        return (
            f"{self.host} pid {self.pid}, running for {_duration(age)} (renewed "
            f"{max(0.0, now - self.renewed):.0f} s ago)"
        )


def _pid_namespace() -> str:
    """This process's PID namespace (Linux), so that a process of another container with
    the same host name is never taken for a dead one here; "" where unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def read_holder(storage: Storage) -> Holder | None:
    """The holder in the lease of ``storage``'s folder; None when there is none (or it is
    unreadable, e.g. written by something else: then it is taken over)."""
    data = storage.get(LEASE_NAME, 64 * 1024)
    if data is None:
        return None
    try:
        doc = json.loads(data)
        return Holder(
            id=str(doc["id"]),
            host=str(doc["host"]),
            pid=int(doc["pid"]),
            started=float(doc["started"]),
            renewed=float(doc["renewed"]),
            renew_s=float(doc["renew_s"]),
            pid_ns=str(doc.get("pid_ns", "")),
        )
    except (ValueError, KeyError, TypeError):
        return None


class RunLease:
    """The lease on one run's folder, held by this process while it runs the run.

    ``acquire`` (or ``with RunLease(...)``) takes it or raises ``LeaseHeldError`` naming the
    holder and its age; a daemon thread renews it every ``renew_s`` seconds until
    ``release``, which deletes it. A failed renewal is a warning; a renewal that finds
    another holder sets ``lost`` and warns.
    """

    def __init__(
        self,
        run_uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        renew_s: float = 30.0,
        settle_s: float | None = None,
        clock: Any = time.time,
    ) -> None:
        self.storage = open_storage(run_uri, storage_options)
        self.renew_s = renew_s
        self.settle_s = SETTLE_S["local" if self.storage.local else "s3"]
        if settle_s is not None:
            self.settle_s = settle_s
        self.clock = clock
        now = clock()
        self.holder = Holder(
            id=secrets.token_hex(8),
            host=socket.gethostname(),
            pid=os.getpid(),
            started=now,
            renewed=now,
            renew_s=renew_s,
            pid_ns=_pid_namespace(),
        )
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.holder = Holder(**{**asdict(self.holder), "renewed": self.clock()})
        self.storage.put(LEASE_NAME, json.dumps(asdict(self.holder)).encode())

    def _refuse(self, other: Holder) -> LeaseHeldError:
        now = self.clock()
        left = max(0.0, other.renewed + LEASE_PERIODS * other.renew_s - now)
        return LeaseHeldError(
            f"run folder {self.storage.uri} is in use by another run ({other.describe(now)}); "
            f"wait for it to end, or, if it died, for its lease to expire (in {left:.0f} s)"
        )

    def acquire(self) -> RunLease:
        """Take the lease (see the class); returns itself.

        Raises:
            LeaseHeldError: another live holder has it.
            StorageError: the storage failed.
        """
        current = read_holder(self.storage)
        if current is not None and not current.expired(self.clock()):
            raise self._refuse(current)
        self._write()
        time.sleep(self.settle_s)
        current = read_holder(self.storage)
        if current is None or current.id != self.holder.id:
            if current is None:
                raise StorageError(f"the lease written to {self.storage.uri} disappeared")
            raise self._refuse(current)
        self._thread = threading.Thread(target=self._renew, name="granet-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                current = read_holder(self.storage)
                if current is not None and current.id != self.holder.id:
                    self.lost = True
                    warnings.warn(
                        f"the lease on {self.storage.uri} was taken over by another run "
                        f"({current.describe(self.clock())}); two runs now write this folder",
                        stacklevel=1,
                    )
                    return
                self._write()
            except CheckpointError as exc:
                warnings.warn(
                    f"could not renew the lease on {self.storage.uri}: {exc}", stacklevel=1
                )

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this holder's (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            current = read_holder(self.storage)
            if current is not None and current.id == self.holder.id:
                self.storage.delete(LEASE_NAME)
        except CheckpointError as exc:
            warnings.warn(f"could not release the lease on {self.storage.uri}: {exc}", stacklevel=1)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
