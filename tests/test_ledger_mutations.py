"""Mutation testing of the auditor: every randomized single mutation of a populated ledger must be
caught by ``qai audit verify`` (the real CLI, in-process), 100% of them.

A ledger of 40 signed run-manifests from two tenants, fully covered by signed checkpoints, is served
by a real uvicorn server over SQLite. The auditor pins the public keys and remembers the last
checkpoint it verified (``--state``), as a deployed auditor would. Each case applies one mutation,
runs ``qai audit verify --json``, expects exit 1, and restores the pristine ledger (SQLite backup
API for the DB, a copy for the objects). Bundle cases mutate an exported bundle instead.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from orchestrator.app import create_app
from orchestrator.auth import Principal, Role, issue_token
from orchestrator.db import Database, utcnow
from orchestrator.services import Services
from orchestrator.settings import Settings
from sdk.audit import ServerSource, export_bundle
from sdk.checkpoint import Checkpoint, format_note, parse_note, sign_lines
from sdk.cli import app as qai
from sdk.client import Client
from sdk.errors import QaiError
from tests.conftest import LiveServer, _sqlite_database
from tests.ledger_helpers import ledger_services, signed_envelopes, trusted_keys, write_keys

CASES_PER_KIND = 35
BUNDLE_CASES = 36
ENTRIES = 40
ENTRY_COLUMNS = ("entry_type", "sha256", "path", "tenant", "at", "leaf_hash")
LEDGER_TABLES = ("ledger_entries", "ledger_nodes", "ledger_checkpoints")


@dataclass
class World:
    svc: Services
    server: LiveServer
    token: str
    db_file: Path
    pristine_db: Path
    objects: Path
    pristine_objects: Path
    keys_file: Path
    state_file: Path
    pristine_state: str
    spare_envelopes: dict[str, list[bytes]]
    mallory: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from kms.hsm import HsmConfig
    from tests.conftest import SOFTHSM_MODULE

    tmp = tmp_path_factory.mktemp("mutations")
    hsm = HsmConfig(module=SOFTHSM_MODULE, token_label="qai-test", user_pin="1234-user", so_pin="5678-so",
                    pool_size=4, softhsm_dir=tmp / "softhsm")
    settings = Settings(home=tmp / ".qai", pkcs11_module=hsm.module, pkcs11_token_label=hsm.token_label,
                        pkcs11_user_pin=hsm.user_pin, pkcs11_so_pin=hsm.so_pin)  # type: ignore[arg-type]
    db_gen = _sqlite_database(tmp / "ledger.db")
    db: Database = next(db_gen)
    svc_gen = ledger_services(settings, db)
    svc = next(svc_gen)
    admin = Principal.system("test")
    svc.kms.create_key("mallory.ledger", tenant="org-b", principal=admin)  # a real key, not trusted for checkpoints
    for tenant in ("org-a", "org-b"):
        for env in signed_envelopes(svc.kms, f"{tenant}.manifests", tenant, ENTRIES // 2):
            svc.ledger.append_object("run-manifest", tenant, env)
    assert svc.ledger.latest_checkpoint_row().size == ENTRIES  # type: ignore[union-attr]
    spare = {t: signed_envelopes(svc.kms, f"{t}.manifests", t, 25, start=1000) for t in ("org-a", "org-b")}
    keys = {k: v for k, v in trusted_keys(svc).items() if k != "mallory.ledger"}
    keys[svc.ledger.config.key_name] = svc.ledger.checkpoint_key()
    token = issue_token(svc.db, role=Role.AUDITOR, tenant=None).token
    with LiveServer(create_app(svc)) as server:
        w = World(svc=svc, server=server, token=token, db_file=tmp / "ledger.db", pristine_db=tmp / "pristine.db",
                  objects=settings.objects_dir, pristine_objects=tmp / "pristine-objects",
                  keys_file=write_keys(tmp / "keys.json", keys), state_file=tmp / "state.json",
                  pristine_state="", spare_envelopes=spare, mallory="mallory.ledger")
        _backup(w.db_file, w.pristine_db)
        shutil.copytree(w.objects, w.pristine_objects)
        code, report = _verify(w, state=False)  # the auditor's first, clean run records its state
        assert code == 0 and report["ok"] and report["entries"] == ENTRIES, report
        w.pristine_state = w.state_file.read_text()
        yield w
    for gen in (svc_gen, db_gen):
        with pytest.raises(StopIteration):
            next(gen)


def _backup(src: Path, dst: Path) -> None:
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def _restore(w: World) -> None:
    _backup(w.pristine_db, w.db_file)
    shutil.rmtree(w.objects)
    shutil.copytree(w.pristine_objects, w.objects)
    w.state_file.write_text(w.pristine_state)
    w.svc.ledger._checkpointed = -1  # the process's caches of the log it was running, as after a restart
    w.svc.ledger._frontier = None


def _verify(w: World, *, state: bool = True, bundle: Path | None = None) -> tuple[int, dict[str, Any]]:
    args = ["audit", "verify", "--json", "--keys", str(w.keys_file), "--workers", "1",
            "--state", str(w.state_file)]
    args += ["--bundle", str(bundle)] if bundle else ["--server", w.server.url, "--token", w.token]
    result = CliRunner().invoke(qai, args)
    try:
        return result.exit_code, json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"qai audit verify printed no JSON: {result.output}") from result.exception


def _sql(w: World, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Run statements as a superuser would: with the append-only triggers dropped."""
    conn = sqlite3.connect(w.db_file)
    try:
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        for sql, params in statements:
            conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def _row(w: World, idx: int) -> tuple[Any, ...]:
    conn = sqlite3.connect(w.db_file)
    try:
        return conn.execute(f"SELECT {', '.join(ENTRY_COLUMNS)} FROM ledger_entries WHERE idx = ?", (idx,)).fetchone()
    finally:
        conn.close()


