"""REST router of the ledger (``/v1/ledger/...``). Thin: the logic is in :mod:`orchestrator.ledger`.

Checkpoints, proofs and the checkpoint key are readable by any authenticated caller; entries and
their objects by auditors and admins, or by a tenant for its own entries.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.auth import PLATFORM_ROLES, Principal, Role
from orchestrator.db import utcnow
from orchestrator.http import PrincipalDep, ServicesDep
from orchestrator.ledger import Ledger, LedgerCheckpointRow
from sdk.dsse import parse_envelope, verify_envelope
from sdk.errors import QaiError
from sdk.ledger import ENVELOPE_TYPES, EntryType, IndexedEntry, Receipt
from sdk.signing import KeyDocument, b64decode, b64encode, parse_keyid

router = APIRouter(prefix="/v1/ledger", tags=["ledger"])
MAX_PAGE = 1000
MAX_INDEX = 2**48  # node ids reserve 48 bits for the index; larger numbers are never valid


class CheckpointOut(BaseModel):
    tree_size: int
    root_hash: str = Field(description="hex")
    timestamp: datetime
    key_name: str
    key_version: int
    note: str = Field(description="C2SP signed note: the tlog-checkpoint body and its signature lines")


def _checkpoint(row: LedgerCheckpointRow) -> CheckpointOut:
    return CheckpointOut(tree_size=row.size, root_hash=row.root, timestamp=row.at, key_name=row.key_name,
                         key_version=row.key_version, note=row.note)


class EntryOut(IndexedEntry):
    object: str | None = Field(default=None, description="base64 of the object, when asked for")


class EntriesOut(BaseModel):
    tree_size: int
    entries: list[EntryOut]


class AppendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: EntryType
    tenant: str
    object: str = Field(description="base64 of the object; a DSSE envelope for every type but dataset")


class InclusionOut(BaseModel):
    index: int
    tree_size: int
    leaf_hash: str
    proof: list[str]


class ConsistencyOut(BaseModel):
    first: int
    second: int
    proof: list[str]


def _require_reader(p: Principal, tenant: str | None = None) -> None:
    if p.role in PLATFORM_ROLES or (tenant is not None and p.tenant == tenant):
        return
    raise QaiError("auth.forbidden", "reading ledger entries needs the auditor or admin role", status=403,
                   details={"needed": [Role.AUDITOR.value, Role.ADMIN.value]})


@router.get("/checkpoint", response_model=CheckpointOut, summary="Latest signed checkpoint")
def latest_checkpoint(svc: ServicesDep, _: PrincipalDep) -> CheckpointOut:
    row = svc.ledger.latest_checkpoint_row()
    if row is None:
        raise QaiError("ledger.no_checkpoint", "the ledger has no checkpoint yet", status=404)
    return _checkpoint(row)


@router.get("/checkpoints", summary="Checkpoint history from a tree size on")
def checkpoints(svc: ServicesDep, _: PrincipalDep, since: int = Query(0, ge=0, le=MAX_INDEX),
                limit: int = Query(MAX_PAGE, ge=1, le=MAX_PAGE)) -> dict[str, list[CheckpointOut]]:
    return {"checkpoints": [_checkpoint(r) for r in svc.ledger.checkpoints(since, limit)]}


@router.get("/key", response_model=KeyDocument, summary="Public key document of the checkpoint key")
def checkpoint_key(svc: ServicesDep, _: PrincipalDep) -> KeyDocument:
    return svc.ledger.checkpoint_key(refresh=True)  # current versions and revocations


@router.get("/entries", response_model=EntriesOut, summary="Entries [start, end), optionally with objects")
def entries(svc: ServicesDep, p: PrincipalDep, start: int = Query(0, ge=0, le=MAX_INDEX),
            end: int | None = Query(None, ge=0, le=MAX_INDEX),
            objects: bool = False) -> EntriesOut:
    _require_reader(p)
    size = svc.ledger.size()
    end = min(size, start + MAX_PAGE) if end is None else end
    if end < start or end - start > MAX_PAGE:
        raise QaiError("ledger.bad_range", f"need start <= end and at most {MAX_PAGE} entries", status=400,
                       details={"start": start, "end": end})
    out = []
    for e in svc.ledger.entries(start, end):
        obj = b64encode(_object(svc.ledger, e)) if objects else None
        out.append(EntryOut(**e.model_dump(), object=obj))
    return EntriesOut(tree_size=size, entries=out)


def _object(ledger: Ledger, e: IndexedEntry) -> bytes:
    try:
        return ledger.object_bytes(e.path)
    except QaiError as exc:
        if exc.code != "object.not_found":
            raise
        return b""  # reported by the auditor as a mismatch, not hidden by an error page


@router.get("/entries/{index}/object", summary="The stored object of one entry")
def entry_object(svc: ServicesDep, p: PrincipalDep, index: int = Path(ge=0, le=MAX_INDEX)) -> Response:
    e = svc.ledger.entry(index)
    _require_reader(p, e.tenant)
    return Response(svc.ledger.object_bytes(e.path), media_type="application/octet-stream")


@router.post("/entries", response_model=Receipt, status_code=201,
             summary="Ledger an object (signed envelope or dataset); returns a receipt")
def append(req: AppendRequest, svc: ServicesDep, p: PrincipalDep) -> Receipt:
    p.require(req.tenant, Role.SUBMITTER, Role.SIGNER, Role.OPERATOR, action="ledgering an object")
    data = b64decode(req.object, what="object")
    if req.type in ENVELOPE_TYPES:
        envelope = parse_envelope(data)
        name, _, _ = parse_keyid(envelope.signatures[0].keyid)
        key = svc.kms.public_key(name)
        if key.tenant != req.tenant:
            raise QaiError("ledger.wrong_tenant", f"envelope is signed by a key of tenant {key.tenant}",
                           status=403, details={"key": name})
        verify_envelope(envelope, key, at=utcnow())
    e = svc.ledger.append_object(req.type, req.tenant, data)
    return svc.ledger.receipt(e.index)


@router.get("/receipt/{index}", response_model=Receipt, summary="Inclusion receipt of an entry")
def receipt(svc: ServicesDep, p: PrincipalDep, index: int = Path(ge=0, le=MAX_INDEX)) -> Receipt:
    _require_reader(p, svc.ledger.entry(index).tenant)
    return svc.ledger.receipt(index)


@router.get("/proof/inclusion", response_model=InclusionOut, summary="RFC 9162 §2.1.3 inclusion proof")
def inclusion(svc: ServicesDep, _: PrincipalDep, tree_size: int = Query(..., ge=1, le=MAX_INDEX),
              index: int | None = Query(None, ge=0, le=MAX_INDEX),
              hash: str | None = Query(None, pattern="^[0-9a-f]{64}$"),
              ) -> InclusionOut:
    if (index is None) == (hash is None):
        raise QaiError("ledger.bad_query", "give exactly one of index or hash", status=400)
    idx = index if index is not None else svc.ledger.index_of(hash or "")
    proof = svc.ledger.inclusion_proof(idx, tree_size)
    leaf = svc.ledger.entry(idx).leaf
    return InclusionOut(index=idx, tree_size=tree_size, leaf_hash=leaf, proof=[x.hex() for x in proof])


@router.get("/proof/consistency", response_model=ConsistencyOut, summary="RFC 9162 §2.1.4 consistency proof")
def consistency(svc: ServicesDep, _: PrincipalDep, first: int = Query(..., ge=0, le=MAX_INDEX),
                second: int = Query(..., ge=0, le=MAX_INDEX)) -> ConsistencyOut:
    proof = svc.ledger.consistency_proof(first, second)
    return ConsistencyOut(first=first, second=second, proof=[x.hex() for x in proof])

