"""Seeded random directions that depend neither on the world size, nor on the partitioning, nor on where they are
drawn.

The value of Z at flat element i of trainable tensor `key` for direction seed `seed` is a pure function of
(seed, key, i). A counter-based generator -- Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
1, 2, 3", SC 2011; the generator of cuRAND and of Triton's `tl.randn`) keyed by mix(seed, key) -- maps the
counter ⌊i/4⌋ to four 32-bit words; Box–Muller turns them into four standard normals, of which element i takes
number i mod 4. It is computed with torch's integer operations on the tensor's own device, so a rank draws
exactly its slice with no generator object and no host-to-device copy.

The 32 x 32 -> 64-bit products of Philox are formed from 16-bit halves so that every intermediate fits int64's
63 bits: integer results are exact and identical on every device. The Box–Muller step uses fp32 log/sqrt/cos/sin,
whose last bit may differ between kernel implementations (CPU vector widths, CUDA), as torch.randn's does. On
one kind of device the bits never depend on which slice is asked for: counters are drawn in ranges aligned to
ALIGN, whose length is a multiple of every CPU vector loop's unrolled width (ATen finishes a loop's last few
elements with the scalar function, which can round differently from the vector one), and a CPU block stays
under ATen's parallel grain (one thread, no split inside it).
"""
from __future__ import annotations

import hashlib
import math
import os
import sys

import torch

_MASK = (1 << 64) - 1
_M32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)     # Philox4x32 multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)     # key schedule (golden ratio, sqrt(3) - 1)
ROUNDS = 10
ALIGN = 64           # counters: ranges start and end on multiples (2 x 16 fp32 lanes of AVX-512, and more)
# Counters per block: under ATen's grain of 32768 elements (one thread) and within a CPU's L2 cache; on an
# accelerator one pass is cheaper. Both multiples of ALIGN.
CPU_BLOCK, DEVICE_BLOCK = 1 << 13, 1 << 22
# Rademacher on CPU: 4,096 counters (512 Ki signs) a block, so that its largest temporaries (the sign bytes,
# 512 KiB) stay under glibc's mmap threshold, which dszo pins at 1 MiB (cli.fix_glibc_mmap_threshold): they are
# reused from the heap instead of being mapped, page-faulted and zeroed afresh for every block.
SIGN_CPU_BLOCK = 1 << 12


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix(*parts: int) -> int:
    """Hash a tuple of integers to a 63-bit seed."""
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


