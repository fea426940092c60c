"""The offline auditor: verify a whole ledger from a running server or an exported bundle.

What :func:`audit` checks, in the order a reader would:

1. every checkpoint is a well-formed C2SP signed note for the expected origin, signed by every part
   of the pinned checkpoint key's suite, valid at the checkpoint's timestamp; sizes and timestamps
   only grow;
2. entries are numbered 0, 1, 2, … with no gap, and each stored leaf hash is its entry's;
3. each entry's object hashes to the entry's SHA-256 (the DB index row matches the object), and an
   envelope's signatures verify under a trusted key of the entry's tenant, valid at the entry's
   time; registered replay hooks re-run what they can (scheduler decisions);
4. the tree recomputed from the entries has, at every checkpoint's size, that checkpoint's root;
   against a server, the server's consistency proofs between successive checkpoints verify too;
5. a checkpoint remembered from an earlier audit (``state``) is still in the log: a log rolled
   back or forked since then fails here.

Entries after the newest checkpoint are reported as not yet covered: nothing signed commits to them.
Signatures are checked in parallel over ``workers`` processes. The first failure is named by index.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sdk import merkle
from sdk.checkpoint import SignedCheckpoint, verify_checkpoint
from sdk.client import Client
from sdk.dsse import parse_envelope, verify_envelope
from sdk.errors import QaiError
from sdk.ledger import ENVELOPE_TYPES, SYSTEM_TENANT, IndexedEntry, sha256_hex
from sdk.signing import KeyDocument, parse_keyid

BUNDLE_FORMAT = "qai-audit-bundle/1"
DEFAULT_CHECKPOINT_KEY = "qai.ledger-checkpoint"
PAGE = 1000
CHUNK = 256

Replayer = Callable[[IndexedEntry, bytes], None]
REPLAYER_GROUP = "qai.audit.replayers"
REPLAYERS: dict[str, Replayer] = {}
"""Entry type → a function that re-derives the entry from its recorded inputs and raises
:class:`QaiError` on a mismatch. The scheduler registers ``scheduler-decision`` here."""


def register_replayer(entry_type: str, fn: Replayer) -> None:
    REPLAYERS[entry_type] = fn


def load_replayers() -> dict[str, Replayer]:
    """Register the hooks installed under the entry-point group ``qai.audit.replayers`` (entry
    point name = entry type). An sdk installed alone finds none and replays nothing."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=REPLAYER_GROUP):
        if ep.name not in REPLAYERS:
            register_replayer(ep.name, ep.load())
    return REPLAYERS


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    index: int | None = None
    checkpoint_size: int | None = None


@dataclass
class AuditReport:
    origin: str | None
    entries: int = 0
    signatures_verified: int = 0
    checkpoints: int = 0
    latest_checkpoint_size: int | None = None
    root: str | None = None
    uncovered: int = 0
    checkpoint_note: str | None = None  # the newest checkpoint the entries were matched against
    failures: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def first_failure(self) -> Failure | None:
        with_index = [f for f in self.failures if f.index is not None]
        if with_index:
            return min(with_index, key=lambda f: f.index or 0)
        return self.failures[0] if self.failures else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        first = self.first_failure
        out["first_failure"] = asdict(first) if first else None
        return out


# --- sources ------------------------------------------------------------------------------------

class LedgerSource(Protocol):
    def origin(self) -> str | None: ...
    def keys(self) -> dict[str, KeyDocument]: ...
    def checkpoints(self) -> list[str]: ...
    def size(self) -> int: ...
    def entries(self) -> Iterator[tuple[IndexedEntry, bytes]]: ...
    def consistency_proof(self, first: int, second: int) -> list[bytes] | None: ...


