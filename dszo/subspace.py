"""Dominant subspaces of activation second moments, from sketches (plain torch).

Randomized block power iteration finished by a Nyström step: never forms the n x n matrix Σ h hᵀ, only
n x k sketches S = Σ h (hᵀ Q), which ranks all-reduce before each orthonormalisation. With p power
iterations the data is read p + 1 times; the result is exact when Σ has rank <= k.
Shared by ZO-Act (basis once, over calibration data) and AGZO (every step, over the batch).
"""
from __future__ import annotations

import torch


def orthonormalize(s: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(s.double())
    return q.to(s.dtype)


def canonical_signs(v: torch.Tensor) -> torch.Tensor:
    """Flip each column so its largest-magnitude entry is positive (eigenvectors are defined up to sign)."""
    idx = v.abs().argmax(dim=0)
    signs = torch.sign(v[idx, torch.arange(v.shape[1], device=v.device)])
    signs[signs == 0] = 1
    return v * signs


def nystrom_basis(q: torch.Tensor, s: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r eigenpairs of the Nyström approximation Σ ≈ S (QᵀS)⁺ Sᵀ, given S = Σ Q (Q orthonormal, n x k).

    Returns (V n x r with orthonormal, sign-canonical columns, eigenvalues r). Uses everything the last
    sketch holds: one pass fewer than a Rayleigh-Ritz step for the same accuracy.
    """
    q, s = q.double(), s.double()
    c = q.T @ s
    lam, w = torch.linalg.eigh(0.5 * (c + c.T))
    keep = lam > lam.max().clamp(min=0) * 1e-12 * c.shape[0]
    f = s @ (w[:, keep] / lam[keep].sqrt())          # Σ_nys = F Fᵀ
    u, sig, _ = torch.linalg.svd(f, full_matrices=False)
    r_eff = min(r, u.shape[1])
    v = torch.zeros(q.shape[0], r, dtype=torch.float64, device=q.device)
    evals = torch.zeros(r, dtype=torch.float64, device=q.device)
    v[:, :r_eff], evals[:r_eff] = canonical_signs(u[:, :r_eff]), sig[:r_eff] ** 2
    return v, evals


def sketch_width(n: int, r: int, oversample: int) -> int:
    return min(n, r + oversample)
