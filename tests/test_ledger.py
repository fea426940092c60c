"""The run ledger on SQLite and PostgreSQL: appends, proofs, checkpoints, receipts, REST and audit."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from orchestrator.app import create_app
from orchestrator.auth import Principal, Role, issue_token
from orchestrator.db import Database
from orchestrator.ledger import HISTORY_PREFIX, LATEST_KEY
from orchestrator.services import Services
from orchestrator.settings import Settings
from sdk import merkle
from sdk.audit import BundleSource, ServerSource, audit, export_bundle
from sdk.checkpoint import Checkpoint, verify_checkpoint
from sdk.client import Client
from sdk.errors import QaiError, VerificationError
from sdk.ledger import IndexedEntry, LedgerEntry, verify_receipt
from tests.conftest import LiveServer
from tests.ledger_helpers import ledger_services, signed_envelopes, trusted_keys


@pytest.fixture
def svc(settings: Settings, db: Database) -> Iterator[Services]:
    yield from ledger_services(settings, db)


def _fill(svc: Services, n: int, tenant: str = "org-a") -> list[int]:
    envs = signed_envelopes(svc.kms, f"{tenant}.manifests", tenant, n)
    return [svc.ledger.append_object("run-manifest", tenant, e).index for e in envs]


def test_appends_are_gapless_and_proofs_verify_against_signed_checkpoints(svc: Services) -> None:
    assert _fill(svc, 37) == list(range(37))
    svc.ledger.checkpoint()  # 37 is not a multiple of 10: cover the tail explicitly
    key = svc.ledger.checkpoint_key()
    notes = [r.note for r in svc.ledger.checkpoints()]
    sizes = [verify_checkpoint(n, key).checkpoint.size for n in notes]
    assert sizes == [10, 20, 30, 37]  # every checkpoint_every entries, plus the forced one
    leaves = [bytes.fromhex(e.leaf) for e in svc.ledger.entries(0, 37)]
    for note in notes:
        cp = verify_checkpoint(note, key, origin="qai.local/ledger").checkpoint
        assert cp.root == merkle.root_from_leaves(leaves[:cp.size])
        for i in range(cp.size):
            merkle.verify_inclusion(i, cp.size, leaves[i], svc.ledger.inclusion_proof(i, cp.size), cp.root)
    for a in range(0, 38):
        for b in (a, 20, 37):
            if a <= b:
                merkle.verify_consistency(a, b, merkle.root_from_leaves(leaves[:a]),
                                          merkle.root_from_leaves(leaves[:b]), svc.ledger.consistency_proof(a, b))


def test_entry_bytes_and_time_round_trip_exactly(svc: Services) -> None:
    _fill(svc, 3)
    for e in svc.ledger.entries(0, 3):
        assert e.entry().leaf_hash().hex() == e.leaf
        assert svc.ledger.objects.get(e.path).startswith(b'{"payload"')


@pytest.mark.parametrize("table", ["ledger_entries", "ledger_nodes", "ledger_checkpoints"])
def test_ledger_tables_refuse_update_and_delete(svc: Services, table: str) -> None:
    _fill(svc, 10)
    for stmt in (f"UPDATE {table} SET {'idx' if table == 'ledger_entries' else 'size' if table == 'ledger_checkpoints' else 'node_id'} = 999999",  # noqa: E501
                 f"DELETE FROM {table}"):
        with pytest.raises(DBAPIError) as err, svc.db.write() as s:
            s.execute(text(stmt))
        assert "append-only" in str(err.value)
    assert svc.ledger.size() == 10


def test_checkpoints_are_published_to_the_object_store(svc: Services) -> None:
    _fill(svc, 25)
    key = svc.ledger.checkpoint_key()
    history = svc.objects.list(HISTORY_PREFIX)
    assert [verify_checkpoint(svc.objects.get(k).decode(), key).checkpoint.size for k in history] == [10, 20]
    assert svc.objects.get(LATEST_KEY).decode() == svc.ledger.latest_checkpoint()


def test_checkpoint_signature_covers_every_field(svc: Services) -> None:
    _fill(svc, 10)
    key = svc.ledger.checkpoint_key()
    note = svc.ledger.latest_checkpoint()
    assert note is not None
    body, _, sigs = note.partition("\n\n")
    assert sigs.count("\u2014 qai.ledger-checkpoint@1/") == 2  # one line per hybrid part
    lines = body.split("\n")
    cp = Checkpoint.parse_body((body + "\n").encode())
    forged = [
        note.replace(f"\n{cp.size}\n", f"\n{cp.size + 1}\n", 1),
        note.replace(lines[2], base64.b64encode(b"\x00" * 32).decode(), 1),
        note.replace(lines[0], "evil.example/ledger", 1),
        note.replace(lines[3], "timestamp 2020-01-01T00:00:00.000000Z", 1),
    ]
    for bad in forged:
        with pytest.raises(QaiError):
            verify_checkpoint(bad, key)
    # dropping the in-HSM classical signature line is a downgrade, not a pass
    ml_dsa_only = "\n".join(line for line in note.split("\n") if "/ECDSA-P256" not in line)
    with pytest.raises(VerificationError) as err:
        verify_checkpoint(ml_dsa_only, key)
    assert err.value.code == "checkpoint.bad_signature"


def test_receipts(svc: Services) -> None:
    _fill(svc, 12)
    key = svc.ledger.checkpoint_key()
    pending = svc.ledger.receipt(11)
    assert not pending.complete
    with pytest.raises(VerificationError) as err:
        verify_receipt(pending, key)
    assert err.value.code == "receipt.pending"
    done = svc.ledger.receipt(3)
    assert verify_receipt(done, key).checkpoint.size == 10
    other = svc.ledger.entry(4).entry()
    with pytest.raises(VerificationError):
        verify_receipt(done.model_copy(update={"entry": other}), key)
    with pytest.raises(VerificationError):
        verify_receipt(done.model_copy(update={"index": 4}), key)


def test_receipts_of_fresh_appends_read_a_checkpoint_only_when_one_covers_them(svc: Services) -> None:
    from sqlalchemy import event

    statements: list[str] = []
    event.listen(svc.db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    # 12 appends: the writer signs the checkpoint at 10 inline, after the commit of the 10th
    fresh = [svc.ledger.append_object("run-manifest", "org-a", e)
             for e in signed_envelopes(svc.kms, "org-a.manifests", "org-a", 12)]
    key = svc.ledger.checkpoint_key()
    statements.clear()
    late = svc.ledger.receipts(fresh[10:], appended=True)  # no checkpoint this process knows covers them
    assert statements == [] and not any(r.complete for r in late)
    covered = svc.ledger.receipts(fresh[:10], appended=True)  # the inline checkpoint does
    assert statements and all(verify_receipt(r, key).checkpoint.size == 10 for r in covered)
    # the same as a reader's receipt, which always reads the latest checkpoint
    assert covered == [svc.ledger.receipt(e.index) for e in fresh[:10]]
    assert late == [svc.ledger.receipt(e.index) for e in fresh[10:]]


def test_bad_sizes_and_indices_have_codes(svc: Services) -> None:
    _fill(svc, 5)
    cases = [
        (lambda: svc.ledger.inclusion_proof(5, 5), "ledger.bad_index"),
        (lambda: svc.ledger.inclusion_proof(0, 6), "ledger.bad_tree_size"),
        (lambda: svc.ledger.consistency_proof(4, 3), "ledger.bad_tree_size"),
        (lambda: svc.ledger.entry(99), "ledger.entry_not_found"),
        (lambda: svc.ledger.append_object("nonsense", "org-a", b"x"), "ledger.bad_entry_type"),
    ]
    for call, code in cases:
        with pytest.raises(QaiError) as err:
            call()
        assert err.value.code == code
    assert svc.ledger.size() == 5


def test_rest_append_receipt_proofs_and_audit(svc: Services, tmp_path: Path) -> None:
    auditor = issue_token(svc.db, role=Role.AUDITOR, tenant=None).token
    submitter = issue_token(svc.db, role=Role.SUBMITTER, tenant="org-a").token
    envs = signed_envelopes(svc.kms, "org-a.manifests", "org-a", 10)
    with LiveServer(create_app(svc)) as srv, Client(srv.url, submitter) as c, Client(srv.url, auditor) as a:
        receipts = [c.ledger_append("run-manifest", "org-a", e) for e in envs]
        assert [r.index for r in receipts] == list(range(10))
        assert receipts[-1].complete  # the 10th append triggered a checkpoint that covers it
        key = a.ledger_key()
        verify_receipt(receipts[-1], key)
        verify_receipt(a.ledger_receipt(0), key)
        incl = a.ledger_inclusion(10, leaf_hash=receipts[4].leaf_hash)
        assert incl["index"] == 4
        # bad input: nothing is ledgered
        tampered = json.loads(envs[0])
        tampered["payload"] = base64.b64encode(b'{"job": 666}').decode()
        bad_cases = [
            (lambda: c.ledger_append("run-manifest", "org-a", json.dumps(tampered).encode()), "signature.invalid"),
            (lambda: c.ledger_append("run-manifest", "org-a", b"not json"), "dsse.malformed"),
            (lambda: c.ledger_append("run-manifest", "org-b", envs[0]), "auth.forbidden"),
            (lambda: c.ledger_append("no-such-type", "org-a", envs[0]), "request.invalid"),
            (lambda: c.ledger_entries(0, 5), "auth.forbidden"),
            (lambda: a.ledger_consistency(5, 4), "ledger.bad_tree_size"),
            (lambda: a.ledger_inclusion(11, index=0), "ledger.bad_tree_size"),
        ]
        for call, code in bad_cases:
            with pytest.raises(QaiError) as err:
                call()
            assert err.value.code == code
        other = issue_token(svc.db, role=Role.SUBMITTER, tenant="org-b").token
        with Client(srv.url, other) as b, pytest.raises(QaiError) as err:
            b.ledger_append("run-manifest", "org-b", envs[0])  # org-a's key, ledgered for org-b
        assert err.value.code == "ledger.wrong_tenant"
        assert svc.ledger.size() == 10

        server_report = audit(ServerSource(a), trusted_keys=trusted_keys(svc), workers=1)
        assert server_report.ok, server_report.failures
        assert server_report.entries == 10 and server_report.signatures_verified == 10
        assert export_bundle(ServerSource(a), tmp_path / "bundle") == 10
    report = audit(BundleSource(tmp_path / "bundle"), trusted_keys=trusted_keys(svc), workers=2)
    assert report.ok and report.checkpoints == 1 and report.uncovered == 0
    # a garbled bundle is a finding with the entry's index, never a crash of the auditor
    lines = (tmp_path / "bundle" / "entries.jsonl").read_text().splitlines()
    for garbage in ("{", '{"index": 3}', lines[3].replace('"object":"', '"object":"%%')):
        (tmp_path / "bundle" / "entries.jsonl").write_text("\n".join([*lines[:3], garbage, *lines[4:]]) + "\n")
        bad = audit(BundleSource(tmp_path / "bundle"), trusted_keys=trusted_keys(svc), workers=1)
        assert not bad.ok and bad.first_failure is not None
        assert (bad.first_failure.code, bad.first_failure.index) == ("audit.unreadable_entry", 3)


def test_audit_covers_what_checkpoints_sign_and_nothing_less(svc: Services, tmp_path: Path) -> None:
    _fill(svc, 13)
    auditor = issue_token(svc.db, role=Role.AUDITOR, tenant=None).token
    keys = trusted_keys(svc)
    with LiveServer(create_app(svc)) as srv, Client(srv.url, auditor) as a:
        # a live server is audited up to its newest checkpoint; newer entries are reported
        report = audit(ServerSource(a), trusted_keys=keys, origin="qai.local/ledger", workers=1)
        assert report.ok and report.entries == 10
        assert any("3 entries newer" in w for w in report.warnings)
        export_bundle(ServerSource(a), tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert meta["tree_size"] == 10  # the export stops at the newest checkpoint
    # a bundle whose checkpoints were stripped proves nothing about its entries
    meta["checkpoints"] = []
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(meta))
    stripped = audit(BundleSource(tmp_path / "b"), trusted_keys=keys, workers=1)
    assert not stripped.ok and stripped.failures[0].code == "audit.uncovered"
    assert audit(BundleSource(tmp_path / "b"), trusted_keys=keys, workers=1, allow_uncovered=True).ok


def test_checkpoint_key_must_belong_to_the_platform(svc: Services, admin: Principal) -> None:
    """A tenant that grabs the checkpoint key's name does not become the log's signer."""
    svc.kms.create_key("qai.ledger-checkpoint", tenant="org-a", principal=admin)
    _fill(svc, 3)
    with pytest.raises(QaiError) as err:
        svc.ledger.checkpoint()
    assert err.value.code == "ledger.bad_checkpoint_key"
    assert svc.ledger.latest_checkpoint() is None


def test_checkpoints_survive_a_rotation_of_their_key(svc: Services, admin: Principal) -> None:
    _fill(svc, 10)
    key = svc.ledger.checkpoint_key()
    svc.kms.rotate(key.name, principal=admin)
    _fill(svc, 10)
    notes = [r.note for r in svc.ledger.checkpoints()]
    rotated = svc.kms.public_key(key.name)
    assert [verify_checkpoint(n, rotated).checkpoint.size for n in notes] == [10, 20]
    assert "qai.ledger-checkpoint@2/ML-DSA-65" in notes[-1]


def test_malformed_notes_and_receipts_are_errors_not_crashes(svc: Services) -> None:
    _fill(svc, 10)
    key = svc.ledger.checkpoint_key()
    note = svc.ledger.latest_checkpoint() or ""
    body = note.split("\n\n")[0] + "\n"
    for bad in (body + "\n\u2014 k AAAAA\n", body + "\n\u2014 k @@@@\n", "no note", body + "\nnot a line\n"):
        with pytest.raises(QaiError) as err:
            verify_checkpoint(bad, key)
        assert err.value.code == "checkpoint.malformed"
    # a duplicate line under our key name (added by a relay) does not veto a valid checkpoint
    ml_line = next(line for line in note.split("\n") if "/ML-DSA-65" in line)
    junk = ml_line[:-8] + "AAAAAAA="
    verify_checkpoint(note.replace(ml_line, junk + "\n" + ml_line), key)
    good = svc.ledger.receipt(2).model_dump(mode="json")
    for broken in ({**good, "inclusion_proof": ["zz"]}, {**good, "index": "x"}, {"nothing": 1}):
        with pytest.raises(VerificationError) as verr:
            verify_receipt(broken, key)
        assert verr.value.code == "receipt.malformed"
    with pytest.raises(QaiError) as err:
        Checkpoint("evil\n", 1, b"\0" * 32, datetime.now(UTC)).body()
    assert err.value.code == "checkpoint.malformed"


def test_entries_dated_after_their_checkpoint_are_flagged(svc: Services) -> None:
    from datetime import timedelta

    from sdk.audit import Failure

    _fill(svc, 9)
    env = signed_envelopes(svc.kms, "org-a.manifests", "org-a", 1, start=50)[0]
    svc.ledger.append_object("run-manifest", "org-a", env, at=datetime.now(UTC) + timedelta(hours=1))
    auditor = issue_token(svc.db, role=Role.AUDITOR, tenant=None).token
    with LiveServer(create_app(svc)) as srv, Client(srv.url, auditor) as a:
        report = audit(ServerSource(a), trusted_keys=trusted_keys(svc), workers=1)
    assert not report.ok
    assert report.first_failure == Failure("entry.time_after_checkpoint", report.first_failure.message, 9)


def test_entries_of_one_tenant_cannot_claim_another(svc: Services) -> None:
    env = signed_envelopes(svc.kms, "org-a.manifests", "org-a", 1)[0]
    e = svc.ledger.append_object("run-manifest", "org-b", env)  # the service trusts its callers
    from sdk.audit import check_entry

    failure = check_entry(e, env, trusted_keys(svc))
    assert failure is not None and failure.code == "entry.wrong_tenant"


def test_ledger_entry_model_rejects_bad_fields() -> None:
    from datetime import datetime

    from pydantic import ValidationError

    good = {"type": "dataset", "sha256": "a" * 64, "path": "p", "tenant": "t", "time": "2026-01-01T00:00:00Z"}
    LedgerEntry.model_validate(good)
    for bad in ({"sha256": "A" * 64}, {"type": "x"}, {"time": datetime(2026, 1, 1)}, {"path": ""}):
        with pytest.raises(ValidationError):
            LedgerEntry.model_validate({**good, **bad})


def test_a_failing_write_leaves_no_entry_and_no_row(svc: Services) -> None:
    """Callers' own rows go in the entry's transaction: a write that fails appends nothing."""
    from sqlalchemy import text as sql

    from orchestrator.ledger import LedgerWrite
    from sdk.ledger import sha256_hex

    with svc.db.write() as s:
        s.execute(sql("CREATE TABLE side_rows (k TEXT PRIMARY KEY, idx BIGINT)"))

    def write(k: str) -> LedgerWrite:
        data = f"object {k}".encode()
        entry = LedgerEntry(type="dataset", sha256=sha256_hex(data), path=f"d/{k}", tenant="org-a",
                            time=datetime.now(UTC))
        def before(s: Connection, first: int) -> None:
            s.execute(sql("INSERT INTO side_rows (k) VALUES (:k)"), {"k": k})

        def after(s: Connection, entries: Sequence[IndexedEntry]) -> None:
            s.execute(sql("UPDATE side_rows SET idx = :i WHERE k = :k"), {"i": entries[0].index, "k": k})

        return LedgerWrite([entry], before=before, after=after)

    results = svc.ledger.submit([write("a"), write("b"), write("a"), write("c")]).result()
    assert [getattr(r, "index", None) for r in results] == [0, 1, None, 2]
    assert isinstance(results[2], Exception)  # the duplicate key failed alone
    with svc.db.read() as s:
        assert s.execute(sql("SELECT k, idx FROM side_rows ORDER BY idx")).all() == [("a", 0), ("b", 1), ("c", 2)]
    assert svc.ledger.size() == 3
    with pytest.raises(Exception):  # noqa: B017  (the driver's integrity error, whatever its class)
        svc.ledger.append([write("b")])
    assert svc.ledger.size() == 3


def test_a_bulk_write_appends_only_the_entries_its_rows_accept(svc: Services) -> None:
    """One write for many entries: ``before`` rejects some (writing nothing for them), ``after``
    sees exactly the appended ones, in order; a write whose ``before`` raises appends nothing."""
    from sqlalchemy import text as sql

    from orchestrator.ledger import LedgerWrite
    from sdk.ledger import sha256_hex

    with svc.db.write() as s:
        s.execute(sql("CREATE TABLE bulk_rows (k TEXT PRIMARY KEY, idx BIGINT)"))
        s.execute(sql("INSERT INTO bulk_rows (k) VALUES ('taken')"))
    keys = ["a", "taken", "b", "c"]
    entries = [LedgerEntry(type="dataset", sha256=sha256_hex(k.encode()), path=f"d/{k}", tenant="org-a",
                           time=datetime.now(UTC)) for k in keys]
    seen: list[tuple[str, int]] = []
    promised: list[tuple[str, int]] = []

    def before(s: Connection, first: int) -> list[BaseException | None]:
        verdicts: list[BaseException | None] = []
        for k in keys:
            if k == "taken":
                verdicts.append(QaiError("row.exists", k))
            else:
                promised.append((k, first + len(promised)))  # the index this entry will get
                s.execute(sql("INSERT INTO bulk_rows (k) VALUES (:k)"), {"k": k})
                verdicts.append(None)
        return verdicts

    def after(s: Connection, appended: Sequence[IndexedEntry]) -> None:
        for e in appended:
            k = e.path.removeprefix("d/")
            seen.append((k, e.index))
            s.execute(sql("UPDATE bulk_rows SET idx = :i WHERE k = :k"), {"i": e.index, "k": k})

    def broken(s: Connection, first: int) -> None:
        s.execute(sql("INSERT INTO bulk_rows (k) VALUES ('z')"))
        raise RuntimeError("boom")

    results = svc.ledger.submit([LedgerWrite(entries, before=before, after=after),
                                 LedgerWrite(entries[:2], before=broken)]).result()
    assert [getattr(r, "index", None) for r in results[:4]] == [0, None, 1, 2]
    assert isinstance(results[1], QaiError) and results[1].code == "row.exists"
    assert all(isinstance(r, RuntimeError) for r in results[4:]) and len(results) == 6
    assert seen == promised == [("a", 0), ("b", 1), ("c", 2)]
    with svc.db.read() as s:
        assert s.execute(sql("SELECT k, idx FROM bulk_rows ORDER BY k")).all() == [
            ("a", 0), ("b", 1), ("c", 2), ("taken", None)]  # nothing of the broken write
    assert svc.ledger.size() == 3


def test_a_started_ledger_checkpoints_off_the_append_path(settings: Settings, db: Database) -> None:
    """With the checkpointer thread running (``qai serve``), reaching ``checkpoint_every`` wakes it
    instead of signing in the writer: the append returns while the checkpoint is still being made,
    and the checkpoint follows without waiting for the (hour-long) interval."""
    import threading

    services = ledger_services(settings, db, ledger_checkpoint_every=5, ledger_checkpoint_interval_seconds=3600)
    svc = next(services)
    entered, release = threading.Event(), threading.Event()
    checkpoint = svc.ledger.checkpoint

    def held() -> object:
        entered.set()
        release.wait(30)
        return checkpoint()

    svc.ledger.checkpoint = held  # type: ignore[method-assign]
    try:
        svc.ledger.start()
        try:
            assert _fill(svc, 5) == list(range(5))  # returned although the checkpoint is held
            assert entered.wait(30), "the writer did not wake the checkpointer"
            assert svc.ledger.latest_checkpoint_row() is None  # still held: nobody waited for it
        finally:
            release.set()
        for _ in range(3000):  # the checkpointer finishes on its own thread
            row = svc.ledger.latest_checkpoint_row()
            if row is not None:
                break
            threading.Event().wait(0.01)
        assert row is not None and row.size == 5
        assert verify_checkpoint(row.note, svc.ledger.checkpoint_key()).checkpoint.size == 5
    finally:
        services.close()


def test_a_started_ledger_counts_other_processes_checkpoints(settings: Settings, db: Database) -> None:
    """Another process's checkpoint resets the count: a started ledger whose own count is stale
    re-reads the latest checkpoint before signing, rather than signing after every commit."""
    import threading

    from orchestrator.services import build_services

    services = ledger_services(settings, db, ledger_checkpoint_every=5, ledger_checkpoint_interval_seconds=3600)
    first = next(services)
    second = build_services(first.settings, db=db)
    try:
        _fill(first, 5)  # the first process signs inline (no checkpointer thread): size 5
        assert [r.size for r in first.ledger.checkpoints()] == [5]
        checked = threading.Event()
        due = second.ledger._checkpoint_if_due

        def counted(size: int) -> None:
            due(size)
            checked.set()

        second.ledger._checkpoint_if_due = counted  # type: ignore[method-assign]
        second.ledger.start()
        envs = signed_envelopes(second.kms, "org-a.manifests", "org-a", 2)
        second.ledger.append_object("run-manifest", "org-a", envs[0])  # its count says 6 since none
        assert checked.wait(30), "the writer did not wake the checkpointer"
        assert [r.size for r in first.ledger.checkpoints()] == [5]  # 6 - 5 < 5: nothing signed
    finally:
        second.close()
        services.close()
