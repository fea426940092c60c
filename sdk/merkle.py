"""Merkle tree hashing and proofs of RFC 9162 §2.1 (Certificate Transparency v2).

Pure functions over bytes; the auditor's side of the ledger. Tree sizes and indices are leaf
counts and 0-based leaf positions, as in the RFC.

Proofs are produced from a **node store**: every perfect, aligned subtree of the log is one node
``(level, index)`` covering leaves ``[index·2^level, (index+1)·2^level)``. Those nodes never change
once their last leaf is appended (Russ Cox, "Transparent Logs for Skeptical Clients"), so a log
stores each once and any proof needs O(log n) of them, never a full-tree recomputation.
:func:`inclusion_nodes` / :func:`consistency_nodes` say which nodes a proof needs; the proof
functions fold them into the RFC's proof lists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

from sdk.errors import VerificationError

Node = tuple[int, int]  # (level, index): the perfect subtree of 2**level leaves at index * 2**level
HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()  # RFC 9162 §2.1.1: MTH({}) = HASH()


# RFC 9162 §2.1.1: MTH({d(0)}) = HASH(0x00 || d(0))
def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


# RFC 9162 §2.1.1: MTH(D[n]) = HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n]))
def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (``n`` > 1): the RFC's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes, with the compact stack of :class:`CompactRange` (O(n), O(log n) memory)."""
    compact = CompactRange()
    for h in leaf_hashes:
        compact.append(h)
    return compact.root()


class CompactRange:
    """The right edge of a growing tree: one perfect subtree hash per set bit of its size.

    ``append`` returns every node it completes, so a log can store them as it grows.
    """

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != size.bit_count():
            raise ValueError("a compact range holds one hash per set bit of its size")
        self.size = size
        self.hashes = list(hashes)  # highest level first

    @classmethod
    def nodes_for(cls, size: int) -> list[Node]:
        """The perfect subtrees, left to right, whose hashes make up the compact range of ``size``."""
        nodes, start = [], 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                nodes.append((level, start >> level))
                start += 1 << level
        return nodes

    def append(self, leaf: bytes) -> list[tuple[Node, bytes]]:
        index = self.size
        created: list[tuple[Node, bytes]] = [((0, index), leaf)]
        h, level = leaf, 0
        while index >> level & 1:  # merge with the left sibling of equal height
            h = node_hash(self.hashes.pop(), h)
            level += 1
            created.append(((level, index >> level), h))
        self.hashes.append(h)
        self.size += 1
        return created

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        root = self.hashes[-1]
        for h in reversed(self.hashes[:-1]):
            root = node_hash(h, root)
        return root


# --- subtree ranges ---------------------------------------------------------------------------

def range_nodes(start: int, end: int) -> list[Node]:
    """Perfect aligned subtrees that tile the RFC subtree ``D[start:end]``, left to right.

    Every subtree the RFC recursion visits starts at a multiple of a power of two at least as large
    as its size, so it splits into aligned perfect pieces following the binary digits of its size.
    """
    nodes, pos = [], start
    size = end - start
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            if pos % (1 << level):
                raise ValueError(f"[{start}, {end}) is not a subtree of an RFC 9162 tree")
            nodes.append((level, pos >> level))
            pos += 1 << level
    return nodes


def range_hash(start: int, end: int, nodes: Mapping[Node, bytes]) -> bytes:
    """MTH(D[start:end]) from stored perfect subtrees (right fold, as the RFC's recursion does)."""
    pieces = [nodes[n] for n in range_nodes(start, end)]
    h = pieces[-1]
    for p in reversed(pieces[:-1]):
        h = node_hash(p, h)
    return h


# RFC 9162 §2.1.3.1: PATH(m, D[n]), as subtree ranges from the leaf upwards
def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    ranges: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index - lo < k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo = lo + k
    ranges.reverse()
    return ranges


