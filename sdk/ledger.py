"""Ledger entries and receipts: what the log commits to, and how a client checks it was logged.

An **entry** is a typed record: entry type, SHA-256 of the signed envelope or artifact, its
object-store path, tenant and time. Its bytes are the RFC 8785 canonical JSON of those five fields
and its leaf hash is ``SHA-256(0x00 ‖ bytes)`` (RFC 9162 §2.1.1). The entry index is the leaf's
position, not a field: reordering entries changes the tree.

A **receipt** is what a write API returns: the entry, its index and leaf hash, and, once a
checkpoint covers it, that signed checkpoint with an inclusion proof to its root.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sdk import merkle
from sdk.canonical import canonical_json
from sdk.checkpoint import SignedCheckpoint, format_time, verify_checkpoint
from sdk.errors import VerificationError
from sdk.signing import KeyDocument

EntryType = Literal[
    "run-manifest",
    "scheduler-decision",
    "em-result",
    "dataset",
    "model-version",
    "kms-audit-checkpoint",
    "build-attestation",
    "lineage",  # an in-toto Statement of a nightly pipeline step (em_policy.nightly.lineage)
]
SYSTEM_TENANT = "qai"  # the platform's own tenant: only its key signs checkpoints
ENTRY_TYPES: tuple[str, ...] = EntryType.__args__  # type: ignore[attr-defined]
# Entry types whose object is a DSSE envelope; the others (datasets) are plain artifacts.
ENVELOPE_TYPES = frozenset(ENTRY_TYPES) - {"dataset"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class LedgerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: EntryType
    sha256: str = Field(description="hex SHA-256 of the object")
    path: str = Field(min_length=1, max_length=512, description="object-store key")
    tenant: str = Field(min_length=1, max_length=64)
    time: datetime

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _HEX64.match(v):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        return v

    @field_validator("time")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("time must carry a timezone")
        return v

    def to_bytes(self) -> bytes:
        return canonical_json({"type": self.type, "sha256": self.sha256, "path": self.path,
                               "tenant": self.tenant, "time": format_time(self.time)})

    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.to_bytes())


class IndexedEntry(LedgerEntry):
    index: int = Field(ge=0)
    leaf: str = Field(description="hex leaf hash, as stored")

    def entry(self) -> LedgerEntry:
        return LedgerEntry.model_validate(self.model_dump(exclude={"index", "leaf"}))

    def to_bytes(self) -> bytes:
        return self.entry().to_bytes()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Receipt(BaseModel):
    """Proof that an entry was appended; complete once a checkpoint covers it."""

    model_config = ConfigDict(extra="forbid")

    index: int
    leaf_hash: str
    entry: LedgerEntry
    checkpoint: str | None = Field(default=None, description="signed note of a covering checkpoint")
    tree_size: int | None = None
    inclusion_proof: list[str] = Field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.checkpoint is not None


def verify_receipt(receipt: Receipt | Mapping[str, Any], keys: KeyDocument | Mapping[str, KeyDocument], *,
                   origin: str | None = None) -> SignedCheckpoint:
    """Check a receipt end to end: leaf hash, checkpoint signature, inclusion proof."""
    try:
        r = receipt if isinstance(receipt, Receipt) else Receipt.model_validate(receipt)
        proof = [bytes.fromhex(p) for p in r.inclusion_proof]
    except (ValidationError, ValueError) as exc:
        raise VerificationError("receipt.malformed", f"not a ledger receipt: {str(exc).splitlines()[0]}") from exc
    leaf = r.entry.leaf_hash()
    if leaf.hex() != r.leaf_hash:
        raise VerificationError("receipt.leaf_mismatch", "the receipt's leaf hash is not its entry's",
                                details={"index": r.index})
    if r.checkpoint is None:
        raise VerificationError("receipt.pending", "no checkpoint covers this entry yet; fetch the receipt again",
                                details={"index": r.index})
    signed = verify_checkpoint(r.checkpoint, keys, origin=origin)
    if r.tree_size != signed.checkpoint.size:
        raise VerificationError("receipt.size_mismatch", "receipt tree size is not the checkpoint's",
                                details={"index": r.index})
    merkle.verify_inclusion(r.index, signed.checkpoint.size, leaf, proof, signed.checkpoint.root)
    return signed