class ServerSource:
    """A running qai server, read through its REST API with an auditor token."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._size: int | None = None
        self._notes: list[str] | None = None
        self.tree_size: int | None = None  # the server's size when the snapshot was taken

    def origin(self) -> str | None:
        return None

    def keys(self) -> dict[str, KeyDocument]:
        keys = {k.name: k for k in self.client.list_keys()}
        try:
            ledger_key = self.client.ledger_key()
            keys[ledger_key.name] = ledger_key
        except QaiError:
            pass
        return keys

    def checkpoints(self) -> list[str]:
        if self._notes is None:
            try:
                self._notes = [str(c["note"]) for c in self.client.ledger_checkpoints()]
            except (KeyError, TypeError) as exc:
                raise QaiError("audit.bad_response", "the server's checkpoint list is malformed") from exc
        return self._notes

    def size(self) -> int:
        """A live log keeps growing: audit the snapshot up to the newest checkpoint, which is what
        anything signed commits to (entries after it are reported, not audited)."""
        if self._size is None:
            self.tree_size = int(self.client.ledger_entries(0, 0)["tree_size"])
            sizes = [n for n in (_size_of(note) for note in self.checkpoints()) if n is not None]
            self._size = min(self.tree_size, max(sizes)) if sizes else self.tree_size
        return self._size

    def entries(self) -> Iterator[tuple[IndexedEntry, bytes]]:
        size = self.size()
        for start in range(0, size, PAGE):
            page = self.client.ledger_entries(start, min(size, start + PAGE), objects=True)["entries"]
            for raw in page:
                obj = base64.b64decode(raw.pop("object") or "", validate=True)
                yield IndexedEntry.model_validate(raw), obj

    def consistency_proof(self, first: int, second: int) -> list[bytes] | None:
        try:
            return self.client.ledger_consistency(first, second)
        except (KeyError, TypeError, ValueError) as exc:
            raise QaiError("audit.bad_response", "the server's consistency proof is malformed") from exc


class BundleSource:
    """A directory written by :func:`export_bundle`: ``bundle.json`` and ``entries.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.meta = json.loads((path / "bundle.json").read_text())
        except (OSError, ValueError) as exc:
            raise QaiError("audit.bad_bundle", f"{path} is not an audit bundle: {exc}") from exc
        if not isinstance(self.meta, dict) or self.meta.get("format") != BUNDLE_FORMAT:
            raise QaiError("audit.bad_bundle", f"{path}/bundle.json is not a {BUNDLE_FORMAT} document")
        try:
            self._keys = {k["name"]: KeyDocument.model_validate(k) for k in self.meta.get("keys", [])}
            self._notes = [str(n) for n in self.meta.get("checkpoints", [])]
            self._size = int(self.meta.get("tree_size", 0))
        except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise QaiError("audit.bad_bundle", f"{path}/bundle.json has malformed fields: {type(exc).__name__}") \
                from exc
        if not (path / "entries.jsonl").is_file():
            raise QaiError("audit.bad_bundle", f"{path} has no entries.jsonl")

    def origin(self) -> str | None:
        value = self.meta.get("origin")
        return str(value) if value else None

    def keys(self) -> dict[str, KeyDocument]:
        return dict(self._keys)

    def checkpoints(self) -> list[str]:
        return list(self._notes)

    def size(self) -> int:
        return self._size

    def entries(self) -> Iterator[tuple[IndexedEntry, bytes]]:
        with (self.path / "entries.jsonl").open() as f:
            for line in f:
                if not line.strip():
                    continue
                raw = json.loads(line)
                obj = base64.b64decode(raw.pop("object") or "", validate=True)
                yield IndexedEntry.model_validate(raw), obj

    def consistency_proof(self, first: int, second: int) -> list[bytes] | None:
        return None  # the auditor recomputes the tree itself