# --- the mutations ---------------------------------------------------------------------------------

def flip_envelope_byte(w: World, rng: random.Random) -> str:
    e = w.svc.ledger.entry(rng.randrange(ENTRIES))
    path = w.objects / e.path
    data = bytearray(path.read_bytes())
    pos = rng.randrange(len(data))
    data[pos] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return f"entry {e.index} byte {pos}"


def edit_index_row(w: World, rng: random.Random) -> str:
    idx = rng.randrange(ENTRIES)
    row = dict(zip(ENTRY_COLUMNS, _row(w, idx), strict=True))
    column = rng.choice(ENTRY_COLUMNS)
    new: Any = {
        "entry_type": rng.choice(["scheduler-decision", "em-result", "dataset", "model-version"]),
        "sha256": rng.randbytes(32).hex(),
        "path": f"elsewhere/{row['path']}",
        "tenant": "org-b" if row["tenant"] == "org-a" else "org-a",
        "at": str(row["at"])[:-1] + str((int(str(row["at"])[-1]) + 1) % 10),
        "leaf_hash": rng.randbytes(32).hex(),
    }[column]
    _sql(w, (f"UPDATE ledger_entries SET {column} = ? WHERE idx = ?", (new, idx)))
    if column != "leaf_hash" and rng.random() < 0.5:  # a careful forger keeps the row self-consistent
        edited = w.svc.ledger.entry(idx)
        _sql(w, ("UPDATE ledger_entries SET leaf_hash = ? WHERE idx = ?", (edited.entry().leaf_hash().hex(), idx)))
        return f"entry {idx} {column} with a recomputed leaf hash"
    return f"entry {idx} {column}"


def delete_entry(w: World, rng: random.Random) -> str:
    idx = rng.randrange(ENTRIES)
    _sql(w, ("DELETE FROM ledger_entries WHERE idx = ?", (idx,)))
    return f"entry {idx}"


def reorder_entries(w: World, rng: random.Random) -> str:
    i, j = rng.sample(range(ENTRIES), 2)
    a, b = _row(w, i), _row(w, j)
    sets = ", ".join(f"{c} = ?" for c in ENTRY_COLUMNS)
    _sql(w, (f"UPDATE ledger_entries SET {sets} WHERE idx = ?", (*b, i)),
         (f"UPDATE ledger_entries SET {sets} WHERE idx = ?", (*a, j)))
    return f"entries {i} <-> {j}"


def replace_checkpoint(w: World, rng: random.Random) -> str:
    rows = w.svc.ledger.checkpoints()
    target = rng.choice(rows)
    body, _ = parse_note(target.note)
    cp = Checkpoint.parse_body(body)
    if rng.random() < 0.5:  # same tree, forged signer; or a different root as well
        cp = Checkpoint(cp.origin, cp.size, rng.randbytes(32), cp.timestamp)
    key = w.svc.kms.public_key(w.mallory)
    bundle = w.svc.kms.sign(w.mallory, principal=Principal.system("mallory"), message=cp.body())
    lines = sign_lines(bundle, key)
    if rng.random() < 0.5:  # impersonate the checkpoint key's name in the signature lines
        trusted = w.svc.ledger.config.key_name
        lines = [type(s)(s.name.replace(w.mallory, trusted), s.key_hash, s.signature) for s in lines]
    note = format_note(cp.body(), lines)
    _sql(w, ("UPDATE ledger_checkpoints SET note = ? WHERE size = ?", (note, target.size)))
    return f"checkpoint {target.size}"


