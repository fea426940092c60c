"""``qai serve --workers N``: N server processes, each accepting on a listening socket of its own.

Why not uvicorn's own supervisor: it shares one listening socket among its processes. Every idle
process's event loop is woken for a new connection and the first to accept wins, and since
clients keep connections alive, whole clients stay on the process that won. Measured in
``bench/ingest_bench.py`` (c): 8 of its 9 connections on one of two processes, that process at
82 % CPU and the other at 14 %, so a single job queued behind a worker busy with batches while
the other idled.

Here the supervisor binds N sockets to the port with ``SO_REUSEPORT`` and listens on all of them
before any process starts, and process *i* accepts on socket *i*: the kernel spreads connections
over the sockets by a hash of their addresses (Linux >= 3.9), whatever the processes are doing.
Connections that arrive before a process serves wait in its socket's backlog.

* A process that exits has its socket closed, so new connections go to the others meanwhile;
  another process starts on a fresh socket, at once, or after 1, 2, 4 ... s (at most 30) when
  processes keep exiting within 10 s of starting. Five such exits in a row, or uvicorn's start-up
  failure (exit code 3), stop the server: restarting would only hide the fault.
* SIGHUP replaces the processes one at a time, each new one serving on its slot's socket before
  the old one stops. SIGINT and SIGTERM stop them all (uvicorn finishes the requests in flight),
  within 25 s together.
* A hung process (its event loop stuck) is not detected here; the readiness probe of the pod is
  what notices. Elsewhere than Linux, uvicorn's own supervisor runs instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from uvicorn import Config, Server
from uvicorn.config import STARTUP_FAILURE

from sdk.errors import QaiError

log = logging.getLogger(__name__)
multiprocessing.allow_connection_pickling()  # sockets reach the spawned processes as duplicated fds

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SECONDS = 25.0  # all processes together: within Kubernetes' default 30 s grace period
READY_SECONDS = 120.0  # a new process's start-up (migrations checked, HSM opened, model loaded)
QUICK_EXIT_SECONDS = 10.0
MAX_QUICK_EXITS = 5  # in a row: the process cannot run here, and restarting it only hides that
MAX_RESTART_DELAY = 30.0


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _port_in_use(host: str, port: int, exc: OSError) -> QaiError:
    return QaiError("serve.port_in_use", f"cannot listen on {host}:{port}: {exc.strerror}",
                    details={"host": host, "port": port})


def ensure_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on. Needed because ``SO_REUSEPORT`` sockets of the
    same user join a listening group rather than fail, so a second server would silently take a
    share of the first one's connections."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise _port_in_use(host, port, exc) from exc


def listening_sockets(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """``count`` sockets listening on one port, one per server process."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(_family(host), socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(backlog)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise _port_in_use(host, port, exc) from exc
    return socks


