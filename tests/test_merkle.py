"""RFC 9162 / RFC 6962 Merkle hashing and proofs (sdk/merkle.py).

The reference vectors are the Certificate Transparency test tree of 8 leaves used by the C++ CT
log, Trillian and transparency-dev/merkle: the roots for sizes 0..8 and their published inclusion
and consistency proofs.
"""

from __future__ import annotations

import random

import pytest

from sdk import merkle
from sdk.errors import VerificationError

CT_ENTRIES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
)]
CT_ROOTS = [bytes.fromhex(h) for h in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
# (0-based leaf index, tree size, proof)
CT_INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (0, 1, []),
]
CT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]


def _store(leaves: list[bytes]) -> dict[merkle.Node, bytes]:
    """Every node a log would store, built the way the ledger builds them (by appending)."""
    compact, nodes = merkle.CompactRange(), {}
    for leaf in leaves:
        nodes.update(compact.append(leaf))
    return nodes


CT_LEAVES = [merkle.leaf_hash(e) for e in CT_ENTRIES]
CT_NODES = _store(CT_LEAVES)


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 written as the recursion, independent of the node store."""
    if not leaves:
        return merkle.EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return merkle.node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def test_roots_of_sizes_0_to_8() -> None:
    for size in range(9):
        assert merkle.root_from_leaves(CT_LEAVES[:size]) == CT_ROOTS[size]
        assert merkle.root_hash(size, CT_NODES) == CT_ROOTS[size]
        assert _mth(CT_LEAVES[:size]) == CT_ROOTS[size]


@pytest.mark.parametrize(("index", "size", "proof"), CT_INCLUSION)
def test_inclusion_vectors(index: int, size: int, proof: list[str]) -> None:
    got = merkle.inclusion_proof(index, size, CT_NODES)
    assert [p.hex() for p in got] == proof
    merkle.verify_inclusion(index, size, CT_LEAVES[index], got, CT_ROOTS[size])
    with pytest.raises(VerificationError) as err:
        merkle.verify_inclusion(index, size, CT_LEAVES[index], got, CT_ROOTS[size - 1])
    assert err.value.code == "proof.inclusion_mismatch"


@pytest.mark.parametrize(("first", "second", "proof"), CT_CONSISTENCY)
def test_consistency_vectors(first: int, second: int, proof: list[str]) -> None:
    got = merkle.consistency_proof(first, second, CT_NODES)
    assert [p.hex() for p in got] == proof
    merkle.verify_consistency(first, second, CT_ROOTS[first], CT_ROOTS[second], got)
    if first != second:
        with pytest.raises(VerificationError) as err:
            merkle.verify_consistency(first, second, CT_ROOTS[first], CT_ROOTS[second - 1], got)
        assert err.value.code == "proof.consistency_mismatch"


def test_every_proof_in_trees_up_to_70_leaves() -> None:
    rng = random.Random(9162)
    leaves = [merkle.leaf_hash(rng.randbytes(rng.randrange(40))) for _ in range(70)]
    nodes = _store(leaves)
    roots = [_mth(leaves[:n]) for n in range(71)]
    for size in range(1, 71):
        assert merkle.root_hash(size, nodes) == roots[size]
        for i in range(size):
            proof = merkle.inclusion_proof(i, size, nodes)
            assert len(merkle.inclusion_nodes(i, size)) <= 2 * size.bit_length()  # O(log n) reads
            merkle.verify_inclusion(i, size, leaves[i], proof, roots[size])
            with pytest.raises(VerificationError):
                merkle.verify_inclusion(i, size, leaves[(i + 1) % 70], proof, roots[size])
        for first in range(0, size + 1):
            proof = merkle.consistency_proof(first, size, nodes)
            merkle.verify_consistency(first, size, roots[first], roots[size], proof)


def test_node_store_never_changes_a_stored_node() -> None:
    """A node, once written, keeps its hash: the ledger can store it in an append-only table."""
    compact, seen = merkle.CompactRange(), {}
    for i in range(300):
        for node, h in compact.append(merkle.leaf_hash(i.to_bytes(4, "big"))):
            assert node not in seen
            seen[node] = h
    assert len(seen) == 2 * 300 - (300).bit_count()


def test_compact_range_resumes_from_stored_nodes() -> None:
    nodes = _store(CT_LEAVES[:5])
    resumed = merkle.CompactRange(5, [nodes[n] for n in merkle.CompactRange.nodes_for(5)])
    for leaf in CT_LEAVES[5:]:
        resumed.append(leaf)
    assert resumed.root() == CT_ROOTS[8]


@pytest.mark.parametrize(("args", "code"), [
    ((0, 0, CT_LEAVES[0], [], CT_ROOTS[0]), "proof.bad_index"),
    ((8, 8, CT_LEAVES[0], [], CT_ROOTS[8]), "proof.bad_index"),
    ((0, 8, CT_LEAVES[0], [b"short"], CT_ROOTS[8]), "proof.malformed"),
    ((0, 8, CT_LEAVES[0], [CT_ROOTS[1]] * 2, CT_ROOTS[8]), "proof.malformed"),  # too short
    ((0, 2, CT_LEAVES[0], [CT_LEAVES[1]] * 3, CT_ROOTS[2]), "proof.malformed"),  # too long
])
def test_malformed_inclusion_proofs(args: tuple, code: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(VerificationError) as err:
        merkle.verify_inclusion(*args)
    assert err.value.code == code


def test_malformed_consistency_proofs() -> None:
    proof = merkle.consistency_proof(6, 8, CT_NODES)
    cases = [
        ((8, 6, CT_ROOTS[8], CT_ROOTS[6], proof), "proof.bad_index"),
        ((6, 8, CT_ROOTS[6], CT_ROOTS[8], []), "proof.malformed"),
        ((6, 8, CT_ROOTS[6], CT_ROOTS[8], [*proof, CT_ROOTS[1]]), "proof.malformed"),
        ((6, 8, CT_ROOTS[6], CT_ROOTS[8], proof[:-1]), "proof.consistency_mismatch"),
        ((8, 8, CT_ROOTS[8], CT_ROOTS[7], []), "proof.consistency_mismatch"),  # a fork at one size
        ((8, 8, CT_ROOTS[8], CT_ROOTS[8], [CT_ROOTS[1]]), "proof.malformed"),
        ((0, 8, CT_ROOTS[0], CT_ROOTS[8], [CT_ROOTS[1]]), "proof.malformed"),
    ]
    for args, code in cases:
        with pytest.raises(VerificationError) as err:
            merkle.verify_consistency(*args)
        assert err.value.code == code, args