def fork(w: World, rng: random.Random) -> str:
    keep = rng.randrange(1, ENTRIES)
    _sql(w, ("DELETE FROM ledger_entries WHERE idx >= ?", (keep,)),
         ("DELETE FROM ledger_nodes WHERE ((node_id & 281474976710655) + 1) << (node_id >> 48) > ?", (keep,)),
         ("DELETE FROM ledger_checkpoints WHERE size > ?", (keep,)))
    w.svc.ledger._checkpointed = -1
    extra = rng.randrange(1, 25)
    for _ in range(extra):
        tenant = rng.choice(["org-a", "org-b"])
        env = rng.choice(w.spare_envelopes[tenant])
        w.svc.ledger.append_object("run-manifest", tenant, env, at=utcnow())
    try:
        w.svc.ledger.checkpoint()  # the log operator signs the forked history with the real key
    except QaiError as exc:  # the write-once published history refuses it; the auditor must see it too
        assert exc.code == "ledger.fork_detected"
    return f"rolled back to {keep}, appended {extra}"


SERVER_MUTATIONS: dict[str, Callable[[World, random.Random], str]] = {
    "flip_envelope_byte": flip_envelope_byte,
    "edit_index_row": edit_index_row,
    "delete_entry": delete_entry,
    "reorder_entries": reorder_entries,
    "replace_checkpoint": replace_checkpoint,
    "fork": fork,
}


@pytest.mark.parametrize("kind", list(SERVER_MUTATIONS))
def test_every_server_side_mutation_is_detected(world: World, kind: str) -> None:
    rng = random.Random(f"qai-mutations-{kind}")
    missed, codes = [], Counter[str]()
    for _ in range(CASES_PER_KIND):
        what = SERVER_MUTATIONS[kind](world, rng)
        try:
            code, report = _verify(world)
        finally:
            _restore(world)
        if code != 1 or report["ok"]:
            missed.append(what)
        else:
            codes[report["first_failure"]["code"]] += 1
    assert not missed, f"{kind}: {len(missed)}/{CASES_PER_KIND} mutations were not detected: {missed}"
    print(f"{kind}: {CASES_PER_KIND}/{CASES_PER_KIND} detected; first failure codes {dict(codes)}")
    code, report = _verify(world)  # and the restored ledger passes again
    assert code == 0 and report["ok"], report


def test_every_bundle_mutation_is_detected(world: World, tmp_path: Path) -> None:
    with Client(world.server.url, world.token) as c:
        export_bundle(ServerSource(c), tmp_path / "pristine")
    code, report = _verify(world, bundle=tmp_path / "pristine")
    assert code == 0 and report["ok"], report
    rng = random.Random("qai-bundle-mutations")
    missed = []
    for case in range(BUNDLE_CASES):
        work = tmp_path / f"b{case}"
        shutil.copytree(tmp_path / "pristine", work)
        lines = (work / "entries.jsonl").read_text().splitlines()
        meta = json.loads((work / "bundle.json").read_text())
        kind = case % 3
        if kind == 0:  # flip a byte of an envelope
            i = rng.randrange(len(lines))
            row = json.loads(lines[i])
            data = bytearray(base64.b64decode(row["object"]))
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
            row["object"] = base64.b64encode(bytes(data)).decode()
            lines[i] = json.dumps(row)
            what = f"flip in entry {i}"
        elif kind == 1:  # reorder two entries, keeping their index fields
            i, j = rng.sample(range(len(lines)), 2)
            a, b = json.loads(lines[i]), json.loads(lines[j])
            a["index"], b["index"] = b["index"], a["index"]
            lines[i], lines[j] = json.dumps(b), json.dumps(a)
            what = f"swap {i} {j}"
        else:  # drop a checkpoint's trusted signature line for one from another key
            k = rng.randrange(len(meta["checkpoints"]))
            body, _ = parse_note(meta["checkpoints"][k])
            bundle = world.svc.kms.sign(world.mallory, principal=Principal.system("m"), message=body)
            meta["checkpoints"][k] = format_note(body, sign_lines(bundle, world.svc.kms.public_key(world.mallory)))
            what = f"checkpoint {k}"
        (work / "entries.jsonl").write_text("\n".join(lines) + "\n")
        (work / "bundle.json").write_text(json.dumps(meta))
        world.state_file.write_text(world.pristine_state)
        code, report = _verify(world, bundle=work)
        if code != 1 or report["ok"]:
            missed.append(what)
    assert not missed, f"{len(missed)}/{BUNDLE_CASES} bundle mutations were not detected: {missed}"
    assert CASES_PER_KIND * len(SERVER_MUTATIONS) + BUNDLE_CASES >= 200