def _die_with(parent: int) -> None:
    """Ask Linux for SIGTERM when the supervisor dies (even by ``kill -9``): a process left behind
    would go on taking its share of the port's connections with no one to stop it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this process may outlive its supervisor",
                    ctypes.get_errno())
    if os.getppid() != parent:  # it died before prctl took effect
        sys.exit(0)


def _serve(config: Config, sock: socket.socket, parent: int, ready: Any) -> None:  # pragma: no cover - a child
    _die_with(parent)
    config.configure_logging()  # the spawned interpreter starts with none
    server = Server(config)

    def report_ready() -> None:  # for a rolling restart: the old process stops only once this one serves
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            ready.set()

    threading.Thread(target=report_ready, name="qai-serve-ready", daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C while importing the app: the supervisor stops it
        server.run(sockets=[sock])


@dataclass
class _Slot:
    """One server process and the socket it accepts on."""

    sock: socket.socket | None
    proc: BaseProcess | None = None
    started: float = 0.0
    quick_exits: int = 0  # in a row, each within QUICK_EXIT_SECONDS of its start
    due: float = 0.0  # when to start the next process (a backoff after quick exits)
    ready: Any = None  # the process's event, set once it serves; held here until the child has it


class _Supervisor:
    def __init__(self, config: Config, socks: list[socket.socket]) -> None:
        self.config = config
        self.slots = [_Slot(sock) for sock in socks]
        self.ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked locks or threads
        self.wake = threading.Event()  # set by the signal handlers
        self.stopping = False
        self.reload = False
        self.failed = False

    def start(self, slot: _Slot) -> None:
        """Start a process on ``slot``'s socket (a fresh one if it has none)."""
        if slot.sock is None:
            slot.sock = listening_sockets(self.config.host, self.config.port, 1, self.config.backlog)[0]
        slot.ready = self.ctx.Event()
        slot.proc = self.ctx.Process(target=_serve, args=(self.config, slot.sock, os.getpid(), slot.ready),
                                     name="qai-serve")
        slot.proc.start()
        slot.started = time.monotonic()

    def on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        self.wake.set()

    def on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload = True
        self.wake.set()

    def exited(self, slot: _Slot) -> None:
        """``slot``'s process is gone: close its socket, so that the kernel sends new connections
        to the others meanwhile (the ones waiting in its backlog are reset), and schedule another."""
        assert slot.proc is not None
        code, pid = slot.proc.exitcode, slot.proc.pid
        slot.proc.join()
        slot.proc = None
        if slot.sock is not None:
            slot.sock.close()
            slot.sock = None
        if code == STARTUP_FAILURE:  # the app, its settings or the socket: the same every time
            log.error("server process %s failed to start; stopping", pid)
            self.failed = self.stopping = True
            return
        quick = time.monotonic() - slot.started < QUICK_EXIT_SECONDS
        slot.quick_exits = slot.quick_exits + 1 if quick else 0
        if slot.quick_exits >= MAX_QUICK_EXITS:
            log.error("server process %s exited (%s): %d times in a row within %.0f s of starting; stopping",
                      pid, code, slot.quick_exits, QUICK_EXIT_SECONDS)
            self.failed = self.stopping = True
            return
        delay = 0.0 if slot.quick_exits == 0 else min(MAX_RESTART_DELAY, 2.0 ** (slot.quick_exits - 1))
        slot.due = time.monotonic() + delay
        log.warning("server process %s exited (%s); another starts in %.0f s", pid, code, delay)

    def rolling_restart(self) -> None:
        """SIGHUP: replace the processes one at a time, each new one serving on its slot's socket
        before the old one is stopped, so the port never stops answering."""
        for slot in self.slots:
            old = slot.proc
            if old is None or not old.is_alive() or self.stopping:
                continue
            self.start(slot)
            new, ready = slot.proc, slot.ready
            assert new is not None
            deadline = time.monotonic() + READY_SECONDS
            while not ready.wait(0.2):
                if self.stopping or not new.is_alive() or time.monotonic() > deadline:
                    log.error("the new server process %s did not start serving; keeping %s", new.pid, old.pid)
                    new.kill()
                    new.join()
                    slot.proc = old
                    return
            old.terminate()
            old.join(STOP_SECONDS)
            if old.is_alive():
                old.kill()
                old.join()

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self.on_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.on_hup)
        try:
            for slot in self.slots:
                self.start(slot)
            log.info("serving from %d processes", len(self.slots))
            while not self.stopping:
                self.wake.wait(0.2)
                self.wake.clear()
                if self.reload and not self.stopping:
                    self.reload = False
                    self.rolling_restart()
                for slot in self.slots:
                    if slot.proc is not None and not slot.proc.is_alive():
                        self.exited(slot)
                    elif slot.proc is None and time.monotonic() >= slot.due and not self.stopping:
                        try:
                            self.start(slot)
                        except QaiError as err:  # the port was taken meanwhile: try again later
                            log.error("cannot start a server process: %s", err.message)
                            slot.due = time.monotonic() + MAX_RESTART_DELAY
            self.shutdown()
        finally:
            for sig, handler in previous.items():
                if handler is not None:  # None: not set from Python; left as it is
                    signal.signal(sig, handler)
        return STARTUP_FAILURE if self.failed else 0

    def shutdown(self) -> None:
        procs = [s.proc for s in self.slots if s.proc is not None]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # uvicorn finishes the requests in flight on SIGTERM
        deadline = time.monotonic() + STOP_SECONDS  # one deadline for all, within a pod's grace period
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        for slot in self.slots:
            if slot.sock is not None:
                slot.sock.close()


def serve_processes(app: str, host: str, port: int, processes: int, log_level: str = "warning") -> int:
    """Serve ``app`` (an import string) from ``processes`` processes until SIGINT or SIGTERM
    (SIGHUP replaces them one at a time); returns the exit code."""
    if not sys.platform.startswith("linux"):  # SO_REUSEPORT balances and PR_SET_PDEATHSIG exist on Linux only
        import uvicorn

        uvicorn.run(app, host=host, port=port, workers=processes, log_level=log_level)
        return 0
    config = Config(app, host=host, port=port, log_level=log_level)
    ensure_port_free(host, port)
    return _Supervisor(config, listening_sockets(host, port, processes, config.backlog)).run()
