"""dszo/directions.py's counter-based directions as fused Triton kernels (CUDA).

The torch-op implementation runs Philox4x32-10 as ~60 elementwise passes over int64 tensors; on a GPU that is
memory traffic for nothing. Here one program computes BLOCK counters' Philox words in registers (32-bit
arithmetic: `umulhi` for the high words, wrapping products for the low ones) and writes only the values: four
Box–Muller normals per counter, or 128 signs. The integer words are the same as the torch path's, bit for bit
(the tests compare them); the normals' last bits depend on the device's log/sqrt/cos/sin, as torch.randn's do, so
I1 stays bit-exact on one kind of device. directions.direction() uses these kernels for CUDA tensors when Triton
imports (DSZO_TRITON=0 turns them off).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

M32 = 0xFFFFFFFF
BLOCK = 256


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 counter words (c0..c3) under the key (k0, k1): the rounds of directions.philox4x32.
    Every constant is a uint32 tensor, so that no product or sum is promoted to 64 bits (they wrap mod 2^32)."""
    m0 = tl.full(c0.shape, 0xD2511F53, tl.uint32)
    m1 = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
    w0 = tl.full(c0.shape, 0x9E3779B9, tl.uint32)
    w1 = tl.full(c0.shape, 0xBB67AE85, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + w0
        k1 = k1 + w1
    return c0, c1, c2, c3


@triton.jit
def _words(first, key_lo, key_hi, BLOCK: tl.constexpr):
    """Counters first + program·BLOCK + [0, BLOCK) (int64) and their four Philox words."""
    c = first + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    k0 = tl.full([BLOCK], 0, tl.uint32) + key_lo.to(tl.uint32)
    k1 = tl.full([BLOCK], 0, tl.uint32) + key_hi.to(tl.uint32)
    w0, w1, w2, w3 = _philox((c & 0xFFFFFFFF).to(tl.uint32), (c >> 32).to(tl.uint32), zero, zero, k0, k1)
    return c, w0, w1, w2, w3


@triton.jit
def _uniform(w):
    """A 24-bit uniform in (0, 1]: ((w >> 8) + 0.5) / 2^24, as directions._normals."""
    return ((w >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _store(out_ptr, idx, value, start, end):
    tl.store(out_ptr + (idx - start), value, mask=(idx >= start) & (idx < end))


@triton.jit
def _gaussian_kernel(out_ptr, start, end, first, key_lo, key_hi, BLOCK: tl.constexpr):
    c, w0, w1, w2, w3 = _words(first, key_lo, key_hi, BLOCK)
    r0 = tl.sqrt(-2.0 * tl.log(_uniform(w0)))
    a0 = 6.283185307179586 * _uniform(w1)
    r1 = tl.sqrt(-2.0 * tl.log(_uniform(w2)))
    a1 = 6.283185307179586 * _uniform(w3)
    base = 4 * c   # element 4c + j takes normal j of counter c: r0·cos a0, r0·sin a0, r1·cos a1, r1·sin a1
    _store(out_ptr, base, r0 * tl.cos(a0), start, end)
    _store(out_ptr, base + 1, r0 * tl.sin(a0), start, end)
    _store(out_ptr, base + 2, r1 * tl.cos(a1), start, end)
    _store(out_ptr, base + 3, r1 * tl.sin(a1), start, end)


@triton.jit
def _sign_bits(out_ptr, c, w, word: tl.constexpr, start, end):
    bit = tl.arange(0, 32)
    b = (w[:, None] >> bit[None, :].to(tl.uint32)) & 1
    _store(out_ptr, 128 * c[:, None] + 32 * word + bit[None, :], 1.0 - 2.0 * b.to(tl.float32), start, end)


@triton.jit
def _sign_kernel(out_ptr, start, end, first, key_lo, key_hi, BLOCK: tl.constexpr):
    c, w0, w1, w2, w3 = _words(first, key_lo, key_hi, BLOCK)
    _sign_bits(out_ptr, c, w0, 0, start, end)   # element 128c + 32·word + bit: bit `bit` of word `word`
    _sign_bits(out_ptr, c, w1, 1, start, end)
    _sign_bits(out_ptr, c, w2, 2, start, end)
    _sign_bits(out_ptr, c, w3, 3, start, end)


KERNELS = {"gaussian": (_gaussian_kernel, 4), "rademacher": (_sign_kernel, 128)}


def draw(kind: str, philox_key: int, start: int, end: int, device) -> torch.Tensor:
    """fp32 values of elements [start, end) of the direction keyed `philox_key` (= directions.mix(seed, key))."""
    kernel, per = KERNELS[kind]
    out = torch.empty(end - start, dtype=torch.float32, device=device)
    first, last = start // per, (end - 1) // per + 1
    grid = (triton.cdiv(last - first, BLOCK),)
    kernel[grid](out, start, end, first, philox_key & M32, (philox_key >> 32) & M32, BLOCK=BLOCK)
    return out
