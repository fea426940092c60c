"""The outbox uploader as a process of its own (``qai uploader``), and ``qai serve``'s supervision of it.

The uploader reads envelopes from the database, writes and re-reads them in the object store and
hashes them: steady Python work that, on a thread of a serving worker, holds that worker's GIL
while single-job requests wait. ``qai serve`` therefore starts one uploader process beside its
workers (setting ``uploader=process``, the default) and tells them, through
:data:`UPLOADER_PROCESS_ENV`, not to run the thread. The process exits when its parent is gone, so
a ``kill -9`` of ``qai serve`` leaves no orphan uploading; a restarted server starts a new one,
and the database lock in :meth:`Uploader.run_once` keeps two from uploading at once.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.settings import Settings

if TYPE_CHECKING:
    from orchestrator.outbox import Uploader

log = logging.getLogger(__name__)

UPLOADER_PROCESS_ENV = "QAI_SERVE_UPLOADER_PID"
"""Set by ``qai serve`` for its workers to the pid of the uploader process it runs for them."""

OUTBOX_COMPONENTS = ("all", "jobs", "scheduler")
"""The components that write to the outbox (job envelopes, decisions): where they are served, an
uploader runs."""

PARENT_POLL_SECONDS = 1.0
RESTART_DELAY_SECONDS = 1.0


def runs_uploader_thread(settings: Settings) -> bool:
    """Whether a process that serves jobs or the scheduler runs the uploader on a thread of its own."""
    if settings.uploader == "thread":
        return True
    if settings.uploader == "external":
        return False
    return UPLOADER_PROCESS_ENV not in os.environ  # process: unless qai serve runs it for us


def serve_starts_uploader(settings: Settings, component: str) -> bool:
    return settings.uploader == "process" and component in OUTBOX_COMPONENTS


@contextmanager
def _standalone_uploader(settings: Settings) -> Iterator[Uploader]:
    """An uploader on its own database connection (migrated: a no-op under qai serve, which
    migrated first), the connection disposed of afterwards."""
    from orchestrator import migrate
    from orchestrator.db import Database
    from orchestrator.objects import make_object_store
    from orchestrator.outbox import Uploader

    db = Database(settings.resolved_database_url)
    try:
        migrate.upgrade(db)
        yield Uploader(db, make_object_store(settings))
    finally:
        db.dispose()


def run_uploader(settings: Settings, stop: threading.Event, *, parent: int | None = None) -> None:
    """Upload until ``stop`` is set or, with ``parent``, until that process is gone (a SIGKILLed
    ``qai serve`` runs no ``finally``: its child notices that it was re-parented)."""
    if settings.uploader_nice:
        os.nice(settings.uploader_nice)
    with _standalone_uploader(settings) as uploader:
        uploader.db.checkpoint_in_background()  # stopped with the connection's disposal
        uploader.start()
        try:
            while not stop.wait(PARENT_POLL_SECONDS):
                if parent is not None and os.getppid() != parent:
                    # uvicorn re-raises the SIGTERM it handled once its server is down, so a stopped
                    # qai serve often ends before it can stop us: not an error
                    log.info("qai serve (pid %d) is gone; the uploader stops too", parent)
                    return
        finally:
            uploader.close()  # finishes the batch in hand: its uploads are write-once, so a cut is safe too


def drain_outbox(settings: Settings, timeout: float) -> int:
    """Upload everything in the outbox now; returns how many envelopes were pending."""
    with _standalone_uploader(settings) as uploader:
        pending = uploader.pending()
        uploader.drain(timeout)
        return pending


@dataclass
class UploaderProcess:
    """``qai uploader --parent <this pid>``, restarted if it dies while the server runs."""

    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    _stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _watcher: threading.Thread | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "sdk.cli", "uploader", "--parent", str(os.getpid())])

    def start(self) -> UploaderProcess:
        self.proc = self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="uploader-watch", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        while True:
            assert self.proc is not None
            code = self.proc.wait()
            if self._stopping.wait(RESTART_DELAY_SECONDS):
                return
            log.error("the uploader process exited with %s; starting it again", code)
            with self._lock:
                if self._stopping.is_set():
                    return
                self.proc = self._spawn()
                self.restarts += 1

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._watcher is not None:
            self._watcher.join(timeout)


@contextmanager
def uploader_process(settings: Settings, component: str) -> Iterator[UploaderProcess | None]:
    """Around ``qai serve``: the uploader process its workers rely on, when the settings ask for it."""
    if not serve_starts_uploader(settings, component):
        yield None
        return
    child = UploaderProcess().start()
    assert child.proc is not None
    # Workers inherit the environment (spawned ones too): none of them starts the uploader thread.
    os.environ[UPLOADER_PROCESS_ENV] = str(child.proc.pid)
    try:
        yield child
    finally:
        os.environ.pop(UPLOADER_PROCESS_ENV, None)
        child.stop()
