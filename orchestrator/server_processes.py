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
Connections that hash to a process still starting, or being restarted, wait in its socket's
backlog, which the supervisor keeps open. A process that dies is started again on the same
socket; one that fails at startup (uvicorn's exit code 3) stops the server.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from multiprocessing.process import BaseProcess
from types import FrameType

from uvicorn import Config, Server
from uvicorn.config import STARTUP_FAILURE

from sdk.errors import QaiError

log = logging.getLogger(__name__)
multiprocessing.allow_connection_pickling()  # sockets reach the spawned processes as duplicated fds

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SECONDS = 30.0


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def ensure_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on. Needed because ``SO_REUSEPORT`` sockets of the
    same user join a listening group rather than fail, so a second server would silently take a
    share of the first one's connections."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise QaiError("serve.port_in_use", f"cannot listen on {host}:{port}: {exc.strerror}",
                           details={"host": host, "port": port}) from exc


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
        raise QaiError("serve.port_in_use", f"cannot listen on {host}:{port}: {exc.strerror}",
                       details={"host": host, "port": port}) from exc
    return socks


def _die_with(parent: int) -> None:
    """Ask Linux for SIGTERM when the supervisor dies (even by ``kill -9``): a process left behind
    would go on taking its share of the port's connections with no one to stop it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        sys.exit(0)


def _serve(config: Config, sock: socket.socket, parent: int) -> None:  # pragma: no cover - in a child
    _die_with(parent)
    config.configure_logging()  # the spawned interpreter starts with none
    Server(config).run(sockets=[sock])


class _Supervisor:
    def __init__(self, config: Config, socks: list[socket.socket]) -> None:
        self.config = config
        self.socks = socks
        self.ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked locks or threads
        self.stop = threading.Event()
        self.failed = False

    def start(self, sock: socket.socket) -> BaseProcess:
        proc = self.ctx.Process(target=_serve, args=(self.config, sock, os.getpid()), name="qai-serve")
        proc.start()
        return proc

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop.set()

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.on_signal)
        procs = [self.start(sock) for sock in self.socks]
        log.info("serving from %d processes: %s", len(procs), [p.pid for p in procs])
        while not self.stop.wait(0.5):
            for i, proc in enumerate(procs):
                if proc.is_alive():
                    continue
                if proc.exitcode == STARTUP_FAILURE:  # it would fail the same way every time
                    log.error("server process %s failed to start; stopping", proc.pid)
                    self.failed = True
                    self.stop.set()
                    break
                log.warning("server process %s exited (%s); starting another", proc.pid, proc.exitcode)
                procs[i] = self.start(self.socks[i])
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # uvicorn finishes the requests in flight on SIGTERM
        for proc in procs:
            proc.join(STOP_SECONDS)
            if proc.is_alive():
                proc.kill()
                proc.join()
        return STARTUP_FAILURE if self.failed else 0


def serve_processes(app: str, host: str, port: int, processes: int, log_level: str = "warning") -> int:
    """Serve ``app`` (an import string) from ``processes`` processes until SIGINT or SIGTERM;
    returns the exit code."""
    config = Config(app, host=host, port=port, log_level=log_level)
    ensure_port_free(host, port)
    socks = listening_sockets(host, port, processes, config.backlog)
    try:
        return _Supervisor(config, socks).run()
    finally:
        for sock in socks:
            sock.close()
