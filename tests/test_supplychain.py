"""Supply chain: hashed lock files, the reproducible build, in-toto attest/verify through the KMS
(real SoftHSM, real ledger), the SBOM, and the release workflow against its schema."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.supplychain import (
    ENTRY_TYPE,
    LOCK_FILES,
    SBOM,
    SLSA_PREDICATE,
    AttestOptions,
    attest,
    stage_source,
    unhashed_requirements,
    verify,
)
from sdk.errors import QaiError
from tests.ledger_helpers import ledger_services

# in-toto 3.1 records artifacts through a pathspec API that pathspec deprecates
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def local_svc(settings: Settings, sqlite_db: Any) -> Iterator[Services]:
    yield from ledger_services(settings, sqlite_db)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- lock files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOCK_FILES)
def test_every_locked_requirement_is_pinned_with_sha256_hashes(name: str) -> None:
    text = (ROOT / name).read_text()
    assert unhashed_requirements(text) == []
    # the same, spelled out on the raw text: every requirement line pins a version and is followed
    # by at least one --hash=sha256: continuation
    blocks = [b for b in text.split("\n") if b and not b.startswith((" ", "#"))]
    assert len(blocks) > 50, "the lock holds the whole dependency closure"
    for line in blocks:
        assert "==" in line and line.rstrip().endswith("\\"), line
    hashes = text.count("--hash=sha256:")
    assert hashes >= len(blocks)


def test_the_lock_check_rejects_an_unpinned_or_unhashed_requirement() -> None:
    text = "good==1.0 \\\n    --hash=sha256:" + "a" * 64 + "\nloose>=2\nnohash==3.0\n"
    assert unhashed_requirements(text) == ["loose>=2", "nohash==3.0"]


def test_the_locks_cover_the_project_dependencies() -> None:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = {ln.split("==")[0].lower().replace("_", "-") for ln in (ROOT / "requirements.lock").read_text()
              .splitlines() if "==" in ln and not ln.startswith(" ")}
    for req in deps["dependencies"]:
        name = req.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower()
        assert name in locked, name
    dev_locked = (ROOT / "requirements-dev.lock").read_text()
    for tool in ("in-toto==", "cyclonedx-bom==", "check-jsonschema==", "pytest=="):
        assert f"\n{tool}" in dev_locked, tool


# -- reproducible build ----------------------------------------------------------------------------
def _build(src: Path, out: Path, epoch: int) -> dict[str, str]:
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), "."], cwd=src, env=env,
                   check=True, capture_output=True)
    return {p.name: _sha(p) for p in sorted(out.iterdir())}


@pytest.mark.slow
def test_wheel_and_sdist_are_byte_identical_across_two_fresh_builds(tmp_path: Path) -> None:
    epoch = 1767225600  # 2026-01-01
    a, b = tmp_path / "a" / "src", tmp_path / "b" / "src"
    stage_source(ROOT, a)
    stage_source(ROOT, b)
    # the second checkout has other mtimes (as a later clone would) and other directory order
    for path in sorted(b.rglob("*"), reverse=True):
        os.utime(path, (epoch + 12345, epoch + 12345))
    first = _build(a, tmp_path / "a" / "dist", epoch)
    second = _build(b, tmp_path / "b" / "dist", epoch)
    assert sorted(first) == ["qai-0.1.0-py3-none-any.whl", "qai-0.1.0.tar.gz"]
    assert first == second
    # and the timestamps really come from SOURCE_DATE_EPOCH, not from the files
    with zipfile.ZipFile(tmp_path / "a" / "dist" / "qai-0.1.0-py3-none-any.whl") as z:
        assert {i.date_time[:3] for i in z.infolist()} == {(2026, 1, 1)}


# -- in-toto attest / verify ----------------------------------------------------------------------
# One attestation (a build, a test run and an SBOM: ~20 s) serves every check below; each tamper
# works on a fresh copy of the pristine output.
@pytest.mark.slow
def test_attest_verify_and_every_tamper_is_caught(local_svc: Services, tmp_path: Path) -> None:
    svc = local_svc
    pristine = tmp_path / "attestation"
    index = attest(svc, AttestOptions(source=ROOT, out=pristine))
    assert index["steps"] == ["lock", "build", "test", "package"]

    out = _fresh(pristine, tmp_path / "ok")
    _check_verified(svc, out, index)

    out = _fresh(pristine, tmp_path / "wheel")
    _rewrite_wheel(out / "release" / "dist" / "qai-0.1.0-py3-none-any.whl")
    with pytest.raises(QaiError) as err:
        verify(svc, out)
    # the stock in-toto verifier's rule check names the artifact that no longer matches its link
    assert err.value.code == "supplychain.intoto_failed"
    assert "RuleVerificationError" in str(err.value)
    assert "dist/qai-0.1.0-py3-none-any.whl" in str(err.value)

    out = _fresh(pristine, tmp_path / "link")
    link = next((out / "links").glob("build.*.link"))
    env = json.loads(link.read_text())
    payload = json.loads(base64.b64decode(env["payload"]))
    payload["products"]["dist/qai-0.1.0-py3-none-any.whl"]["sha256"] = "0" * 64
    env["payload"] = base64.b64encode(json.dumps(payload, sort_keys=True).encode()).decode()
    link.write_text(json.dumps(env))
    with pytest.raises(QaiError) as err:
        verify(svc, out)
    assert err.value.code == "supplychain.tampered" and link.name in str(err.value)

    out = _fresh(pristine, tmp_path / "prov")
    (out / "provenance.dsse.json").write_bytes((out / "provenance.dsse.json").read_bytes() + b" ")
    with pytest.raises(QaiError) as err:
        verify(svc, out)
    assert err.value.code == "supplychain.tampered" and "provenance.dsse.json" in str(err.value)

    # the SBOM is a product of the package step: changing it fails in-toto too
    out = _fresh(pristine, tmp_path / "sbom")
    (out / "release" / SBOM).write_text((out / "release" / SBOM).read_text().replace("pydantic", "pydantik"))
    with pytest.raises(QaiError) as err:
        verify(svc, out)
    assert err.value.code == "supplychain.intoto_failed" and SBOM in str(err.value)


def _fresh(pristine: Path, dest: Path) -> Path:
    shutil.copytree(pristine, dest)
    return dest


def _check_verified(svc: Services, out: Path, index: dict[str, Any]) -> None:
    result = verify(svc, out)
    assert result["verified"] and result["wheel"] == "qai-0.1.0-py3-none-any.whl"
    # the links are in-toto DSSE envelopes carrying the HSM's ECDSA half (for in-toto) and the
    # ML-DSA half (for qai) of one KMS signature
    links = sorted((out / "links").iterdir())
    assert [p.name.split(".")[0] for p in links] == ["build", "lock", "package", "test"]
    env = json.loads(links[0].read_text())
    assert env["payloadType"] == "application/vnd.in-toto+json"
    assert len(env["signatures"]) == 2
    assert any(s["keyid"].endswith("/ML-DSA-65") for s in env["signatures"])
    link = json.loads(base64.b64decode(env["payload"]))
    assert link["_type"] == "link" and "dist/qai-0.1.0-py3-none-any.whl" in link["products"]
    # every file is in the ledger as a build-attestation
    for rec in index["files"].values():
        entry = svc.ledger.entry(rec["ledger_index"])
        assert entry.type == ENTRY_TYPE and entry.sha256 == rec["sha256"]
    # provenance: SLSA v1 for the wheel and the sdist, with the released digests
    prov = json.loads(base64.b64decode(json.loads((out / "provenance.dsse.json").read_text())["payload"]))
    assert prov["predicateType"] == SLSA_PREDICATE
    assert {s["name"]: s["digest"]["sha256"] for s in prov["subject"]} == {
        p.name: _sha(p) for p in (out / "release" / "dist").iterdir()}
    assert prov["predicate"]["buildDefinition"]["externalParameters"]["steps"] == index["steps"]
    # the SBOM is CycloneDX, made by cyclonedx-py from the lock file
    sbom = json.loads((out / "release" / SBOM).read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    names = {c["name"].lower() for c in sbom["components"]}
    assert {"pydantic", "cryptography", "qiskit"} <= names
    assert "cyclonedx" in json.dumps(sbom["metadata"]["tools"]).lower()


def _rewrite_wheel(wheel: Path) -> None:
    """Change one file inside the wheel, leaving a valid zip (a realistic tamper)."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "sdk/__init__.py":
                data += b"\nimport os  # injected\n"
            dst.writestr(info, data)
    tmp.replace(wheel)


