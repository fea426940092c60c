"""``qai serve --workers N``: N server processes, each accepting on its own ``SO_REUSEPORT`` socket.

With one shared listening socket (uvicorn's supervisor) keep-alive connections piled onto one
process; here each process has a socket of its own and the kernel spreads connections over them.
The supervisor restarts a process that dies, refuses a port already in use, and its processes do
not outlive it, even after ``kill -9``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE

from orchestrator.server_processes import MAX_QUICK_EXITS, _Slot, _Supervisor
from tests.conftest import free_port
from tests.proc_helpers import child_pids, gone

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 24  # hashed over 2 sockets: one process left without any has probability 2 ** -23


def _server_processes(parent: int) -> list[int]:
    return child_pids(parent, b"spawn_main")


def _tcp_sockets(port: int, state: str) -> set[str]:
    """Inodes of the sockets on local ``port`` in ``state`` (01 established, 0A listening)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == state:
                found.add(f[9])
    return found


def _owned(pid: int, inodes: set[str]) -> set[str]:
    mine = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            mine.add(target[8:-1])
    return mine


def _wait(condition: object, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


class Serve:
    def __init__(self, home: Path, port: int) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("QAI_")} | {"QAI_HOME": str(home)}
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def start(self, workers: int = 2) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "sdk.cli", "serve", "kms", "--workers", str(workers),
                                 "--port", str(self.port)], env=self.env, cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def ready(self, proc: subprocess.Popen[str]) -> list[int]:
        def up() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False
        _wait(up, "qai serve did not start")
        _wait(lambda: len(_server_processes(proc.pid)) == 2, "two server processes")
        return _server_processes(proc.pid)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    yield Serve(tmp_path / ".qai", free_port())


def _connect(url: str, n: int) -> list[httpx.Client]:
    clients = [httpx.Client(base_url=url, timeout=30) for _ in range(n)]
    for c in clients:  # each keeps its one connection open
        assert c.get("/healthz").status_code == 200
    return clients


def test_connections_spread_over_processes_that_are_restarted_and_stopped(serve: Serve) -> None:
    proc = serve.start()
    try:
        pids = serve.ready(proc)
        listening = _tcp_sockets(serve.port, "0A")
        own = {pid: _owned(pid, listening) for pid in pids}
        assert [len(s) for s in own.values()] == [1, 1] and len(set().union(*own.values())) == 2, own

        clients = _connect(serve.url, CONNECTIONS)
        try:
            established = _tcp_sockets(serve.port, "01")
            per_process = Counter({pid: len(_owned(pid, established)) for pid in pids})
            assert sum(per_process.values()) == CONNECTIONS and min(per_process.values()) >= 1, per_process
        finally:
            for c in clients:
                c.close()

        # a second server on the same port would silently share its connections: refused
        second = serve.start()
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2 and "serve.port_in_use" in err, err

        os.kill(pids[0], signal.SIGKILL)  # a process dies: another takes its socket, nothing is refused
        _wait(lambda: len(_server_processes(proc.pid)) == 2 and pids[0] not in _server_processes(proc.pid),
              "the supervisor did not start another process")
        clients = _connect(serve.url, CONNECTIONS)  # some hash to the new process's socket
        for c in clients:
            c.close()

        # SIGHUP: replaced one at a time, each new process serving before the old one stops
        before = _server_processes(proc.pid)
        proc.send_signal(signal.SIGHUP)
        answered, dropped = 0, 0
        deadline = time.monotonic() + 240
        while not all(gone(pid) for pid in before):
            assert time.monotonic() < deadline, "the rolling restart did not finish"
            try:  # a fresh connection each time: some hash to the slot being replaced
                assert httpx.get(f"{serve.url}/healthz", timeout=30).status_code == 200
                answered += 1
            except httpx.TransportError:
                # uvicorn's own shutdown race: a connection the old process accepted just before
                # its SIGTERM is closed unanswered. Once, at most; never a refused connection.
                dropped += 1
        assert answered > 0 and dropped <= 1
        _wait(lambda: len(_server_processes(proc.pid)) == 2, "two server processes after the restart")
        assert proc.poll() is None and not set(_server_processes(proc.pid)) & set(before)
        clients = _connect(serve.url, CONNECTIONS)
        for c in clients:
            c.close()

        pids = _server_processes(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert all(gone(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_processes_do_not_outlive_a_kill_9_of_their_supervisor(serve: Serve) -> None:
    proc = serve.start()
    try:
        pids = serve.ready(proc)
        proc.kill()  # no handler runs: the processes must notice on their own
        proc.wait()
        _wait(lambda: all(gone(pid) for pid in pids), "a server process outlived its supervisor", 60)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{serve.url}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_process_that_keeps_exiting_is_restarted_ever_later_then_stops_the_server() -> None:
    sup = _Supervisor(Config("orchestrator.main:app", host="127.0.0.1", port=free_port()), [])
    slot = _Slot(sock=None)

    def exits(code: int, ran_for: float) -> None:
        slot.proc = multiprocessing.get_context("fork").Process(target=os._exit, args=(code,))
        slot.proc.start()
        slot.proc.join()
        slot.started = time.monotonic() - ran_for
        sup.exited(slot)
        assert slot.proc is None and slot.sock is None

    exits(1, 3600)  # after an hour: started again at once
    assert slot.due <= time.monotonic() and not sup.stopping
    for k in range(1, MAX_QUICK_EXITS):  # within seconds of starting: 1, 2, 4, 8 s later
        exits(1, 0.5)
        assert 2 ** (k - 1) - 1 < slot.due - time.monotonic() <= 2 ** (k - 1) and not sup.stopping
    exits(1, 0.5)
    assert sup.stopping and sup.failed  # the fifth in a row: restarting would only hide the fault

    sup = _Supervisor(sup.config, [])
    exits(STARTUP_FAILURE, 3600)  # uvicorn could not start the app: the same every time
    assert sup.stopping and sup.failed
