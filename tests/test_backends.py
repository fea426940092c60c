"""The backend catalog and registry: real IBM calibrations in the database, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner, Result

from harness import backends_cli
from harness.backends import get_backend, get_snapshot, import_catalog, import_snapshot, list_backends
from harness.calibration import CalibrationSnapshot
from harness.catalog import BackendInfo, backend_info, catalog, catalog_snapshot
from harness.models import BACKENDS, CALIBRATION_SNAPSHOTS, EM_RESULTS, HARNESS_RUNS, CalibrationSnapshotRow
from orchestrator.db import Database
from sdk import output
from sdk.cli import app as qai
from sdk.errors import QaiError


def _snapshot_count(db: Database) -> int:
    with db.read() as s:
        return int(s.scalar(select(func.count()).select_from(CalibrationSnapshotRow)) or 0)


def _renamed(snap: CalibrationSnapshot, backend_id: str) -> CalibrationSnapshot:
    return dataclasses.replace(snap, backend_id=backend_id)


# --- the catalog --------------------------------------------------------------------------------------


def test_catalog_spans_devices_and_gives_the_scheduler_choices() -> None:
    infos = catalog()
    assert infos == catalog() and len(infos) >= 8  # deterministic
    ids = [i.backend_id for i in infos]
    assert len(set(ids)) == len(ids)
    assert [(i.num_qubits, i.backend_id) for i in infos] == sorted((i.num_qubits, i.backend_id) for i in infos)
    assert infos[0].num_qubits == 5 and infos[-1].num_qubits >= 156
    assert {"ecr", "cz"} <= {i.two_qubit_gate for i in infos}
    assert len({i.vendor for i in infos}) >= 2 and len({i.region for i in infos}) >= 3
    braket = [i for i in infos if i.vendor == "aws-braket"]
    assert len(braket) >= 2 and all(i.capabilities["adapter"] == "braket-like" for i in braket)
    assert any(i.capabilities["qkd"] for i in infos)
    pqc = [i for i in infos if "pqc-required" in i.crypto_modes]
    assert 0 < len(pqc) < len(infos)
    assert len({i.cost_per_shot for i in infos}) >= 5 and len({i.availability for i in infos}) >= 5
    for info in infos:
        assert BackendInfo.from_json(json.loads(json.dumps(info.to_json()))) == info  # valid, and survives JSON
        assert backend_info(info.backend_id) == info


def test_every_catalog_backend_carries_a_real_calibration() -> None:
    for info in catalog():
        snap = catalog_snapshot(info.backend_id)
        assert snap.backend_id == info.backend_id
        assert snap.num_qubits == info.num_qubits and snap.two_qubit_gate == info.two_qubit_gate
        assert sorted(snap.basis_gates) == info.capabilities["basis_gates"]
        assert all(snap.t1(q) > 1e-6 and 0 < snap.t2(q) <= 2 * snap.t1(q) for q in range(snap.num_qubits))
        assert len(snap.readout_errors) == snap.num_qubits
        assert len(snap.gates[snap.two_qubit_gate]) >= snap.num_qubits - 1  # a connected coupling map
        assert snap.created_at.year >= 2021  # a real calibration date, not the 1970 fallback
        assert catalog_snapshot(info.backend_id) is snap  # cached


def test_unknown_catalog_backend() -> None:
    for call in (backend_info, catalog_snapshot):
        with pytest.raises(QaiError) as exc:
            call("fake_nowhere")
        assert exc.value.code == "backends.not_found" and exc.value.status == 404
        assert "fake_manila" in exc.value.details["known"]


def test_backend_info_validation() -> None:
    snap = catalog_snapshot("fake_manila")
    good = backend_info("fake_manila").to_json()
    # the physical fields may be left to the calibration
    partial = {k: v for k, v in good.items() if k != "backend_id"}
    partial["capabilities"] = {k: v for k, v in good["capabilities"].items()
                               if k not in ("num_qubits", "basis_gates", "two_qubit_gate")}
    assert BackendInfo.from_json(partial, snap) == backend_info("fake_manila")
    bad: list[tuple[dict[str, Any], str]] = [
        ({**good, "availability": 1.5}, "backends.bad_info"),
        ({**good, "cost_per_shot": True}, "backends.bad_info"),
        ({**good, "cost_per_shot": -1}, "backends.bad_info"),
        ({**good, "colour": "blue"}, "backends.bad_info"),
        ({**good, "queue": {"model": "psychic"}}, "backends.bad_info"),
        ({**good, "capabilities": {**good["capabilities"], "crypto_modes": ["rot13"]}}, "backends.bad_info"),
        ({**good, "capabilities": {**good["capabilities"], "adapter": "carrier-pigeon"}}, "backends.bad_info"),
        ({**good, "capabilities": {**good["capabilities"], "max_shots": 0}}, "backends.bad_info"),
        ({**good, "capabilities": {**good["capabilities"], "num_qubits": 7}}, "calibration.backend_mismatch"),
        ({**good, "backend_id": "fake_nairobi"}, "calibration.backend_mismatch"),
    ]
    for data, code in bad:
        with pytest.raises(QaiError) as exc:
            BackendInfo.from_json(data, snap)
        assert exc.value.code == code, data


# --- the registry -------------------------------------------------------------------------------------


def test_models_match_the_migration(db: Database) -> None:
    insp = inspect(db.engine)
    for table in (BACKENDS, CALIBRATION_SNAPSHOTS, EM_RESULTS, HARNESS_RUNS):
        columns = {c["name"]: c for c in insp.get_columns(table.name)}
        assert set(columns) == {c.name for c in table.columns}, table.name
        assert {n for n, c in columns.items() if c["nullable"]} == {c.name for c in table.columns if c.nullable}


def test_import_catalog_round_trips_and_is_idempotent(db: Database) -> None:
    results = import_catalog(db)
    infos = catalog()
    assert [r.backend_id for r in results] == [i.backend_id for i in infos]
    assert all(r.created and r.backend_created and r.latest for r in results)
    listed = list_backends(db)
    assert [b["backend_id"] for b in listed] == [i.backend_id for i in infos]
    for row, info, r in zip(listed, infos, results, strict=True):
        assert {k: row[k] for k in info.to_json()} == info.to_json()
        assert row["last_calibration_id"] == r.snapshot_id
        assert row["last_calibration_at"] == catalog_snapshot(info.backend_id).created_at
    for r in results:
        original = catalog_snapshot(r.backend_id)
        stored = get_snapshot(db, r.snapshot_id)
        assert stored == original and stored.to_json() == original.to_json() and stored.id == r.snapshot_id

    fez = get_backend(db, "fake_fez")
    snap = catalog_snapshot("fake_fez")
    cal = fez["latest_calibration"]
    assert fez["snapshots"] == 1 and cal["id"] == snap.id and cal["two_qubit_gate"] == "cz"
    assert cal["median_2q_error"] == statistics.median(v["error"] for v in snap.gates["cz"].values())
    assert cal["median_t1_seconds"] == statistics.median(snap.raw_metrics["t1"])
    assert 0 < cal["median_readout_error"] < 0.1 and 0 < cal["median_2q_error"] < 0.05

    again = import_catalog(db)
    assert [r.snapshot_id for r in again] == [r.snapshot_id for r in results]
    assert not any(r.created or r.backend_created for r in again) and all(r.latest for r in again)
    assert _snapshot_count(db) == len(infos)
    assert list_backends(db) == listed  # nothing touched, updated_at included


def test_last_calibration_only_moves_forward(db: Database) -> None:
    info, snap = backend_info("fake_manila"), catalog_snapshot("fake_manila")
    first = import_snapshot(db, snap, info)
    assert first.created and first.backend_created and first.latest
    older = dataclasses.replace(snap, created_at=snap.created_at - timedelta(days=1))
    newer = dataclasses.replace(snap, created_at=snap.created_at + timedelta(days=1))
    assert len({snap.id, older.id, newer.id}) == 3
    r = import_snapshot(db, older)  # a backfill: stored, but not the one the scheduler uses
    assert r.created and not r.latest and not r.backend_created
    assert get_backend(db, "fake_manila")["last_calibration_id"] == snap.id
    r = import_snapshot(db, newer)
    assert r.created and r.latest
    assert import_snapshot(db, snap, info).created is False
    b = get_backend(db, "fake_manila")
    assert b["last_calibration_id"] == newer.id and b["snapshots"] == 3
    assert b["latest_calibration"]["created_at"] == newer.created_at


def test_updated_description_is_applied(db: Database) -> None:
    info, snap = backend_info("fake_manila"), catalog_snapshot("fake_manila")
    import_snapshot(db, snap, info)
    before = get_backend(db, "fake_manila")
    cheaper = dataclasses.replace(info, cost_per_shot=0.00001, region="eu-de")
    r = import_snapshot(db, snap, cheaper)
    assert not r.created and not r.backend_created
    after = get_backend(db, "fake_manila")
    assert (after["cost_per_shot"], after["region"]) == (0.00001, "eu-de")
    assert after["updated_at"] > before["updated_at"]


def test_mismatching_qubit_count_is_rejected_and_leaves_nothing(db: Database) -> None:
    manila_info = backend_info("fake_manila")
    impostor = _renamed(catalog_snapshot("fake_nairobi"), "fake_manila")  # 7 qubits under a 5-qubit name
    # a new backend: refused before anything is written
    with pytest.raises(QaiError) as exc:
        import_snapshot(db, impostor, manila_info)
    assert exc.value.code == "calibration.backend_mismatch" and exc.value.status == 409
    assert list_backends(db) == [] and _snapshot_count(db) == 0

    # a registered backend: the calibration alone, and with a description that claims 7 qubits
    good = import_snapshot(db, catalog_snapshot("fake_manila"), manila_info)
    before = list_backends(db)
    claims_seven = dataclasses.replace(manila_info, vendor="mallory", capabilities={
        **manila_info.capabilities, "num_qubits": 7})
    for info in (None, claims_seven):
        with pytest.raises(QaiError) as exc:
            import_snapshot(db, impostor, info)
        assert exc.value.code == "calibration.backend_mismatch" and exc.value.status == 409
    assert exc.value.details == {"backend_qubits": 5, "calibration_qubits": 7}
    assert list_backends(db) == before and before[0]["vendor"] == "qai"  # the description was not applied
    assert _snapshot_count(db) == 1 and before[0]["last_calibration_id"] == good.snapshot_id

    # a description of another backend
    with pytest.raises(QaiError) as exc:
        import_snapshot(db, catalog_snapshot("fake_manila"), backend_info("fake_nairobi"))
    assert exc.value.code == "calibration.backend_mismatch"


def test_unknown_backends_and_snapshots(db: Database) -> None:
    with pytest.raises(QaiError) as exc:
        import_snapshot(db, catalog_snapshot("fake_manila"))
    assert exc.value.code == "backends.unknown_backend" and exc.value.status == 404
    assert "--backend-info" in exc.value.details["hint"]
    assert _snapshot_count(db) == 0
    with pytest.raises(QaiError) as exc:
        get_backend(db, "fake_manila")
    assert exc.value.code == "backends.unknown_backend" and exc.value.status == 404
    with pytest.raises(QaiError) as exc:
        get_snapshot(db, "fake_manila@20240527T182723Z-000000000000")
    assert exc.value.code == "calibration.not_found" and exc.value.status == 404


def _drop_append_only_triggers(db: Database) -> None:
    """What someone with direct database access could do first."""
    with db.engine.begin() as conn:
        if db.dialect == "postgresql":
            conn.execute(text("DROP TRIGGER calibration_snapshots_append_only ON calibration_snapshots"))
        else:
            conn.execute(text("DROP TRIGGER calibration_snapshots_no_update"))


def _set_gates(db: Database, snapshot_id: str, gates: dict[str, Any]) -> None:
    cast = "CAST(:g AS jsonb)" if db.dialect == "postgresql" else ":g"
    with db.engine.begin() as conn:
        n = conn.execute(text(f"UPDATE calibration_snapshots SET gates = {cast} WHERE id = :id"),
                         {"g": json.dumps(gates), "id": snapshot_id}).rowcount
    assert n == 1


def test_stored_snapshots_are_append_only_and_tampering_is_detected(db: Database) -> None:
    snap = catalog_snapshot("fake_manila")
    r = import_snapshot(db, snap, backend_info("fake_manila"))
    with pytest.raises(DBAPIError, match="append-only"):
        _set_gates(db, r.snapshot_id, {})
    assert get_snapshot(db, r.snapshot_id) == snap

    _drop_append_only_triggers(db)
    gates = json.loads(json.dumps(snap.gates))
    gates["cx"]["0,1"]["error"] /= 10  # a device made to look better than it was
    _set_gates(db, r.snapshot_id, gates)
    for read in (lambda: get_snapshot(db, r.snapshot_id), lambda: get_backend(db, "fake_manila")):
        with pytest.raises(QaiError) as exc:
            read()
        assert exc.value.code == "calibration.id_mismatch" and exc.value.status == 500
        assert exc.value.details["computed_id"] != r.snapshot_id

    gates["cx"]["0,1"]["error"] = 7.0  # no longer even a probability
    _set_gates(db, r.snapshot_id, gates)
    with pytest.raises(QaiError) as exc:
        get_snapshot(db, r.snapshot_id)
    assert exc.value.code == "calibration.id_mismatch" and exc.value.details["reason"] == "calibration.malformed"


# --- the CLI --------------------------------------------------------------------------------------------


@pytest.fixture
def cli(db: Database, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``qai`` in this process, its services reduced to the test's database."""
    monkeypatch.setattr(backends_cli, "services", lambda: SimpleNamespace(db=db))
    # room for the tables: the console fixed its width when it was created, from whatever COLUMNS was then
    monkeypatch.setattr(output.console, "_width", 200)

    def run(*args: str) -> Result:
        return CliRunner().invoke(qai, ["backends", *args])

    return run


