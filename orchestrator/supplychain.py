"""Supply chain: in-toto links and layout for the release steps, an SBOM, and SLSA v1 provenance.

``attest`` stages a copy of the source tree (``git ls-files``: tracked and untracked-but-not-ignored
files, so an uncommitted change is attested as it is) and runs the critical steps in it with
``in_toto.runlib.in_toto_run``, which hashes each step's materials before and products after:

* **lock**: checks that ``requirements.lock`` / ``requirements-dev.lock`` pin every requirement with
  hashes (or, with ``relock``, regenerates them with ``uv pip compile --generate-hashes``);
* **build**: ``python -m build`` of the wheel and sdist with ``SOURCE_DATE_EPOCH`` set (the build is
  byte-reproducible, see ``orchestrator/build_backend.py``);
* **test**: a quick ``pytest`` run in the staged tree, on the staged code (optional);
* **package**: the CycloneDX SBOM of the locked dependencies, made by ``cyclonedx-py``.

Why each link carries two kinds of signature. The KMS signs with hybrid suites
(``ML-DSA-65+ECDSA-P256``): the ECDSA P-256 half lives in the HSM, the ML-DSA half is sealed by it.
in-toto (through securesystemslib) verifies ECDSA P-256 but not the KMS's ML-DSA keys. So one KMS
signature over the DSSE PAE of each link yields both halves: the ECDSA part goes into the in-toto
DSSE envelope under the securesystemslib keyid of the exported public key (``KmsSigner``), which
the stock ``in_toto.verifylib.in_toto_verify`` checks; the ML-DSA part goes into the same envelope
under the KMS keyid ``name@version/ML-DSA-65``, which in-toto skips (no layout key has that id) and
which :func:`verify` checks together with the ECDSA part as one KMS bundle (both halves, the key
version valid at the ledger time). The layout is signed the same way by the project-owner key.

The SLSA v1 provenance statement of the wheel and sdist is a qai DSSE envelope (every suite part).
Layout, links and provenance are stored content-addressed in the object store and appended to the
ledger (entry type ``build-attestation``) in one write; ``attestation.json`` in the output
directory lists their ledger indices.

``verify`` re-checks every ledgered file (bytes, ledger entry, hybrid signature), runs the stock
in-toto verifier on ``release/`` (the final products), then checks the provenance subjects
against the released files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from orchestrator.objects import put_once
from sdk.dsse import Envelope, envelope_bytes, envelope_from_bundle, pae, parse_envelope, verify_envelope
from sdk.errors import QaiError
from sdk.ledger import SYSTEM_TENANT, LedgerEntry
from sdk.signing import KeyDocument, SignatureBundle, b64decode, keyid

if TYPE_CHECKING:
    # securesystemslib's public names, which its __init__ re-exports without an __all__
    from securesystemslib.signer import Key, Signature  # type: ignore[attr-defined]

    from orchestrator.services import Services

FUNCTIONARY_KEY = "qai.supplychain"
OWNER_KEY = "qai.supplychain-owner"
# in-toto can verify only the ECDSA P-256 half, so the keys must hold one (any PQC partner works)
SUITE = "ML-DSA-65+ECDSA-P256"
CLASSICAL = "ECDSA-P256"
ENTRY_TYPE: Literal["build-attestation"] = "build-attestation"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PREDICATE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "https://qai.local/supplychain/python-wheel/v1"
BUILDER_ID = "https://qai.local/supplychain/attest/v1"
LOCK_FILES = ("requirements.lock", "requirements-dev.lock")
SBOM = "sbom.cdx.json"
STEPS = ("lock", "build", "test", "package")
# never recorded as artifacts: caches and the build's scratch output (the build's products are in dist/)
EXCLUDES = ["*.pyc", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".git", ".venv", "build",
            "*.egg-info", ".qai"]
# fast, dependency-free tests of the trust root (Merkle proofs); the full suite runs in CI
DEFAULT_TESTS = ("tests/test_merkle.py",)
STEP_TIMEOUT = 1800


class SupplyChainError(QaiError):
    pass


def _fail(code: str, message: str, **details: Any) -> SupplyChainError:
    return SupplyChainError(f"supplychain.{code}", message, status=409, details=details)


# -- keys ----------------------------------------------------------------------------------------
def signing_keys(svc: Services) -> tuple[str, str]:
    """The functionary and owner keys (system tenant, created on first use)."""
    from orchestrator.ledger import system_signing_key

    names = []
    for name, subject in ((FUNCTIONARY_KEY, "supplychain"), (OWNER_KEY, "supplychain-owner")):
        system_signing_key(svc.db, svc.kms, name, suite=SUITE, subject=subject, error_code="supplychain.bad_key")
        if CLASSICAL not in svc.kms.public_key(name).suite.split("+"):
            raise QaiError("supplychain.bad_key", f"key {name} has no {CLASSICAL} part for in-toto", status=500)
        names.append(name)
    return names[0], names[1]


def sslib_key(raw_public: bytes) -> Key:
    """The securesystemslib key (``ecdsa-sha2-nistp256``, PEM keyval) of a raw ECDSA P-256 point."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from securesystemslib.signer import SSlibKey  # type: ignore[attr-defined]

    return SSlibKey.from_crypto(ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw_public))


