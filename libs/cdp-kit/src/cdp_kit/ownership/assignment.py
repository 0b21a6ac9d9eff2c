"""Which live member should own which partition: balanced, deterministic, few moves.

Every member computes the same answer from the same (sorted) set of live members, with no talk
between them. The answer is rendezvous hashing with a capacity: each (partition, member) pair gets a
score from a hash of both, pairs are taken best score first, and a member stops taking partitions
once it has ceil(P/N). So every member ends with floor(P/N) or ceil(P/N) partitions, and a member
joining or leaving moves about the partitions it gains or loses rather than reshuffling everything
(plain modulo, `p % N`, moves most partitions whenever N changes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def _score(member: str, partition: int) -> int:
    digest = hashlib.blake2b(f"{member}\x00{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(partitions: int, members: Iterable[str]) -> dict[int, str]:
    """The owner of every partition 0..partitions-1 among `members` (empty when there are none)."""
    live = sorted(set(members))
    if not live or partitions < 1:
        return {}
    capacity = -(-partitions // len(live))  # ceil(P/N)
    # Only P % N members may reach ceil(P/N) (all of them when N divides P); the rest stop at one
    # fewer, so no partition late in the order finds every member full.
    may_fill = partitions % len(live) or len(live)
    pairs = sorted(
        ((_score(member, p), member, p) for p in range(partitions) for member in live),
        reverse=True,
    )
    owner: dict[int, str] = {}
    load = dict.fromkeys(live, 0)
    filled = 0
    for _, member, p in pairs:
        if p in owner:
            continue
        limit = capacity if filled < may_fill else capacity - 1
        if load[member] >= limit:
            continue
        owner[p] = member
        load[member] += 1
        filled += load[member] == capacity
        if len(owner) == partitions:
            break
    return owner


def owned_by(partitions: int, members: Iterable[str], member: str) -> frozenset[int]:
    """The partitions `assign` gives `member`."""
    return frozenset(p for p, owner in assign(partitions, members).items() if owner == member)