def export_bundle(source: LedgerSource, out: Path, *, origin: str | None = None,
                  progress: Callable[[int, int], None] | None = None) -> int:
    """Write ``source`` as a bundle directory; returns the number of entries."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = source.checkpoints()
    total, n = source.size(), 0
    with (out / "entries.jsonl").open("w") as f:
        for entry, obj in source.entries():
            row = entry.model_dump(mode="json")
            row["object"] = base64.b64encode(obj).decode()
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
            n += 1
            if progress is not None and n % PAGE == 0:
                progress(n, total)
    meta = {
        "format": BUNDLE_FORMAT,
        "origin": origin or source.origin() or _origin_of(checkpoints),
        "tree_size": n,
        "keys": [k.model_dump(mode="json") for k in source.keys().values()],
        "checkpoints": checkpoints,
    }
    (out / "bundle.json").write_text(json.dumps(meta, indent=1))
    if progress is not None:
        progress(n, total)
    return n


def _origin_of(notes: list[str]) -> str | None:
    return notes[0].split("\n", 1)[0] if notes else None


# --- state: what an auditor remembers between runs ------------------------------------------------

def load_state(path: Path | None) -> str | None:
    """The last checkpoint note this auditor verified, if any."""
    if path is None or not path.exists():
        return None
    try:
        return str(json.loads(path.read_text())["checkpoint"])
    except (ValueError, KeyError, TypeError) as exc:
        raise QaiError("audit.bad_state", f"{path} is not an auditor state file") from exc


def save_state(path: Path, note: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"checkpoint": note}))
    os.replace(tmp, path)


# --- entry checks (run in worker processes) -------------------------------------------------------

_KEYS: dict[str, KeyDocument] = {}


def _init_worker(keys: list[dict[str, Any]]) -> None:
    load_replayers()
    _KEYS.clear()
    _KEYS.update({k["name"]: KeyDocument.model_validate(k) for k in keys})


def check_entry(entry: IndexedEntry, obj: bytes, keys: Mapping[str, KeyDocument]) -> Failure | None:
    """Object and signature checks of one entry; ``None`` when it passes."""
    if sha256_hex(obj) != entry.sha256:
        return Failure("entry.object_mismatch",
                       f"object {entry.path} does not hash to the entry's sha256 (index row or object edited)",
                       entry.index)
    try:
        if entry.type in ENVELOPE_TYPES:
            envelope = parse_envelope(obj)
            name = parse_keyid(envelope.signatures[0].keyid)[0]
            key = keys.get(name)
            if key is not None and key.tenant != entry.tenant:
                return Failure("entry.wrong_tenant", f"signed by {name} of tenant {key.tenant}, "
                               f"ledgered for {entry.tenant}", entry.index)
            verify_envelope(envelope, keys, at=entry.time)
        replay = REPLAYERS.get(entry.type)
        if replay is not None:
            replay(entry, obj)
    except QaiError as exc:
        return Failure(exc.code, exc.message, entry.index)
    except Exception as exc:  # a replay hook or a malformed object must not end the audit
        return Failure("entry.unreadable", f"{type(exc).__name__}: {str(exc)[:200]}", entry.index)
    return None


def _check_chunk(items: list[tuple[dict[str, Any], bytes]]) -> tuple[int, int, list[Failure]]:
    """(entries checked, envelopes whose signatures verified, failures)."""
    failures, verified = [], 0
    for raw, obj in items:
        entry = IndexedEntry.model_validate(raw)
        f = check_entry(entry, obj, _KEYS)
        if f is not None:
            failures.append(f)
        elif entry.type in ENVELOPE_TYPES:
            verified += 1
    return len(items), verified, failures


# --- the audit ---------------------------------------------------------------------------------------

def _verified_checkpoints(notes: list[str], key: KeyDocument | None, origin: str | None,
                          report: AuditReport) -> list[SignedCheckpoint]:
    good: list[SignedCheckpoint] = []
    if key is None:
        if notes:
            report.failures.append(Failure("audit.no_checkpoint_key", "the checkpoint key is not trusted"))
        return good
    for note in notes:
        try:
            good.append(verify_checkpoint(note, key, origin=origin))
        except QaiError as exc:
            size = _size_of(note)
            report.failures.append(Failure(exc.code, f"checkpoint of size {size}: {exc.message}",
                                           checkpoint_size=size))
    good.sort(key=lambda c: c.checkpoint.size)
    for prev, cur in itertools.pairwise(good):
        a, b = prev.checkpoint, cur.checkpoint
        if a.size == b.size and a.root != b.root:
            report.failures.append(Failure("checkpoint.fork", f"two signed roots for size {a.size}",
                                           checkpoint_size=a.size))
        if b.timestamp < a.timestamp:
            report.failures.append(Failure("checkpoint.time_reversed",
                                           f"checkpoint {b.size} is dated before checkpoint {a.size}",
                                           checkpoint_size=b.size))
    return good


def _size_of(note: str) -> int | None:
    try:
        return int(note.split("\n")[1])
    except (IndexError, ValueError):
        return None


def audit(
    source: LedgerSource,
    *,
    trusted_keys: Mapping[str, KeyDocument] | None = None,
    checkpoint_key: str = DEFAULT_CHECKPOINT_KEY,
    origin: str | None = None,
    state: str | None = None,
    workers: int | None = None,
    allow_uncovered: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> AuditReport:
    """Verify everything in ``source``; see the module docstring. Never raises on a bad ledger.

    Entries that no verified checkpoint covers are a failure unless ``allow_uncovered``: nothing
    signed commits to them, so a forger could have written them.
    """
    keys = dict(trusted_keys) if trusted_keys is not None else source.keys()
    if origin is None:
        origin = source.origin()
        report = AuditReport(origin=origin)
        report.warnings.append("the log origin is taken from the source itself; pass --origin to pin it")
    else:
        report = AuditReport(origin=origin)
    if trusted_keys is None:
        report.warnings.append("trusting the public keys supplied by the ledger source itself; "
                               "pass --keys to pin them")
    cp_key = keys.get(checkpoint_key)
    if cp_key is not None and cp_key.tenant != SYSTEM_TENANT:
        report.failures.append(Failure("audit.checkpoint_key_not_system",
                                       f"{checkpoint_key} belongs to tenant {cp_key.tenant}, not {SYSTEM_TENANT}"))
        cp_key = None
    cps = _verified_checkpoints(source.checkpoints(), cp_key, origin, report)
    report.checkpoints = len(cps)
    remembered = None
    if state is not None:
        if cp_key is None:
            report.failures.append(Failure("audit.no_checkpoint_key",
                                           "a remembered checkpoint needs the trusted checkpoint key"))
        else:
            try:
                remembered = verify_checkpoint(state, cp_key, origin=origin)
            except QaiError as exc:
                report.failures.append(Failure(exc.code, f"remembered checkpoint: {exc.message}"))
    # the first checkpoint covering an index bounds the entry's time from above
    covering = sorted((cp.checkpoint.size, cp.checkpoint.timestamp) for cp in cps)
    cover_at = 0
    targets: dict[int, list[tuple[str, bytes]]] = {}
    for cp in cps:
        targets.setdefault(cp.checkpoint.size, []).append(("checkpoint", cp.checkpoint.root))
    if remembered is not None:
        targets.setdefault(remembered.checkpoint.size, []).append(("remembered", remembered.checkpoint.root))

    total = source.size()
    compact = merkle.CompactRange()
    workers = workers or os.cpu_count() or 1
    pool = ProcessPoolExecutor(workers, initializer=_init_worker,
                               initargs=([k.model_dump(mode="json") for k in keys.values()],)) \
        if workers > 1 else None
    if pool is None:
        _init_worker([k.model_dump(mode="json") for k in keys.values()])
    pending: list[Future[tuple[int, int, list[Failure]]]] = []
    chunk: list[tuple[dict[str, Any], bytes]] = []
    done = 0

    def flush() -> None:
        nonlocal chunk
        if not chunk:
            return
        if pool is None:
            account(*_check_chunk(chunk))
        else:
            pending.append(pool.submit(_check_chunk, chunk))
            while len(pending) > 2 * workers:
                collect(pending.pop(0))
        chunk = []

    def collect(fut: Future[tuple[int, int, list[Failure]]]) -> None:
        account(*fut.result())

    def account(n: int, verified: int, fails: list[Failure]) -> None:
        nonlocal done
        report.failures.extend(fails)
        report.signatures_verified += verified
        done += n
        if progress is not None:
            progress(done, total)

    try:
        expected = 0
        for entry, obj in source.entries():
            if entry.index != expected:
                kind = "ledger.gap" if entry.index > expected else "ledger.order"
                report.failures.append(Failure(kind, f"expected entry {expected}, found {entry.index}", expected))
                break
            while cover_at < len(covering) and covering[cover_at][0] <= entry.index:
                cover_at += 1
            if cover_at < len(covering) and entry.time > covering[cover_at][1]:
                report.failures.append(Failure("entry.time_after_checkpoint",
                                               f"entry is dated after the checkpoint of size {covering[cover_at][0]} "
                                               "that covers it", entry.index))
            leaf = entry.leaf_hash()
            if leaf.hex() != entry.leaf:
                report.failures.append(Failure("entry.leaf_mismatch",
                                               "stored leaf hash is not the hash of the entry (row edited)",
                                               entry.index))
            compact.append(leaf)
            expected += 1  # noqa: SIM113  (it also stops the walk at a gap)
            for what, root in targets.get(compact.size, []):
                if compact.root() != root:
                    report.failures.append(Failure(
                        "checkpoint.root_mismatch" if what == "checkpoint" else "audit.fork_or_rollback",
                        f"the entries do not hash to the {what} root of size {compact.size}",
                        entry.index, compact.size))
            chunk.append((entry.model_dump(), obj))
            if len(chunk) >= CHUNK:
                flush()
        flush()
        for fut in pending:
            collect(fut)
    except (QaiError, ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        # An unreadable entry (malformed bundle line, bad base64, a page the server garbled) is a
        # finding about the ledger, not a crash of the auditor.
        report.failures.append(Failure("audit.unreadable_entry", f"entry {compact.size} cannot be read: "
                                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                       compact.size))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    n = compact.size
    report.entries = n
    report.root = compact.root().hex()
    if total != n and not any(f.code in ("ledger.gap", "ledger.order") for f in report.failures):
        report.failures.append(Failure("ledger.size_mismatch", f"source says {total} entries, yielded {n}"))
    for size in sorted(targets):
        if size > n:
            what = targets[size][0][0]
            report.failures.append(Failure(
                "checkpoint.beyond_log" if what == "checkpoint" else "audit.fork_or_rollback",
                f"a {what} checkpoint commits to {size} entries, the log has {n} (entries deleted or "
                f"log rolled back)", checkpoint_size=size))
    matched = [cp for cp in cps if cp.checkpoint.size <= n]
    if matched:
        report.checkpoint_note = matched[-1].note
    if cps:
        latest = cps[-1].checkpoint
        report.latest_checkpoint_size = latest.size
        report.uncovered = max(0, n - latest.size)
        for prev, cur in itertools.pairwise(cps):
            a, b = prev.checkpoint, cur.checkpoint
            if a.size == b.size or b.size > n:
                continue
            try:
                proof = source.consistency_proof(a.size, b.size)
                if proof is not None:
                    merkle.verify_consistency(a.size, b.size, a.root, b.root, proof)
            except QaiError as exc:
                report.failures.append(Failure(exc.code, f"consistency {a.size} -> {b.size}: {exc.message}",
                                               checkpoint_size=b.size))
    elif n:
        report.uncovered = n
    if report.uncovered:
        message = f"{report.uncovered} entries are not covered by any verified checkpoint"
        if allow_uncovered:
            report.warnings.append(message)
        else:
            report.failures.append(Failure("audit.uncovered", message, n - report.uncovered))
    newer = getattr(source, "tree_size", None)
    if isinstance(newer, int) and newer > n:
        report.warnings.append(f"{newer - n} entries newer than the latest checkpoint were not audited")
    report.failures.sort(key=lambda f: (f.index is None, f.index or 0))
    return report