def sslib_keys(doc: KeyDocument) -> dict[str, tuple[int, Key]]:
    """securesystemslib keyid → (KMS version, key) for every version of ``doc``."""
    out: dict[str, tuple[int, Key]] = {}
    for v in doc.versions:
        if CLASSICAL in v.public_keys:
            k = sslib_key(b64decode(v.public_keys[CLASSICAL], what="key"))
            out[k.keyid] = (v.version, k)
    return out


def key_dict(key: Key) -> dict[str, Any]:
    """The dict form in-toto's layout and ``in_toto_verify`` take (securesystemslib's, plus ``keyid``)."""
    return {"keyid": key.keyid, **key.to_dict()}


def _latest_enabled(doc: KeyDocument) -> int:
    versions = [v.version for v in doc.versions if v.state == "enabled"]
    if not versions:
        raise QaiError("kms.no_enabled_version", f"{doc.name} has no enabled version", status=409)
    return max(versions)


def kms_signer(svc: Services, name: str) -> Any:
    """A securesystemslib ``Signer`` whose private key is the KMS key ``name`` (built lazily so that
    importing this module does not need securesystemslib)."""
    from securesystemslib.signer import Signature, Signer  # type: ignore[attr-defined]

    from orchestrator.auth import Principal

    class KmsSigner(Signer):
        """Signs through the KMS: ``sign`` returns the ECDSA P-256 part (what in-toto verifies) and
        keeps the whole hybrid bundle in ``bundles`` so the caller can add the PQC parts."""

        def __init__(self) -> None:
            doc = svc.kms.public_key(name)
            self.version = _latest_enabled(doc)
            by_version = {v: k for v, k in sslib_keys(doc).values()}
            self._key = by_version[self.version]
            self.bundles: dict[bytes, SignatureBundle] = {}

        @classmethod
        def from_priv_key_uri(cls, priv_key_uri: str, public_key: Key, secrets_handler: Any = None) -> Signer:
            raise NotImplementedError("KmsSigner is built from a KMS key name, not a private key URI")

        @property
        def public_key(self) -> Key:
            return self._key

        def sign(self, payload: bytes) -> Signature:
            bundle = svc.kms.sign(name, principal=Principal.system("supplychain"), message=payload)
            self.bundles[payload] = bundle
            part = next(p for p in bundle.parts if p.alg == CLASSICAL)
            if part.version != self.version:
                raise QaiError("supplychain.key_rotated", f"{name} was rotated while signing", status=409)
            return Signature(keyid=self._key.keyid, sig=b64decode(part.signature, what="signature").hex())

    return KmsSigner()


