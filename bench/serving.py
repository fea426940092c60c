"""``qai serve`` and a moto S3 server in subprocesses for the benchmarks: ready before use, stopped after."""

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


# moto, with each request held ``argv[2]`` ms before it is served: the round trip to a real S3
# region (tens of ms to the first byte), which loopback does not have. Held on the server's own
# request thread, so requests in flight overlap as they would over a network.
_MOTO = """
import sys, time
import moto.moto_server.threaded_moto_server as m
delay = float(sys.argv[2]) / 1000
class Slow(m.DomainDispatcherApplication):
    def __call__(self, environ, start_response):
        time.sleep(delay)
        return super().__call__(environ, start_response)
m.DomainDispatcherApplication = Slow  # the name ThreadedMotoServer builds its app from
server = m.ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
time.sleep(86400)
"""


@contextmanager
def moto_s3(latency_ms: float = 0.0) -> Iterator[str]:
    """Yield the endpoint URL of a moto S3 server (a real HTTP S3 API) in a process of its own, so
    that its CPU does not share the measured process's GIL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    moto = subprocess.Popen([sys.executable, "-c", _MOTO, str(port), str(latency_ms)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        if moto.stdout is None or moto.stdout.readline().strip() != "ready":
            raise SystemExit("the moto S3 server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        moto.terminate()
        moto.wait(timeout=30)


def create_bucket(endpoint: str, bucket: str) -> None:
    """A bucket with Object Lock, as production creates it (write-once objects get retention)."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
