"""One way to derive seeds: every seeded stream (initial weights, data order, sampling) is
seeded by a hash of what identifies it, so related streams never share numbers."""

from __future__ import annotations

import hashlib

MAX_SEED = 2 ** 63 - 1  # torch.manual_seed takes no more (and megatron adds offsets to it)


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and names (a hash: distinct tuples do not collide in practice)."""
    key = tuple(p if isinstance(p, str) else int(p) for p in parts)
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1