def sign_intoto(metadata: Any, signer: Any) -> bytes:
    """Sign an in-toto DSSE ``Envelope`` (link or layout) through ``signer`` and add the bundle's
    non-classical parts under their KMS keyids; returns the JSON bytes to write."""
    from securesystemslib.signer import Signature  # type: ignore[attr-defined]

    metadata.create_signature(signer)
    bundle = signer.bundles[metadata.pae()]
    for p in bundle.parts:
        if p.alg != CLASSICAL:
            metadata.signatures[p.keyid] = Signature(keyid=p.keyid, sig=b64decode(p.signature, what="sig").hex())
    return json.dumps(metadata.to_dict(), indent=1, sort_keys=True).encode()


def verify_intoto_hybrid(data: bytes, doc: KeyDocument, at: datetime) -> None:
    """Check every suite part of an in-toto envelope signed by :func:`sign_intoto` as one KMS bundle
    of ``doc`` (in-toto itself checked only the ECDSA part)."""
    env = json.loads(data)
    keys = sslib_keys(doc)
    sigs = []
    for s in env.get("signatures", []):
        if s["keyid"] in keys:  # the ECDSA part, under its securesystemslib keyid
            sigs.append({"keyid": keyid(doc.name, keys[s["keyid"]][0], CLASSICAL), "sig": s["sig"]})
        else:
            sigs.append(s)
    verify_envelope(Envelope.model_validate({"payloadType": env["payloadType"], "payload": env["payload"],
                                             "signatures": sigs}), doc, at=at)


