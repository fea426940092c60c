"""Run-manifests: the signed description of one quantum job (SPEC-001 Must 3).

A manifest's bytes are its RFC 8785 canonical JSON, and nothing else is ever signed or verified: a
payload that is not already in canonical form is rejected (``manifest.not_canonical``), so one
manifest has exactly one byte string. A signed manifest is a DSSE envelope with payloadType
:data:`PAYLOAD_TYPE`, one DSSE signature per algorithm of the signing key's suite.

``crypto_mode`` says what must sign a manifest: ``classical`` (any suite), ``hybrid`` (a PQC and a
classical algorithm) or ``pqc-required`` (at least one PQC algorithm). It is checked against the
algorithms that actually verified, not against what the manifest claims.

Input may be JSON or YAML. YAML goes through a safe loader that refuses anchors and aliases (no
alias bombs), and both are limited in size and nesting depth.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdk.algorithms import get_algorithm
from sdk.canonical import canonical_json
from sdk.dsse import Envelope, envelope_from_bundle, pae, parse_envelope, verify_envelope
from sdk.errors import QaiError, VerificationError
from sdk.signing import KeyDocument, KeyVersionDocument, SignatureBundle, parse_keyid, parse_suite

PAYLOAD_TYPE = "application/vnd.qai.run-manifest.v1+json"
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_DEPTH = 32
CryptoMode = Literal["classical", "hybrid", "pqc-required"]
PriorityClass = Literal["critical", "essential", "standard", "background"]
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")
_TENANT = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def qasm_sha256(qasm: str) -> str:
    return "sha256:" + hashlib.sha256(qasm.encode()).hexdigest()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Circuit(_Strict):
    """The program: inline OpenQASM text, or its hash and where it is stored."""

    format: Literal["openqasm3", "openqasm2"] = "openqasm3"
    qasm: str | None = Field(default=None, max_length=512 * 1024)
    sha256: str | None = None
    path: str | None = Field(default=None, max_length=512)

    @model_validator(mode="after")
    def _one_form(self) -> Circuit:
        if self.qasm is None and (self.sha256 is None or self.path is None):
            raise ValueError("a circuit needs qasm, or sha256 and path")
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ValueError("circuit sha256 must be 'sha256:' and 64 lower-case hex digits")
        if self.qasm is not None and self.sha256 is not None and qasm_sha256(self.qasm) != self.sha256:
            raise ValueError("circuit sha256 does not match its qasm")
        return self

    @property
    def digest(self) -> str:
        return self.sha256 or qasm_sha256(self.qasm or "")


class SLA(_Strict):
    deadline: datetime | None = None
    max_latency_seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some(self) -> SLA:
        if self.deadline is None and self.max_latency_seconds is None:
            raise ValueError("an SLA needs a deadline or max_latency_seconds")
        return self


class RunManifest(_Strict):
    job_id: uuid.UUID
    tenant: str
    backend_id: str | None = Field(default=None, max_length=128)
    pqc_suite: str = Field(description="the suite that signs this manifest, e.g. ML-DSA-65+ECDSA-P256")
    crypto_mode: CryptoMode
    calibration_snapshot_id: str | None = Field(default=None, max_length=128)
    em_method: str = Field(min_length=1, max_length=64)
    em_version: str = Field(min_length=1, max_length=32)
    seed: int = Field(ge=0, lt=2**53, description="below 2**53: RFC 8785 numbers are IEEE doubles")
    created_at: datetime
    artifact_hash: str = Field(description="sha256:<hex> of the circuit's QASM")
    circuit: Circuit
    shots: int = Field(ge=1, le=10**8)
    shot_budget: int | None = Field(default=None, ge=1)
    sla: SLA | None = None
    priority_class: PriorityClass = "standard"
    sdk_version: str = Field(min_length=1, max_length=32)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str) -> str:
        if not _TENANT.match(v):
            raise ValueError("tenant names are 1-64 chars of a-z, 0-9 and '-'")
        return v

    @field_validator("pqc_suite")
    @classmethod
    def _suite(cls, v: str) -> str:
        parse_suite(v)
        return v

    @field_validator("created_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("created_at must carry a timezone")
        return v

    @field_validator("artifact_hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        if not _SHA256.match(v):
            raise ValueError("artifact_hash must be 'sha256:' and 64 lower-case hex digits")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if not (0 < len(k) <= 64) or len(val) > 256:
                raise ValueError("label keys are 1-64 chars and values at most 256")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RunManifest:
        if self.artifact_hash != self.circuit.digest:
            raise ValueError("artifact_hash must be the sha256 of the circuit")
        if self.shot_budget is not None and self.shot_budget < self.shots:
            raise ValueError("shot_budget must be at least shots")
        return self

    def to_bytes(self) -> bytes:
        """The RFC 8785 bytes that are signed."""
        return canonical_json(self.model_dump(mode="json", exclude_none=True))


# --- parsing ---------------------------------------------------------------------------------------

class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without anchors or aliases: an alias bomb has nothing to expand."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise QaiError("yaml.alias_forbidden", "YAML anchors and aliases are not accepted",
                           details={"line": event.start_mark.line + 1})
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if getattr(event, "anchor", None):
            raise QaiError("yaml.alias_forbidden", "YAML anchors and aliases are not accepted",
                           details={"line": event.start_mark.line + 1})
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise QaiError("input.too_deep", f"nesting deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        raise QaiError("input.too_deep", f"nesting deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def load_document(data: bytes, *, max_bytes: int = MAX_MANIFEST_BYTES) -> Any:
    """JSON or YAML bytes → Python data, within the size and depth limits."""
    if len(data) > max_bytes:
        raise QaiError("input.too_large", f"document over {max_bytes} bytes", status=413)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QaiError("input.not_utf8", "document is not UTF-8", details={"offset": exc.start}) from exc
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise QaiError("input.malformed_json", f"not valid JSON: {exc}") from exc
    else:
        try:
            value = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise QaiError("input.malformed_yaml", f"not valid YAML: {str(exc).splitlines()[0]}") from exc
    _depth(value)
    return value


def _invalid(exc: ValidationError, code: str) -> QaiError:
    errors = [{"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]}
              for e in exc.errors()[:20]]
    return QaiError(code, "document does not match the run-manifest schema", status=422,
                    details={"errors": errors})


def parse_manifest(data: bytes | Mapping[str, Any]) -> RunManifest:
    """A manifest from JSON/YAML bytes or a mapping; unknown fields are refused."""
    value = load_document(data) if isinstance(data, bytes) else data
    try:
        return RunManifest.model_validate(value)
    except ValidationError as exc:
        raise _invalid(exc, "manifest.invalid") from exc


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # QASM reads best as a literal block; trailing spaces would force the quoted style
    style = "|" if "\n" in data and not any(line.endswith(" ") for line in data.split("\n")) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(manifest: RunManifest) -> str:
    return yaml.dump(manifest.model_dump(mode="json", exclude_none=True), Dumper=_Dumper, sort_keys=True)


# --- signing and verification ----------------------------------------------------------------------

def sign_manifest(manifest: RunManifest, sign: Callable[[bytes], SignatureBundle]) -> Envelope:
    """Wrap ``manifest`` in a DSSE envelope; ``sign`` signs the PAE bytes (e.g. through the KMS API)."""
    payload = manifest.to_bytes()
    bundle = sign(pae(PAYLOAD_TYPE, payload))
    if bundle.suite != manifest.pqc_suite:
        raise QaiError("manifest.suite_mismatch", f"signed with {bundle.suite}, manifest says {manifest.pqc_suite}")
    return envelope_from_bundle(PAYLOAD_TYPE, payload, bundle)


def check_crypto_mode(mode: str, algorithms: list[str]) -> None:
    """Raise unless the verified ``algorithms`` satisfy ``mode``."""
    if mode not in ("classical", "hybrid", "pqc-required"):  # an unknown mode must not pass as no requirement
        raise VerificationError("manifest.bad_crypto_mode", f"unknown crypto mode {mode!r}", details={"mode": mode})
    pqc = [a for a in algorithms if get_algorithm(a).pqc]
    classical = [a for a in algorithms if not get_algorithm(a).pqc]
    if mode == "pqc-required" and not pqc:
        raise VerificationError("manifest.downgrade", "crypto_mode pqc-required needs a PQC signature",
                                details={"algorithms": algorithms})
    if mode == "hybrid" and not (pqc and classical):
        raise VerificationError("manifest.downgrade", "crypto_mode hybrid needs a PQC and a classical signature",
                                details={"algorithms": algorithms})


@dataclass(frozen=True)
class VerifiedManifest:
    manifest: RunManifest
    envelope: Envelope
    key: KeyDocument
    version: KeyVersionDocument


def verify_manifest(envelope: Envelope | bytes, keys: KeyDocument | Mapping[str, KeyDocument]) -> VerifiedManifest:
    """Verify a signed manifest with public keys only.

    Checks, in order: the envelope and payload type; the payload is a valid manifest in canonical
    form; every signature of the suite verifies with the key version valid at ``created_at``; the
    key belongs to the manifest's tenant; the suite is the manifest's ``pqc_suite``; and the
    verified algorithms satisfy ``crypto_mode``.
    """
    env = parse_envelope(envelope) if isinstance(envelope, bytes) else envelope
    if env.payload_type != PAYLOAD_TYPE:
        raise VerificationError("manifest.wrong_payload_type", f"payloadType is {env.payload_type!r}",
                                details={"expected": PAYLOAD_TYPE})
    payload = env.payload_bytes()
    manifest = parse_manifest(payload)
    if manifest.to_bytes() != payload:
        raise VerificationError("manifest.not_canonical", "the payload is not the RFC 8785 form of the manifest")
    name = parse_keyid(env.signatures[0].keyid)[0]
    key = keys if isinstance(keys, KeyDocument) else keys.get(name)
    if key is None or key.name != name:
        raise VerificationError("signature.unknown_key", f"no trusted key named {name!r}", details={"key": name})
    if key.tenant != manifest.tenant:
        raise VerificationError("manifest.wrong_tenant", f"signed by {name} of tenant {key.tenant}, "
                                f"manifest is for {manifest.tenant}", details={"key": name})
    version = verify_envelope(env, key, at=manifest.created_at)
    if key.suite != manifest.pqc_suite:
        raise VerificationError("manifest.suite_mismatch", f"signed with {key.suite}, manifest says "
                                f"{manifest.pqc_suite}", details={"suite": key.suite})
    check_crypto_mode(manifest.crypto_mode, list(parse_suite(key.suite)))
    return VerifiedManifest(manifest, env, key, version)


def new_manifest(*, tenant: str, qasm: str, shots: int, pqc_suite: str = "ML-DSA-65+ECDSA-P256",
                 crypto_mode: CryptoMode = "hybrid", em_method: str = "none", em_version: str = "-",
                 seed: int | None = None, job_id: uuid.UUID | None = None, created_at: datetime | None = None,
                 **fields: Any) -> RunManifest:
    """A manifest for ``qasm`` with a fresh job id, the current time and the circuit's hash.

    ``seed`` defaults to a random 52-bit value; it is recorded so the run can be replayed.
    """
    import secrets
    from datetime import UTC

    from sdk import __version__

    return RunManifest.model_validate({
        "job_id": job_id or uuid.uuid4(), "tenant": tenant, "pqc_suite": pqc_suite, "crypto_mode": crypto_mode,
        "em_method": em_method, "em_version": em_version,
        "seed": secrets.randbits(52) if seed is None else seed,
        "created_at": created_at or datetime.now(UTC), "artifact_hash": qasm_sha256(qasm),
        "circuit": {"qasm": qasm, "format": "openqasm3"}, "shots": shots, "sdk_version": __version__, **fields,
    })
