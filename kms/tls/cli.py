"""``qai tls …``: the demo CA, the dual-stack TLS server and its clients, recorded handshakes."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from kms.tls.ca import CaFiles, CertAlg, Issued, ca_files, check_alg, ensure_ca, issue_client
from kms.tls.groups import Mode, Prefer, openssl_version
from kms.tls.models import HandshakeRecord, TlsHandshakeRow
from kms.tls.server import DEFAULT_PORT, ClientAuth
from orchestrator.cli import cli_errors, services
from sdk.errors import QaiError
from sdk.output import JsonFlag, console, print_json, table
from sdk.signing import KeyDocument

tls_app = typer.Typer(help="Dual-stack TLS demo: hybrid ML-KEM handshakes with classical fallback.",
                      no_args_is_help=True)
ca_app = typer.Typer(help="The demo certificate authority (ECDSA P-256; ML-DSA-65 on request).",
                     no_args_is_help=True)
tls_app.add_typer(ca_app, name="ca")

DirOpt = Annotated[Path | None, typer.Option("--dir", help="Certificates and keys (default: $QAI_HOME/tls).")]
HostOpt = Annotated[str, typer.Option(help="Address to listen on / connect to.")]
PortOpt = Annotated[int, typer.Option(help="TCP port.")]
CertAlgsOpt = Annotated[list[str] | None, typer.Option(
    "--cert-alg", help="Certificate algorithm (repeatable): ECDSA-P256 (default) and/or ML-DSA-65.")]


def _dir(directory: Path | None) -> Path:
    if directory is not None:
        return directory
    from orchestrator.settings import get_settings

    return get_settings().home / "tls"


def _algs(values: list[str] | None) -> list[CertAlg]:
    """Typer takes no list of Literal: the names are checked here (tls.bad_cert_alg)."""
    return list(dict.fromkeys(check_alg(v) for v in values or ["ECDSA-P256"]))


def _issued_rows(issued: list[Issued]) -> None:
    table("demo CA", ["kind", "algorithm", "subject", "certificate", "sha256", "expires", "new"],
          [(i.kind, i.alg, i.subject, i.cert, i.sha256[:16] + "…", i.not_after.date(), "yes" if i.created else "kept")
           for i in issued])


@ca_app.command("init")
def ca_init(
    directory: DirOpt = None,
    cert_alg: CertAlgsOpt = None,
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="Server certificate names (repeatable; default localhost, 127.0.0.1, ::1).")] = None,
    client: Annotated[list[str] | None, typer.Option(
        "--client", help="Also issue a client certificate CN=NAME for mutual TLS (repeatable).")] = None,
    force: Annotated[bool, typer.Option(help="Issue everything again, even what is still valid.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Create the demo CA and the server certificate (kept when they exist and are valid)."""
    root = _dir(directory)
    with cli_errors(as_json):
        issued: list[Issued] = []
        for alg in _algs(cert_alg):
            issued += ensure_ca(root, alg, hosts=tuple(host) if host else ("localhost", "127.0.0.1", "::1"),
                                force=force)
            issued += [issue_client(root, name, alg) for name in client or []]
    print_json({"dir": str(root), "issued": issued}) if as_json else _issued_rows(issued)


@ca_app.command("client")
def ca_client(
    name: Annotated[str, typer.Argument(help="The client's common name, e.g. alice.")],
    directory: DirOpt = None,
    cert_alg: Annotated[CertAlg, typer.Option("--cert-alg", help="Which CA issues it.")] = "ECDSA-P256",
    as_json: JsonFlag = False,
) -> None:
    """Issue a client certificate for mutual TLS (``qai tls connect --client-cert NAME``)."""
    with cli_errors(as_json):
        issued = issue_client(_dir(directory), name, cert_alg)
    print_json(issued) if as_json else _issued_rows([issued])