def test_the_cli_exposes_attest_verify_and_check_lock() -> None:
    from typer.testing import CliRunner

    from orchestrator.supplychain_cli import supplychain_app

    runner = CliRunner()
    res = runner.invoke(supplychain_app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("attest", "verify", "check-lock"):
        assert cmd in res.output
    res = runner.invoke(supplychain_app, ["check-lock", *(str(ROOT / n) for n in LOCK_FILES)])
    assert res.exit_code == 0, res.output


# -- CI workflow -----------------------------------------------------------------------------------
def test_release_workflow_validates_against_the_github_workflows_schema() -> None:
    workflow = ROOT / ".github" / "workflows" / "release.yml"
    res = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows",
                          str(workflow)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_release_workflow_builds_tests_pushes_signs_and_attests() -> None:
    import yaml

    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    text = json.dumps(wf)
    for needle in ("--require-hashes", "python -m build", "pytest", "docker/build-push-action",
                   "cosign sign --yes", "cosign attest --yes --type cyclonedx", "--type slsaprovenance1",
                   "cyclonedx-py", "qai supplychain attest", "qai supplychain verify", "SOURCE_DATE_EPOCH"):
        assert needle in text, needle
    image_job = wf["jobs"]["image"]
    assert image_job["permissions"]["id-token"] == "write"  # keyless signing needs the OIDC token
