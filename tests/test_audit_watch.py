"""``qai audit watch``: the monitor follows a growing log and alerts on a fork or a rollback."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from orchestrator.app import create_app
from orchestrator.auth import Role, issue_token
from orchestrator.db import Database
from orchestrator.services import Services
from orchestrator.settings import Settings
from sdk.cli import app as qai
from sdk.errors import QaiError
from tests.conftest import LiveServer
from tests.ledger_helpers import ledger_services, signed_envelopes, write_keys


@pytest.fixture
def svc(settings: Settings, sqlite_db: Database) -> Iterator[Services]:
    yield from ledger_services(settings, sqlite_db)


class Webhook:
    def __init__(self) -> None:
        received: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.received = received
        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _append(svc: Services, n: int, start: int) -> None:
    for env in signed_envelopes(svc.kms, "org-a.manifests", "org-a", n, start=start):
        svc.ledger.append_object("run-manifest", "org-a", env)


def _rewrite(svc: Services, db_file: Path, keep: int) -> None:
    """A superuser rolls the DB back to ``keep`` entries behind the ledger's back."""
    conn = sqlite3.connect(db_file)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("DELETE FROM ledger_entries WHERE idx >= ?", (keep,))
    conn.execute("DELETE FROM ledger_nodes WHERE ((node_id & 281474976710655) + 1) << (node_id >> 48) > ?", (keep,))
    conn.execute("DELETE FROM ledger_checkpoints WHERE size > ?", (keep,))
    conn.commit()
    conn.close()
    svc.ledger._checkpointed = -1
    svc.ledger._frontier = None


def test_watch_follows_growth_and_alerts_on_fork_and_rollback(svc: Services, tmp_path: Path) -> None:
    token = issue_token(svc.db, role=Role.AUDITOR, tenant=None).token
    hook = Webhook()
    _append(svc, 10, 0)
    keys = write_keys(tmp_path / "keys.json", {"k": svc.ledger.checkpoint_key()})
    state = tmp_path / "watch.json"
    db_file = Path(svc.db.url.removeprefix("sqlite:///"))
    with LiveServer(create_app(svc)) as srv:
        def watch() -> tuple[int, dict[str, Any]]:
            r = CliRunner().invoke(qai, ["audit", "watch", "--once", "--json", "--server", srv.url, "--token", token,
                                         "--keys", str(keys), "--state", str(state), "--webhook", hook.url])
            return r.exit_code, json.loads(r.stdout)

        assert watch() == (0, {"ok": True, "tree_size": 10})
        _append(svc, 10, 10)
        assert watch() == (0, {"ok": True, "tree_size": 20})
        seen = state.read_text()

        _rewrite(svc, db_file, keep=15)  # fork: same length and more, different history
        _append(svc, 7, 500)
        try:
            svc.ledger.checkpoint()
        except QaiError as exc:
            assert exc.code == "ledger.fork_detected"
        forked_20 = next(r.note for r in svc.ledger.checkpoints() if r.size == 20)
        # the write-once published history kept the original checkpoint of size 20
        assert svc.objects.get(f"ledger/checkpoints/{20:020d}").decode() != forked_20
        code, out = watch()
        assert code == 1 and out["alert"].startswith("fork")
        assert hook.received[-1]["alert"] == out["alert"] and hook.received[-1]["server"] == srv.url
        assert state.read_text() == seen  # an alert never moves the trusted state

        _rewrite(svc, db_file, keep=12)  # rollback: the newest checkpoint left is size 10
        code, out = watch()
        assert code == 1 and out["alert"].startswith("rollback")
        assert len(hook.received) == 2
    hook.server.shutdown()
