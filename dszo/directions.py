"""Seeded random directions that do not depend on world size or partitioning.

The value of Z at flat element i of trainable tensor `key` in step `seed` is a pure function of
(seed, key, i): the flat index space is cut into fixed CHUNK-sized chunks, and chunk c is drawn from
its own generator seeded by mix(seed, key, c). Any rank generates exactly the slice it owns by drawing
only the chunks that overlap it; a whole tensor is the concatenation of all its chunks.
"""
from __future__ import annotations

import hashlib

import torch

CHUNK = 1 << 14
_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix(*parts: int) -> int:
    """Hash a tuple of integers to a 63-bit seed (torch generators take < 2**63 safely)."""
    h = 0x5DEECE66D
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK))
    return h >> 1


def tensor_key(name: str) -> int:
    """A stable integer for a trainable tensor, from its name (independent of creation order)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def step_seed(run_seed: int, step: int) -> int:
    return mix(run_seed, step)


def direction_seed(step_seed_: int, direction: int) -> int:
    return step_seed_ if direction == 0 else mix(step_seed_, 0xD1, direction)


def gaussian(seed: int, key: int, start: int, end: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal values of flat elements [start, end) of tensor `key` for `seed`."""
    if end <= start:
        return torch.empty(0, dtype=dtype, device=device)
    first, last = start // CHUNK, (end - 1) // CHUNK
    gen = torch.Generator()
    parts = []
    for c in range(first, last + 1):
        gen.manual_seed(mix(seed, key, c))
        parts.append(torch.randn(CHUNK, generator=gen, dtype=torch.float32))
    flat = torch.cat(parts) if len(parts) > 1 else parts[0]
    off = first * CHUNK
    return flat[start - off:end - off].to(dtype=dtype, device=device)
