"""``qai serve`` in a subprocess for the HTTP benchmarks: a free port, ready before use, stopped after."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def qai_serve(*serve_args: str, env: dict[str, str], ready_seconds: float = 60.0) -> Iterator[str]:
    """Yield the base URL of ``qai serve <serve_args>``; fail if it is not ready in time."""
    with socket.socket() as probe:  # a free port: a bench still running elsewhere must not answer for us
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "sdk.cli", "serve", *serve_args, "--port", str(port)],
                              env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_seconds
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"qai serve did not become ready at {url}")
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