# RFC 9162 §2.1.4.1: PROOF(m, D[n]) = SUBPROOF(m, D[n], true), as subtree ranges
def consistency_ranges(first: int, second: int) -> list[tuple[int, int]]:
    if not 0 <= first <= second:
        raise ValueError(f"no consistency proof from size {first} to {second}")
    if first == 0 or first == second:
        return []
    ranges: list[tuple[int, int]] = []
    lo, hi, m, complete = 0, second, first, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            m -= k
            lo = lo + k
            complete = False
    if not complete:
        ranges.append((lo, hi))
    ranges.reverse()
    return ranges


def nodes_for_ranges(ranges: Iterable[tuple[int, int]]) -> set[Node]:
    return {n for a, b in ranges for n in range_nodes(a, b)}


def inclusion_nodes(index: int, size: int) -> set[Node]:
    """The stored nodes :func:`inclusion_proof` reads, for one batched lookup."""
    return nodes_for_ranges(inclusion_ranges(index, size))


def consistency_nodes(first: int, second: int) -> set[Node]:
    return nodes_for_ranges(consistency_ranges(first, second))


def inclusion_proof(index: int, size: int, nodes: Mapping[Node, bytes]) -> list[bytes]:
    return [range_hash(a, b, nodes) for a, b in inclusion_ranges(index, size)]


def consistency_proof(first: int, second: int, nodes: Mapping[Node, bytes]) -> list[bytes]:
    return [range_hash(a, b, nodes) for a, b in consistency_ranges(first, second)]


def root_hash(size: int, nodes: Mapping[Node, bytes]) -> bytes:
    return EMPTY_ROOT if size == 0 else range_hash(0, size, nodes)


# --- verification -------------------------------------------------------------------------------

def _fail(code: str, message: str, **details: object) -> VerificationError:
    return VerificationError(code, message, details=dict(details))


# RFC 9162 §2.1.3.2: verifying an inclusion proof
def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    if not 0 <= index < size:
        raise _fail("proof.bad_index", f"leaf {index} is outside a tree of size {size}",
                    index=index, tree_size=size)
    if any(len(p) != HASH_SIZE for p in proof):
        raise _fail("proof.malformed", "every proof element must be a 32-byte hash")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise _fail("proof.malformed", "inclusion proof is too long", length=len(proof))
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise _fail("proof.malformed", "inclusion proof is too short", length=len(proof))
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Raise :class:`VerificationError` unless ``leaf`` is at ``index`` of the tree ``root``."""
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise _fail("proof.inclusion_mismatch",
                    f"leaf {index} is not included in the tree of size {size} with that root",
                    index=index, tree_size=size)


# RFC 9162 §2.1.4.2: verifying consistency between two tree heads
def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """Raise :class:`VerificationError` unless tree ``second`` extends tree ``first``."""
    if not 0 <= first <= second:
        raise _fail("proof.bad_index", f"cannot prove size {first} is a prefix of size {second}",
                    first=first, second=second)
    if any(len(p) != HASH_SIZE for p in proof):
        raise _fail("proof.malformed", "every proof element must be a 32-byte hash")
    if first == second:
        if proof:
            raise _fail("proof.malformed", "proof between equal sizes must be empty")
        if first_root != second_root:
            raise _fail("proof.consistency_mismatch", f"two different roots for size {first}",
                        first=first, second=second)
        return
    if first == 0:  # the empty tree is a prefix of every tree
        if proof:
            raise _fail("proof.malformed", "proof from the empty tree must be empty")
        return
    if not proof:
        raise _fail("proof.malformed", "consistency proof is empty")
    path = list(proof)
    if first & (first - 1) == 0:  # step 2: first is a power of two
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:  # step 4
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise _fail("proof.malformed", "consistency proof is too long", length=len(proof))
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or fr != first_root or sr != second_root:
        raise _fail("proof.consistency_mismatch",
                    f"the tree of size {second} does not extend the tree of size {first}",
                    first=first, second=second)