def _mulhilo(a: torch.Tensor, m_low: torch.Tensor, m_high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m, exactly, for 32-bit words a and m = m_high * 2^16 + m_low (int64)."""
    low16 = a * m_low                              # < 2^48
    t = a * m_high + (low16 >> 16)                 # a * m = t * 2^16 + low16 mod 2^16; t < 2^49
    return t >> 16, ((t & 0xFFFF) << 16) | (low16 & 0xFFFF)


def philox4x32(words: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    """Philox4x32-10 of a 128-bit counter given as four int64 tensors of 32-bit words, under a 64-bit key.
    The words travel as two stacked pairs, (x0, x2) -- the multiplied ones -- and (x1, x3): one operation per
    step of a round for both halves."""
    x0, x1, x2, x3 = words
    mult, rest = torch.stack([x0, x2]), torch.stack([x1, x3])
    shape, device = (2,) + (1,) * x0.dim(), x0.device
    pair = lambda a, b: torch.stack([torch.full((), a, dtype=torch.int64, device=device),  # noqa: E731
                                     torch.full((), b, dtype=torch.int64, device=device)]).view(shape)
    m = pair(*_PHILOX_M)   # scalars written by kernels on the device: no host-to-device copy, no sync
    rounds = torch.arange(ROUNDS, dtype=torch.int64, device=device).view((ROUNDS,) + (1,) * len(shape))
    keys = (rounds * pair(*_PHILOX_W) + pair(key & _M32, (key >> 32) & _M32)) & _M32   # round r: k + r·W mod 2^32
    m_low, m_high = m & 0xFFFF, m >> 16
    for r in range(ROUNDS):
        hi, lo = _mulhilo(mult, m_low, m_high)
        # x0' = hi(x2·M1) ^ x1 ^ k0, x2' = hi(x0·M0) ^ x3 ^ k1, x1' = lo(x2·M1), x3' = lo(x0·M0)
        mult, rest = hi.flip(0) ^ rest ^ keys[r], lo.flip(0)
    return [mult[0], rest[0], mult[1], rest[1]]


def _normals(counter: torch.Tensor, key: int) -> torch.Tensor:
    """Four standard normals per counter ([len(counter) * 4], fp32): Box–Muller on 24-bit uniforms in (0, 1]
    (the fp32 sum rounds the largest up to 1: a zero normal with probability 2^-24, harmless)."""
    zero = torch.zeros_like(counter)
    words = torch.stack(philox4x32([counter & _M32, counter >> 32, zero, zero], key))          # [4, n]
    u = ((words >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    radius, angle = torch.sqrt(-2.0 * torch.log(u[0::2])), (2.0 * math.pi) * u[1::2]           # [2, n] each
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1).permute(1, 0, 2).reshape(-1)


def _sign_bits(counter: torch.Tensor, key: int) -> torch.Tensor:
    """128 Rademacher bits (uint8 0/1; the value is 1 - 2·bit) per counter: the 4 x 32 bits of its Philox output,
    word by word, low bit first. Integer work only, so the values are identical on every device and for every
    slice. The words are read as little-endian bytes (one byte op per 8 values; the int64 words first wrap to
    int32)."""
    zero = torch.zeros_like(counter)
    words = torch.stack(philox4x32([counter & _M32, counter >> 32, zero, zero], key), -1)      # [n, 4]
    as_bytes = words.to(torch.int32).view(torch.uint8).view(-1, 16, 1)                            # [n, 16, 1]
    if sys.byteorder != "little":
        as_bytes = as_bytes.view(-1, 4, 4).flip(-1).reshape(-1, 16, 1)
    bits = (as_bytes >> torch.arange(8, dtype=torch.uint8, device=counter.device)) & 1          # [n, 16, 8]
    return bits.reshape(-1)


_FUSED: list = []


def _fused_kernels():
    """dszo.directions_triton where Triton imports (CUDA machines) and DSZO_TRITON is not 0; else None."""
    if not _FUSED:
        module = None
        if os.environ.get("DSZO_TRITON", "1") != "0":
            try:
                from dszo import directions_triton as module
            except ImportError:
                module = None
        _FUSED.append(module)
    return _FUSED[0]


KINDS = {"gaussian": (_normals, 4), "rademacher": (_sign_bits, 128)}   # values per counter


def direction(kind: str, seed: int, key: int, start: int, end: int, dtype=torch.float32, device=None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Elements [start, end) of tensor `key`'s direction for `seed`: standard normal (`gaussian`) or ±1 with
    probability 1/2 each (`rademacher`: E[z zᵀ] = I as for Gaussians, so SPSA stays unbiased; no log/sin/cos and
    one Philox call per 128 values instead of per 4 -- the cheap choice for dense directions on CPUs). Written into
    `out` (end - start elements of `dtype` on `device`) where given: hot loops reuse one buffer."""
    device = torch.device(device if device is not None else "cpu")
    if end <= start:
        return torch.empty(0, dtype=dtype, device=device)
    philox_key = mix(seed, key)
    fused = _fused_kernels() if device.type == "cuda" else None
    if fused is not None:   # one Triton kernel: Philox and the transform in registers (dszo/directions_triton.py)
        values = fused.draw(kind, philox_key, start, end, device)
        return values.to(dtype) if out is None else out.copy_(values)
    return torch_ops_direction(kind, philox_key, start, end, dtype, device, out)


def torch_ops_direction(kind: str, philox_key: int, start: int, end: int, dtype, device,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """The direction from torch operations, on any device (the reference the fused kernels are tested against)."""
    fn, per = KINDS[kind]
    device = torch.device(device)
    # Counters per block: the bound on CPU blocks keeps Box–Muller's float kernels inside one ATen grain, and the
    # signs' byte temporaries under the mmap threshold (SIGN_CPU_BLOCK).
    block = DEVICE_BLOCK if device.type != "cpu" else SIGN_CPU_BLOCK if kind == "rademacher" else CPU_BLOCK
    first = start // per // ALIGN * ALIGN                        # aligned counters that hold [start, end)
    last = -(-((end - 1) // per + 1) // ALIGN) * ALIGN
    out = torch.empty(end - start, dtype=dtype, device=device) if out is None else out
    for c0 in range(first, last, block):
        c1 = min(last, c0 + block)
        values = fn(torch.arange(c0, c1, dtype=torch.int64, device=device), philox_key)
        lo, hi = max(start, per * c0), min(end, per * c1)
        out[lo - start:hi - start] = values[lo - per * c0:hi - per * c0]
    return out.mul_(-2).add_(1) if kind == "rademacher" else out   # bits -> ±1, in place: exact in any float


def gaussian(seed: int, key: int, start: int, end: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal values of flat elements [start, end) of tensor `key` for `seed`, drawn on `device`."""
    return direction("gaussian", seed, key, start, end, dtype, device)