def _print_handshake(rec: HandshakeRecord, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rec.to_json(), sort_keys=True), flush=True)
        return
    colour = {"accepted": "green", "fallback": "yellow", "refused": "red", "failed": "red"}[rec.outcome]
    console.print(f"{rec.at:%H:%M:%S} [{colour}]{rec.outcome:8}[/] group={rec.group or '-'} ({rec.classification}) "
                  f"cipher={rec.cipher or '-'} protocol={rec.protocol or '-'} "
                  f"client={rec.client_identity or 'anonymous'} peer={rec.peer}"
                  + (f" error={rec.error_code}" if rec.error_code else ""), highlight=False)


@tls_app.command("serve")
def serve_cmd(
    mode: Annotated[Mode, typer.Option(help="dual, pqc-required or classical-only.")] = "dual",
    host: HostOpt = "127.0.0.1",
    port: PortOpt = DEFAULT_PORT,
    directory: DirOpt = None,
    cert_alg: CertAlgsOpt = None,
    client_auth: Annotated[ClientAuth, typer.Option(
        help="none, optional (verify and record a client certificate when sent) or required.")] = "optional",
    metrics_port: Annotated[int | None, typer.Option(
        help="Also serve Prometheus metrics (qai_tls_handshakes_total) on this port.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Serve TLS 1.3 until interrupted; one line (or JSON object) per connection."""
    from kms.tls.server import serve

    root = _dir(directory)
    with cli_errors(as_json):
        algs = _algs(cert_alg)
        svc = services()
        server = serve(mode, host, port, db=svc.db, kms=svc.kms, tls_dir=root, cert_algs=algs,
                       client_auth=client_auth, on_handshake=lambda rec: _print_handshake(rec, as_json))
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=host)
    info = {"listening": f"{host}:{server.port}", "mode": mode, "openssl": openssl_version(),
            "cert_algs": list(server.config.cert_algs), "hello_key": str(root / "hello-key.json"),
            "metrics_port": metrics_port}
    if as_json:
        print(json.dumps(info, sort_keys=True), flush=True)
    else:
        console.print(f"listening on {info['listening']} mode={mode} ({info['openssl']}); "
                      f"hello key {info['hello_key']}; Ctrl-C stops", highlight=False)
    stopped = threading.Event()

    def _stop(_sig: int, _frame: FrameType | None) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stopped.wait()
    server.stop()


def _load_keys(path: Path) -> dict[str, KeyDocument]:
    try:
        docs = json.loads(path.read_text(encoding="utf-8"))
        docs = docs if isinstance(docs, list) else [docs]
        return {d["name"]: KeyDocument.model_validate(d) for d in docs}
    except OSError as exc:
        raise QaiError("cli.unreadable", f"cannot read {path}: {exc.strerror}; start `qai tls serve` once, or pass "
                       "--key-doc (qai keys export-public qai.tls-hello)") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise QaiError("cli.bad_key_file", f"{path} does not hold key documents") from exc


@tls_app.command("connect")
def connect_cmd(
    prefer: Annotated[Prefer, typer.Option(help="pqc (hybrid first, classical fallback) or classical.")] = "pqc",
    host: HostOpt = "127.0.0.1",
    port: PortOpt = DEFAULT_PORT,
    directory: DirOpt = None,
    ca: Annotated[list[Path] | None, typer.Option(
        "--ca", help="Trusted CA certificate (repeatable; default: every demo CA under --dir).")] = None,
    key_doc: Annotated[Path | None, typer.Option(
        help="Trusted public key document of the hello key (default: DIR/hello-key.json).")] = None,
    client_cert: Annotated[str | None, typer.Option(
        help="Mutual TLS with the demo client certificate NAME (qai tls ca client NAME).")] = None,
    client_cert_alg: Annotated[CertAlg, typer.Option(help="The algorithm of that certificate.")] = "ECDSA-P256",
    server_name: Annotated[str | None, typer.Option(help="Name to verify the certificate for (default: host).")] = None,
    require_pqc: Annotated[bool, typer.Option(
        help="Offer hybrid groups only: fail rather than fall back to a classical group.")] = False,
    stdlib: Annotated[bool, typer.Option(
        help="Use Python's ssl module (system OpenSSL) instead of pyOpenSSL: a classical client.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Connect, print what was negotiated and verify the server's signed hello."""
    from kms.tls.client import connect, connect_stdlib

    root = _dir(directory)
    with cli_errors(as_json):
        keys = _load_keys(key_doc or root / "hello-key.json")
        if stdlib:
            anchors = ca or ca_files(root, ["ECDSA-P256"])  # OpenSSL 3.0 cannot read the ML-DSA CA
            result = connect_stdlib(host, port, keys=keys, ca_files=anchors, server_name=server_name)
        else:
            files = CaFiles(root, client_cert_alg)
            cert = (files.client_cert(client_cert), files.client_key(client_cert)) if client_cert else None
            result = connect(host, port, prefer, keys=keys, ca_files=ca or ca_files(root), server_name=server_name,
                             client_cert=cert, require_pqc=require_pqc)
    if as_json:
        print_json(result.to_json())
        return
    table(f"TLS to {host}:{port}", ["", ""], [
        ("client", result.client), ("group", f"{result.group} ({result.classification})"),
        ("cipher", result.cipher), ("protocol", result.protocol),
        ("server certificate", f"{result.server_cert_alg} sha256:{result.server_cert_sha256[:16]}…"),
        ("client identity", result.client_identity or "anonymous"), ("server mode", result.hello["mode"]),
        ("hello signed by", f"{result.signed_by} ({result.suite})")])
    console.print(f"[green]{result.summary()}[/]", highlight=False)


def _row_json(r: TlsHandshakeRow) -> dict[str, object]:
    return {"id": r.id, "at": r.at, "mode": r.mode, "group": r.negotiated_group, "classification": r.classification,
            "outcome": r.outcome, "cipher": r.cipher, "protocol": r.protocol, "client_identity": r.client_identity,
            "peer": r.peer, "server_cert_sha256": r.server_cert_sha256, "hello_sha256": r.hello_sha256,
            "error_code": r.error_code, "error_message": r.error_message}


@tls_app.command("handshakes")
def handshakes_cmd(
    limit: Annotated[int, typer.Option(help="How many of the latest connections.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """Recorded connections, newest first, and the counts per mode and outcome."""
    from kms.tls.models import outcome_counts, recent_handshakes

    with cli_errors(as_json):
        db = services().db
        rows = recent_handshakes(db, limit)
        counts = outcome_counts(db)
    if as_json:
        print_json({"handshakes": [_row_json(r) for r in rows],
                    "counts": [{"mode": m, "classification": c, "outcome": o, "count": n}
                               for (m, c, o), n in sorted(counts.items())]})
        return
    table("TLS handshakes", ["at", "mode", "group", "class", "outcome", "client", "peer", "error"],
          [(r.at.isoformat(timespec="seconds"), r.mode, r.negotiated_group, r.classification, r.outcome,
            r.client_identity, r.peer, r.error_code) for r in rows])
    table("by mode and outcome", ["mode", "class", "outcome", "count"],
          [(m, c, o, n) for (m, c, o), n in sorted(counts.items())])


@tls_app.command("demo")
def demo_cmd(directory: DirOpt = None, as_json: JsonFlag = False) -> None:
    """One hybrid (pyOpenSSL) and one fallback (Python's ssl) handshake against a dual server."""
    from kms.tls.demo import tls_demo_results

    with cli_errors(as_json):
        svc = services()
        results = tls_demo_results(svc.db, svc.kms, _dir(directory))
    if as_json:
        print_json([r.to_json() for r in results])
        return
    for r in results:
        console.print(f"{r.summary()} - client: {r.client}", highlight=False, markup=False)


if __name__ == "__main__":  # python -m kms.tls.cli …, until `qai tls` is registered
    tls_app()

