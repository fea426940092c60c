"""The demo protocol's framing, shared by server and clients: newline-terminated lines.

    client → server   <nonce>\\n
    server → client   <DSSE envelope, canonical JSON>\\n        or   ERROR <code>: <message>\\n

pyOpenSSL works on a *blocking* socket only (a Python socket timeout makes the descriptor
non-blocking, and OpenSSL then reports "want read" instead of waiting), so timeouts are the
kernel's ``SO_RCVTIMEO`` / ``SO_SNDTIMEO``: a stalled peer cannot hold a server thread forever.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
from collections.abc import Callable

from OpenSSL import SSL

from sdk.errors import QaiError

MAX_LINE = 64 * 1024  # a hello with an ML-DSA-65 signature is about 6 KiB
_ERROR_LINE = re.compile(r"ERROR ([a-z0-9_.]+): (.*)")


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    sock.settimeout(None)  # blocking descriptor; the kernel enforces the timeout
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def ssl_reason(exc: BaseException) -> str:
    """A short reason from an OpenSSL error stack (``no suitable key share``) or a socket error."""
    if isinstance(exc, SSL.WantReadError | SSL.WantWriteError):
        return "timed out"
    if isinstance(exc, SSL.SysCallError):
        code, text = (*exc.args, None, None)[:2]
        return "connection closed by the peer" if code == -1 else f"socket error: {text}"
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        return "; ".join(str(e[2]) for e in exc.args[0] if isinstance(e, tuple) and len(e) == 3)
    return str(exc) or type(exc).__name__


def pyopenssl_recv(conn: SSL.Connection) -> Callable[[int], bytes]:
    """``recv`` for :func:`read_line`: b"" at the end of the stream, a QaiError on a timeout."""

    def recv(n: int) -> bytes:
        try:
            return conn.recv(n)
        except SSL.ZeroReturnError:  # close_notify
            return b""
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] == -1:  # the peer closed without close_notify
                return b""
            raise QaiError("tls.connection_lost", ssl_reason(exc), status=502) from exc
        except SSL.WantReadError as exc:
            raise QaiError("tls.timeout", "the peer sent nothing in time", status=504) from exc
        except SSL.Error as exc:
            raise QaiError("tls.connection_lost", ssl_reason(exc), status=502) from exc

    return recv


def read_line(recv: Callable[[int], bytes], *, limit: int = MAX_LINE) -> bytes:
    """One line, without its newline. Each side sends one line per turn and then waits, so no
    bytes after the newline can belong to a later message."""
    buf = bytearray()
    while b"\n" not in buf:
        if len(buf) > limit:
            raise QaiError("tls.line_too_long", f"a protocol line is longer than {limit} bytes", status=400)
        chunk = recv(4096)
        if not chunk:
            raise QaiError("tls.connection_lost", "the peer closed the connection before a full line", status=502)
        buf += chunk
    return bytes(buf.split(b"\n", 1)[0]).rstrip(b"\r")


def error_line(code: str, message: str) -> bytes:
    flat = " ".join(message.split())  # one line whatever the message holds: the framing is by newline
    return f"ERROR {code}: {flat}\n".encode()


def parse_error_line(line: bytes) -> QaiError | None:
    """The error a server sent instead of a hello, or None for any other line."""
    m = _ERROR_LINE.fullmatch(line.decode("utf-8", "replace"))
    if m is None:
        return None
    code, message = m.group(1), m.group(2)
    return QaiError(code, message, status=403 if code == "tls.pqc_required" else 502)


def close_gracefully(conn: SSL.Connection, sock: socket.socket, *, drain_seconds: float = 2.0) -> None:
    """close_notify, then half-close and drain before closing. Closing a socket with unread input
    makes the kernel send RST, which can discard the line just sent before the peer reads it."""
    with contextlib.suppress(SSL.Error, OSError):  # the peer may be gone already
        conn.shutdown()
    try:
        sock.shutdown(socket.SHUT_WR)
        set_timeouts(sock, drain_seconds)
        drained = 0
        while drained < MAX_LINE and (chunk := sock.recv(4096)):  # bounded: a peer cannot keep us here
            drained += len(chunk)
    except OSError:
        pass  # a timeout or reset while draining: the connection is over either way
    finally:
        sock.close()