def _error(result: Result) -> str:
    assert result.exit_code == 2, result.output
    return str(json.loads(result.stdout)["error"]["code"])


def test_cli_import_catalog_list_and_show(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("import", "--catalog", "--json")
    assert r.exit_code == 0, r.output
    assert [x["backend_id"] for x in json.loads(r.stdout)] == [i.backend_id for i in catalog()]
    r = cli("list", "--json")
    assert r.exit_code == 0, r.output
    listed = json.loads(r.stdout)
    assert [b["backend_id"] for b in listed] == [i.backend_id for i in catalog()]
    assert all(b["last_calibration_id"].startswith(b["backend_id"] + "@") for b in listed)
    r = cli("show", "fake_torino", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["latest_calibration"]["two_qubit_gate"] == "cz"
    r = cli("list")
    assert r.exit_code == 0 and "fake_sherbrooke" in r.stdout and "aws-braket" in r.stdout
    r = cli("show", "fake_kyiv")
    assert r.exit_code == 0 and "median ecr error" in r.stdout and "braket-like" in r.stdout
    r = cli("import", "--catalog")
    assert r.exit_code == 0 and r.stdout.count("already stored") == len(catalog())
    assert _error(cli("show", "fake_nowhere", "--json")) == "backends.unknown_backend"


def test_cli_import_vendor_file(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    snap = _renamed(catalog_snapshot("fake_manila"), "acme_q5")
    description = {"vendor": "acme", "region": "ap-south-1", "cost_per_shot": 0.0002, "availability": 0.9,
                   "queue": {"model": "exponential", "mean_wait_seconds": 120},
                   "capabilities": {"crypto_modes": ["hybrid", "classical"], "qkd": False, "max_shots": 8192,
                                    "adapter": "braket-like"}}
    bare = tmp_path / "acme.json"
    bare.write_text(json.dumps(snap.to_json()))
    assert _error(cli("import", str(bare), "--json")) == "backends.unknown_backend"

    described = tmp_path / "acme-described.json"
    described.write_text(json.dumps({**snap.to_json(), "backend": description}))
    r = cli("import", str(described), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["created"] and out["backend_created"] and out["snapshot_id"] == snap.id
    r = cli("import", str(bare), "--json")  # now registered: the bare calibration is enough
    assert r.exit_code == 0 and json.loads(r.stdout)["created"] is False
    shown = json.loads(cli("show", "acme_q5", "--json").stdout)
    assert shown["num_qubits"] == 5 and shown["capabilities"]["two_qubit_gate"] == "cx"
    assert shown["capabilities"]["crypto_modes"] == ["classical", "hybrid"]

    info_file = tmp_path / "info.json"
    info_file.write_text(json.dumps({**description, "availability": 0.5}))
    r = cli("import", str(bare), "--backend-info", str(info_file), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(cli("show", "acme_q5", "--json").stdout)["availability"] == 0.5
    assert _error(cli("import", str(described), "--backend-info", str(info_file), "--json")) \
        == "backends.bad_arguments"
    info_file.write_text(json.dumps({**description, "availability": 2}))
    assert _error(cli("import", str(bare), "--backend-info", str(info_file), "--json")) == "backends.bad_info"


def test_cli_rejects_bad_files(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "cal.json"
    f.write_text("{not json")
    assert _error(cli("import", str(f), "--json")) == "calibration.malformed"
    r = cli("import", str(f))
    assert r.exit_code == 2 and "calibration.malformed" in r.output
    f.write_text(json.dumps({"backend_id": "fake_manila", "created_at": "2024-05-27T18:27:23+00:00"}))
    assert _error(cli("import", str(f), "--json")) == "calibration.malformed"
    f.write_text("[1, 2]")
    assert _error(cli("import", str(f), "--json")) == "calibration.malformed"
    doctored = catalog_snapshot("fake_manila").to_json()
    doctored["gates"]["cx"]["0,1"]["error"] /= 10  # the id no longer matches the content
    f.write_text(json.dumps(doctored))
    assert _error(cli("import", str(f), "--json")) == "calibration.id_mismatch"
    assert _error(cli("import", str(tmp_path / "missing.json"), "--json")) == "cli.unreadable"
    assert _error(cli("import", "--json")) == "backends.bad_arguments"
    assert _error(cli("import", str(f), "--catalog", "--json")) == "backends.bad_arguments"
    assert json.loads(cli("list", "--json").stdout) == []  # nothing was imported


def test_qai_backends_as_a_user_runs_it(tmp_path: Path) -> None:
    """The real wiring: a separate process on an embedded default of its own (SQLite, SoftHSM)."""
    env = {**os.environ, "QAI_HOME": str(tmp_path / ".qai")}
    env.pop("SOFTHSM2_CONF", None)
    cal = tmp_path / "manila.json"
    cal.write_text(json.dumps({**catalog_snapshot("fake_manila").to_json(),
                               "backend": backend_info("fake_manila").to_json()}))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sdk.cli", "backends", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    proc = run("import", str(cal), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run("list", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [b["backend_id"] for b in json.loads(proc.stdout)] == ["fake_manila"]


def test_the_documented_import_example_imports(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    doc = (Path(__file__).resolve().parent.parent / "docs" / "backends.md").read_text()
    example = doc.split("```json\n", 1)[1].split("```", 1)[0]
    f = tmp_path / "acme.json"
    f.write_text(example)
    r = cli("import", str(f), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["backend_created"] is True
    shown = json.loads(cli("show", "acme_q3", "--json").stdout)
    assert shown["latest_calibration"]["two_qubit_gate"] == "cz" and shown["num_qubits"] == 3
