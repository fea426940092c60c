"""Ledger checkpoints: C2SP ``tlog-checkpoint`` bodies in C2SP ``signed-note`` envelopes.

A checkpoint body is (c2sp.org/tlog-checkpoint)::

    <origin>\\n
    <tree size, decimal>\\n
    <root hash, base64>\\n
    timestamp <RFC 3339, UTC, microseconds>\\n      (an extension line)

A signed note is the body, an empty line, then one signature line per signature
(c2sp.org/signed-note)::

    — <key name> <base64(key hash[4] ‖ signature)>\\n

qai signs a checkpoint with a KMS hybrid suite: one line per algorithm part, the key name being the
part's keyid ``name@version/alg``. Verification requires every part of the trusted key's suite,
over exactly the body bytes. Lines from other keys (witness cosignatures) are ignored, as the
signed-note spec says. The key hash is ``SHA-256(key name ‖ 0x0A ‖ 0xFF ‖ "qai/" alg ‖ public
key)[:4]``; 0xFF is signed-note's type for signature schemes it does not itself define.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from sdk.errors import QaiError, VerificationError
from sdk.signing import (
    KeyDocument,
    KeyVersionDocument,
    SignatureBundle,
    SignaturePart,
    b64encode,
    parse_keyid,
    verify_bundle,
)

_SIG_LINE = re.compile(r"^\u2014 (\S+) ([A-Za-z0-9+/=]+)$")
_ORIGIN = re.compile(r"[^\s+][^\x00-\x1f\x7f]*")


def _bad(message: str) -> QaiError:
    return QaiError("checkpoint.malformed", message)


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> datetime:
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError as exc:
        raise _bad(f"bad timestamp {value!r}") from exc


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    timestamp: datetime

    def body(self) -> bytes:
        """The exact bytes that are signed."""
        if not _ORIGIN.fullmatch(self.origin):
            raise _bad("origin must be one non-empty line not starting with space or '+'")
        return (f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"
                f"timestamp {format_time(self.timestamp)}\n").encode()

    @classmethod
    def parse_body(cls, body: bytes) -> Checkpoint:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad("checkpoint is not UTF-8") from exc
        if not text.endswith("\n"):
            raise _bad("checkpoint body must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise _bad("checkpoint needs origin, size and root hash lines")
        origin, size_s, root_s, *ext = lines
        if not re.fullmatch(r"0|[1-9][0-9]{0,19}", size_s):
            raise _bad(f"bad tree size {size_s!r}")
        try:
            root = base64.b64decode(root_s, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad("root hash is not base64") from exc
        if len(root) != 32:
            raise _bad("root hash must be 32 bytes")
        stamps = [e[len("timestamp "):] for e in ext if e.startswith("timestamp ")]
        if len(stamps) != 1:
            raise _bad("checkpoint needs exactly one timestamp extension line")
        cp = cls(origin=origin, size=int(size_s), root=root, timestamp=parse_time(stamps[0]))
        if cp.body() != body:
            raise _bad("checkpoint body is not in canonical form")
        return cp


@dataclass(frozen=True)
class NoteSignature:
    name: str
    key_hash: bytes
    signature: bytes


def key_hash(name: str, alg: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n\xff" + f"qai/{alg}".encode() + public_key).digest()[:4]


def format_note(body: bytes, signatures: list[NoteSignature]) -> str:
    lines = [f"\u2014 {s.name} {b64encode(s.key_hash + s.signature)}\n" for s in signatures]
    return body.decode() + "\n" + "".join(lines)


def parse_note(note: str) -> tuple[bytes, list[NoteSignature]]:
    """Split a signed note into its body bytes and signature lines (c2sp.org/signed-note)."""
    head, sep, tail = note.rpartition("\n\n")
    if not sep or not tail.endswith("\n"):
        raise _bad("signed note needs a body, an empty line and signature lines")
    sigs = []
    for line in tail[:-1].split("\n"):
        m = _SIG_LINE.match(line)
        if m is None:
            raise _bad(f"malformed signature line {line[:80]!r}")
        try:
            raw = base64.b64decode(m.group(2), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad("signature line is not base64") from exc
        if len(raw) < 5:
            raise _bad("signature line too short")
        sigs.append(NoteSignature(m.group(1), raw[:4], raw[4:]))
    return (head + "\n").encode(), sigs


def sign_lines(bundle: SignatureBundle, key: KeyDocument) -> list[NoteSignature]:
    """Signature lines for a KMS bundle made over a checkpoint body."""
    version = key.version(bundle.parts[0].version)
    out = []
    for p in bundle.parts:
        pub = base64.b64decode(version.public_keys[p.alg])
        out.append(NoteSignature(p.keyid, key_hash(p.keyid, p.alg, pub), base64.b64decode(p.signature)))
    return out


@dataclass(frozen=True)
class SignedCheckpoint:
    checkpoint: Checkpoint
    note: str


def verify_checkpoint(note: str, keys: KeyDocument | Mapping[str, KeyDocument], *,
                      origin: str | None = None) -> SignedCheckpoint:
    """Parse ``note`` and verify it is signed by every suite part of one trusted key version.

    The key version must be valid at the checkpoint's own timestamp.
    """
    body, sigs = parse_note(note)
    cp = Checkpoint.parse_body(body)
    if origin is not None and cp.origin != origin:
        raise VerificationError("checkpoint.wrong_origin", f"checkpoint is for {cp.origin!r}, not {origin!r}",
                                details={"origin": cp.origin, "expected": origin})
    trusted = {keys.name: keys} if isinstance(keys, KeyDocument) else dict(keys)
    by_version: dict[tuple[str, int], list[SignaturePart]] = {}
    for s in sigs:
        try:
            name, number, alg = parse_keyid(s.name)
        except QaiError:
            continue  # another signer's line (a witness): not ours to judge
        key = trusted.get(name)
        if key is None:
            continue
        version: KeyVersionDocument | None = next((v for v in key.versions if v.version == number), None)
        pub = version.public_keys.get(alg) if version else None
        try:
            if pub is None or s.key_hash != key_hash(s.name, alg, base64.b64decode(pub, validate=True)):
                continue
        except (binascii.Error, ValueError):
            continue  # a malformed trusted key document cannot vouch for anything
        by_version.setdefault((name, number), []).append(
            SignaturePart(key_name=name, version=number, alg=alg, signature=b64encode(s.signature)))
    if not by_version:
        raise VerificationError("checkpoint.untrusted", "no signature on the checkpoint is from a trusted key",
                                details={"signers": [s.name for s in sigs]})
    last: VerificationError | None = None
    for (name, _), parts in by_version.items():
        # A relay can append extra lines under our key name; try each candidate per algorithm
        # (a few at most) rather than letting a junk duplicate veto a valid checkpoint.
        per_alg: dict[str, list[SignaturePart]] = {}
        for part in parts:
            per_alg.setdefault(part.alg, []).append(part)
        for combo in itertools.islice(itertools.product(*(c[:4] for c in per_alg.values())), 64):
            bundle = SignatureBundle(suite=trusted[name].suite, parts=list(combo), signed_at=cp.timestamp)
            try:
                verify_bundle(bundle, body, trusted[name], at=cp.timestamp)
                return SignedCheckpoint(cp, note)
            except VerificationError as exc:
                last = exc
    assert last is not None
    raise VerificationError("checkpoint.bad_signature", f"checkpoint signature does not verify: {last.message}",
                            details={"reason": last.code, **last.details})