# -- the steps -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _cwd_env(path: Path, env: Mapping[str, str]) -> Iterator[None]:
    """in-toto runs a step's command, and records its artifacts, in the current directory."""
    old_cwd, old_env = Path.cwd(), {k: os.environ.get(k) for k in env}
    os.chdir(path)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stage_source(source: Path, dest: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored files of ``source`` (a git work tree)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=source, check=True,
                             capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise QaiError("supplychain.not_a_checkout", f"{source} is not a git work tree", status=422) from exc
    for rel in sorted(p for p in out.decode().split("\0") if p):
        src = source / rel
        if not src.is_file():  # deleted but still tracked
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def source_date_epoch(source: Path) -> int:
    """The commit time of HEAD: the same source always builds with the same timestamps."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        return int(env)
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=source, check=True, capture_output=True,
                             text=True).stdout.strip()
        return int(out)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return 315532800  # 1980-01-01, the earliest time a zip entry can hold


def git_commit(source: Path) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, check=True, capture_output=True,
                              text=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


_REQ = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?==")


def unhashed_requirements(text: str) -> list[str]:
    """The requirements of a lock file that are not pinned with ``==`` and at least one sha256 hash."""
    logical, cur = [], ""
    for line in text.splitlines():
        stripped = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not stripped:
            continue
        cur += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            logical.append(cur.strip())
            cur = ""
    if cur:
        logical.append(cur.strip())
    return [req.split()[0] for req in logical if not req.startswith("-")
            and (not _REQ.match(req) or "--hash=sha256:" not in req)]


def check_locks(paths: Sequence[Path]) -> None:
    for path in paths:
        if not path.is_file():
            raise _fail("lock_missing", f"{path.name} is missing", path=str(path))
        bad = unhashed_requirements(path.read_text())
        if bad:
            raise _fail("lock_unhashed", f"{path.name}: {len(bad)} requirement(s) not pinned with hashes",
                        requirements=bad[:20])


def lock_commands(python: str = sys.executable) -> list[list[str]]:
    """``uv pip compile`` of the runtime and the dev lock files, universal for Python 3.11."""
    common = ["--generate-hashes", "--universal", "--python-version", "3.11", "--quiet",
              "--custom-compile-command", "python -m orchestrator.supplychain lock"]
    return [[python, "-m", "uv", "pip", "compile", "pyproject.toml", *common, "-o", "requirements.lock"],
            [python, "-m", "uv", "pip", "compile", "pyproject.toml", "--extra", "dev", *common,
             "-o", "requirements-dev.lock"]]


@dataclass(frozen=True)
class AttestOptions:
    source: Path
    out: Path
    run_tests: bool = True
    tests: tuple[str, ...] = DEFAULT_TESTS
    relock: bool = False


def _step_commands(opts: AttestOptions) -> dict[str, list[str]]:
    py = sys.executable
    lock = [py, "-m", "orchestrator.supplychain", "lock" if opts.relock else "check-lock"]
    return {
        "lock": lock,
        "build": [py, "-m", "build", "--no-isolation", "--outdir", "dist", "."],
        "test": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *opts.tests],
        "package": [py, "-m", "cyclonedx_py", "requirements", "requirements.lock", "--pyproject", "pyproject.toml",
                    "--of", "JSON", "--output-reproducible", "-o", SBOM],
    }


def _step_artifacts(step: str) -> tuple[list[str], list[str]]:
    return {
        "lock": (["pyproject.toml"], list(LOCK_FILES)),
        "build": (["."], ["dist"]),
        "test": (["."], []),
        "package": (["dist", "requirements.lock", "pyproject.toml"], ["dist", SBOM]),
    }[step]


def layout_for(steps: Sequence[str], functionary: Key, wheel: str, commands: Mapping[str, Sequence[str]],
               expires_days: int = 365) -> Any:
    """The in-toto layout: who may run which step, and how artifacts flow from step to step."""
    from in_toto.models.layout import Inspection, Layout, Step

    rules: dict[str, tuple[list[list[str]], list[list[str]]]] = {
        "lock": ([["ALLOW", "pyproject.toml"], ["DISALLOW", "*"]],
                 [["ALLOW", "requirements.lock"], ["ALLOW", "requirements-dev.lock"], ["DISALLOW", "*"]]),
        # the built source is what lock saw (pyproject and the lock files), plus anything else
        "build": ([["MATCH", "pyproject.toml", "WITH", "MATERIALS", "FROM", "lock"],
                   ["MATCH", "requirements.lock", "WITH", "PRODUCTS", "FROM", "lock"],
                   ["MATCH", "requirements-dev.lock", "WITH", "PRODUCTS", "FROM", "lock"],
                   ["ALLOW", "*"]],
                  [["CREATE", "dist/*.whl"], ["CREATE", "dist/*.tar.gz"], ["DISALLOW", "*"]]),
        # the tests ran on exactly the built source and products
        "test": ([["MATCH", "dist/*", "WITH", "PRODUCTS", "FROM", "build"],
                  ["MATCH", "*", "WITH", "MATERIALS", "FROM", "build"], ["DISALLOW", "*"]],
                 [["DISALLOW", "*"]]),
        "package": ([["MATCH", "dist/*", "WITH", "PRODUCTS", "FROM", "build"],
                     ["MATCH", "requirements.lock", "WITH", "PRODUCTS", "FROM", "lock"],
                     ["MATCH", "pyproject.toml", "WITH", "MATERIALS", "FROM", "lock"], ["DISALLOW", "*"]],
                    [["MATCH", "dist/*", "WITH", "MATERIALS", "FROM", "package"], ["CREATE", SBOM],
                     ["DISALLOW", "*"]]),
    }
    layout = Layout(readme="qai release: lock -> build -> test -> package")
    layout.set_relative_expiration(days=expires_days)
    layout.keys = {functionary.keyid: key_dict(functionary)}
    for step in steps:
        materials, products = rules[step]
        # in-toto only warns when a link's command differs (another interpreter path, say)
        s = Step(name=step, pubkeys=[functionary.keyid], threshold=1, expected_materials=materials,
                 expected_products=products, expected_command=list(commands[step]))
        layout.steps.append(s)
    # The inspection runs on the verifier's copy of the final products (release/): every file there
    # must be exactly what the package step produced, or DISALLOW names it.
    released = [["MATCH", "dist/*", "WITH", "PRODUCTS", "FROM", "package"],
                ["MATCH", SBOM, "WITH", "PRODUCTS", "FROM", "package"], ["DISALLOW", "*"]]
    layout.inspect.append(Inspection(name="release", run=["python3", "-m", "zipfile", "-l", f"dist/{wheel}"],
                                     expected_materials=released, expected_products=released))
    layout.validate()
    return layout


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def attest(svc: Services, opts: AttestOptions) -> dict[str, Any]:
    """Run and record the steps, write layout, links, SBOM and provenance to ``opts.out``, ledger them."""
    from in_toto.models.metadata import Envelope as IntotoEnvelope
    from in_toto.runlib import in_toto_run

    functionary_name, owner_name = signing_keys(svc)
    functionary = kms_signer(svc, functionary_name)
    owner = kms_signer(svc, owner_name)
    out = opts.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise QaiError("supplychain.out_not_empty", f"{out} is not empty", status=409)
    work, links_dir, release = out / "work", out / "links", out / "release"
    for d in (work, links_dir, release / "dist"):
        d.mkdir(parents=True, exist_ok=True)
    source = opts.source.resolve()
    stage_source(source, work)
    epoch = source_date_epoch(source)
    env = {"SOURCE_DATE_EPOCH": str(epoch), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    steps = [s for s in STEPS if s != "test" or opts.run_tests]
    commands = _step_commands(opts)
    started = datetime.now(UTC)
    link_files: dict[str, bytes] = {}
    # in-toto echoes each step's output through sys.stdout; send it to stderr so that stdout stays
    # the command's own result (``--json``)
    with _cwd_env(work, env), contextlib.redirect_stdout(sys.stderr):
        for step in steps:
            materials, products = _step_artifacts(step)
            link = in_toto_run(step, materials, products, commands[step], record_streams=True,
                               exclude_patterns=EXCLUDES, use_dsse=True, timeout=STEP_TIMEOUT)
            ret = link.get_payload().byproducts.get("return-value")
            if ret != 0:
                stream = link.get_payload().byproducts
                raise QaiError("supplychain.step_failed", f"step {step} exited with {ret}", status=500,
                               details={"step": step, "stdout": stream.get("stdout", "")[-2000:],
                                        "stderr": stream.get("stderr", "")[-2000:]})
            link_files[f"{step}.{functionary.public_key.keyid[:8]}.link"] = sign_intoto(link, functionary)
    finished = datetime.now(UTC)
    dist = sorted((work / "dist").iterdir())
    wheels = [p for p in dist if p.suffix == ".whl"]
    if len(wheels) != 1:
        raise QaiError("supplychain.step_failed", f"build made {len(wheels)} wheels", status=500)
    for p in dist:
        shutil.copy2(p, release / "dist" / p.name)
    shutil.copy2(work / SBOM, release / SBOM)
    for name, data in link_files.items():
        (links_dir / name).write_bytes(data)

    layout = IntotoEnvelope.from_signable(layout_for(steps, functionary.public_key, wheels[0].name, commands))
    layout_bytes = sign_intoto(layout, owner)
    (out / "root.layout").write_bytes(layout_bytes)

    subjects = {p.name: _sha256(p) for p in dist}
    byproducts = {"root.layout": layout_bytes, **{f"links/{n}": d for n, d in link_files.items()}}
    stmt = provenance_statement(subjects, source=source, work=work, epoch=epoch, steps=steps, commands=commands,
                                byproducts=byproducts, sbom_sha=_sha256(release / SBOM), started=started,
                                finished=finished)
    payload = json.dumps(stmt, sort_keys=True, separators=(",", ":")).encode()
    from orchestrator.auth import Principal

    bundle = svc.kms.sign(functionary_name, principal=Principal.system("supplychain"),
                          message=pae(PAYLOAD_TYPE, payload))
    prov = envelope_bytes(envelope_from_bundle(PAYLOAD_TYPE, payload, bundle))
    (out / "provenance.dsse.json").write_bytes(prov)

    files = {"root.layout": layout_bytes, **{f"links/{n}": d for n, d in link_files.items()},
             "provenance.dsse.json": prov}
    ledgered = _ledger(svc, files)
    index = {"version": 1, "functionary_key": functionary_name, "owner_key": owner_name, "steps": steps,
             "wheel": wheels[0].name, "subjects": subjects, "source_date_epoch": epoch, "files": ledgered}
    (out / "attestation.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(work)  # what was built and attested is in release/; the scratch tree is not needed
    return index


def provenance_statement(subjects: Mapping[str, str], *, source: Path, work: Path, epoch: int, steps: Sequence[str],
                         commands: Mapping[str, Sequence[str]], byproducts: Mapping[str, bytes], sbom_sha: str,
                         started: datetime, finished: datetime) -> dict[str, Any]:
    """An SLSA v1 provenance statement (in-toto Statement v1) for the built wheel and sdist."""
    from importlib.metadata import version

    commit = git_commit(source)
    deps = [{"uri": f"file:{name}", "digest": {"sha256": _sha256(work / name)}} for name in LOCK_FILES]
    if commit:
        deps.insert(0, {"uri": "git+file:qai", "digest": {"gitCommit": commit}})
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": n, "digest": {"sha256": s}} for n, s in sorted(subjects.items())],
        "predicateType": SLSA_PREDICATE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"source": {"commit": commit}, "steps": list(steps),
                                       "sourceDateEpoch": epoch},
                "internalParameters": {"commands": {s: list(commands[s]) for s in steps},
                                       "python": platform.python_version(),
                                       "setuptools": version("setuptools"), "build": version("build")},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"in-toto": version("in-toto")}},
                "metadata": {"invocationId": f"{started.strftime('%Y%m%dT%H%M%S%fZ')}-{commit or 'nogit'}",
                             "startedOn": started.isoformat(), "finishedOn": finished.isoformat()},
                "byproducts": [{"name": n, "digest": {"sha256": hashlib.sha256(d).hexdigest()}}
                               for n, d in sorted(byproducts.items())]
                              + [{"name": SBOM, "digest": {"sha256": sbom_sha}},],
            },
        },
    }


def _ledger(svc: Services, files: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    """Store each file content-addressed and ledger them all in one write."""
    at = datetime.now(UTC)
    entries = []
    for _name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        path = f"supplychain/{sha}.json"
        put_once(svc.objects, path, data)
        entries.append(LedgerEntry(type=ENTRY_TYPE, sha256=sha, path=path, tenant=SYSTEM_TENANT, time=at))
    appended = svc.ledger.append(entries)
    return {name: {"sha256": e.sha256, "path": e.path, "ledger_index": e.index}
            for name, e in zip(files, appended, strict=True)}


# -- verification --------------------------------------------------------------------------------
def _check_ledgered(svc: Services, out: Path, name: str, rec: Mapping[str, Any]) -> tuple[bytes, datetime]:
    data = (out / name).read_bytes() if (out / name).is_file() else None
    if data is None:
        raise _fail("missing", f"{name} is missing", file=name)
    entry = svc.ledger.entry(int(rec["ledger_index"]))
    if entry.type != ENTRY_TYPE or entry.sha256 != rec["sha256"] or entry.path != rec["path"]:
        raise _fail("not_ledgered", f"ledger entry {rec['ledger_index']} is not the attestation {name}", file=name)
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise _fail("tampered", f"{name} differs from its ledgered digest", file=name)
    return data, entry.time


def verify(svc: Services, out: Path) -> dict[str, Any]:
    """Verify an ``attest`` output directory; raises ``supplychain.*`` naming the first failure."""
    from in_toto.models.metadata import Metadata
    from in_toto.verifylib import in_toto_verify

    out = out.resolve()
    try:
        index = json.loads((out / "attestation.json").read_text())
    except (OSError, ValueError) as exc:
        raise _fail("missing", f"{out}/attestation.json is missing or unreadable") from exc
    func_doc = svc.kms.public_key(index["functionary_key"])
    owner_doc = svc.kms.public_key(index["owner_key"])
    files = index["files"]
    expected = {"root.layout", "provenance.dsse.json"} | {n for n in files if n.startswith("links/")}
    if set(files) != expected or len(expected) != len(index["steps"]) + 2:
        raise _fail("incomplete", "attestation.json does not list the layout, one link per step and the provenance")
    checked: dict[str, bytes] = {}
    for name, rec in sorted(files.items()):
        data, at = _check_ledgered(svc, out, name, rec)
        if name != "provenance.dsse.json":
            # both halves of the KMS signature; in-toto below checks the ECDSA half on its own
            verify_intoto_hybrid(data, owner_doc if name == "root.layout" else func_doc, at)
        checked[name] = data
    # in-toto: the owner's key, as the KMS holds it, verifies the layout; the layout's functionary
    # key verifies the links; the inspection re-hashes release/.
    layout_env = json.loads(checked["root.layout"])
    owner_keys = sslib_keys(owner_doc)
    signed_by = [s["keyid"] for s in layout_env["signatures"] if s["keyid"] in owner_keys]
    if not signed_by:
        raise _fail("intoto_failed", f"root.layout is not signed by {owner_doc.name}")
    layout_keys = {k: key_dict(owner_keys[k][1]) for k in signed_by}
    try:
        with _cwd_env(out / "release", {}):
            in_toto_verify(Metadata.load(str(out / "root.layout")), layout_keys, link_dir_path=str(out / "links"),
                           persist_inspection_links=False)
    except Exception as exc:  # in-toto raises many unrelated types; every one is a failed verification
        raise _fail("intoto_failed", f"in-toto verification failed: {type(exc).__name__}: {exc}",
                    error=type(exc).__name__) from exc
    # provenance
    env = parse_envelope(checked["provenance.dsse.json"])
    prov_at = svc.ledger.entry(int(files["provenance.dsse.json"]["ledger_index"])).time
    verify_envelope(env, func_doc, at=prov_at)
    stmt = json.loads(env.payload_bytes())
    if stmt.get("_type") != STATEMENT_TYPE or stmt.get("predicateType") != SLSA_PREDICATE:
        raise _fail("provenance_invalid", "provenance is not an SLSA v1 in-toto statement")
    for s in stmt["subject"]:
        path = out / "release" / "dist" / s["name"]
        if not path.is_file() or _sha256(path) != s["digest"]["sha256"]:
            raise _fail("provenance_mismatch", f"release/dist/{s['name']} does not match its provenance",
                        artifact=s["name"])
    return {"verified": True, "steps": index["steps"], "wheel": index["wheel"],
            "subjects": {s["name"]: s["digest"]["sha256"] for s in stmt["subject"]},
            "ledger": {n: r["ledger_index"] for n, r in sorted(files.items())}}


def _main(argv: Sequence[str]) -> int:
    """The lock step's command (``python -m orchestrator.supplychain check-lock|lock``), run by in-toto."""
    cmd = argv[0] if argv else "check-lock"
    if cmd == "lock":
        for c in lock_commands():
            subprocess.run(c, check=True)
    elif cmd != "check-lock":
        print(f"unknown command {cmd}", file=sys.stderr)
        return 2
    try:
        check_locks([Path(p) for p in LOCK_FILES])
    except QaiError as err:
        print(f"{err.code}: {err}", file=sys.stderr)
        return 1
    print("lock files pinned with hashes")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
