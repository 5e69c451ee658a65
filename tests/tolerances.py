"""Numerical tolerances derived from the computation they check, never fitted to one CPU.

Two computations of the same math round differently when their kernels differ: AVX-512 vs AVX2 vs scalar
ATen kernels, 1 vs 2 threads, a batch split over 1 or 2 ranks (other matmul blockings), a plain HF model vs
dszo's ZeRO-3 model. Each helper below bounds that difference from four things only:

- u = 2⁻²⁴, fp32's unit roundoff;
- the number of terms K of the widest reduction and the number D of dependent reductions on the path to a
  value (the probabilistic model of Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019: a K-term fp32
  reduction is off by at most λ·√K·u relative, with probability ≥ 1 − 2·exp(−λ²/2); independent
  reductions along a path add in quadrature, so √D);
- the magnitude of the quantities (read from the runs' own records);
- the conditioning of what is derived from them: a difference divided by ε, an eigenvector divided by its
  eigengap, an optimiser step, a parameter difference fed back into the next loss.

Exact (bit-for-bit) assertions are kept only where the same kernels run in the same order: same world size,
same device, same thread count, same kernel dispatch (I4, resume on the same world size).

tests/test_tolerances.py checks the model against the real rounding error of the tiny model's fp32 forward
(measured against the same forward in fp64, under whatever kernels this machine dispatches).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

U = 2.0 ** -24  # fp32 unit roundoff
LAMBDA = 5.0    # tail factor: 2·exp(−λ²/2) = 7.5e-6 chance that one value exceeds its bound


def reduction_rel(terms: int) -> float:
    """Relative rounding error of one fp32 reduction (sum, dot product) of `terms` terms."""
    return LAMBDA * math.sqrt(terms) * U


def forward_rel(widest: int, depth: int) -> float:
    """Relative error of a value computed through `depth` dependent reductions of at most `widest` terms."""
    return reduction_rel(widest) * math.sqrt(depth)


def llama_forward_rel(hidden: int, intermediate: int, layers: int) -> float:
    """A Llama forward's output (logits, losses): per layer 2 RMSNorms, q/k/v, QKᵀ, AV, o, gate/up and down
    (8 dependent reductions), then the final norm, the head and the softmax's sum (3)."""
    return forward_rel(max(hidden, intermediate), 8 * layers + 3)


# tests/conftest.py's tiny Llama: hidden 32, intermediate 64, 2 layers.
TINY_FORWARD_REL = llama_forward_rel(hidden=32, intermediate=64, layers=2)


def loss_atol(loss: float, forward_rel: float = TINY_FORWARD_REL) -> float:
    """A cross-entropy loss: Σ|∂CE/∂logit| = 2(1 − p_y) ≤ 2, and the tiny models' logits are ≤ 1 in magnitude
    (tests/test_tolerances.py checks it), so the loss is off by ≤ 2·forward_rel; max(|L|, 1) covers a larger
    loss (a sum over answer tokens)."""
    return 2 * forward_rel * max(abs(loss), 1.0)


def proj_grad_atol(loss_err: float, eps: float, one_sided: bool = False) -> float:
    """g = (L+ − L−)/(2ε) (two-sided) or (L+ − L0)/ε (AGZO): both losses' errors, divided by the step."""
    return 2 * loss_err / (eps if one_sided else 2 * eps)


def norm_from_samples(gs: list[float], p: float = 1e-3) -> float:
    """A bound on ‖∇L‖ from k measured g = ∇L·z (z ~ N(0, I), so Σg²/‖∇L‖² ~ χ²_k): the Chernoff lower tail
    P(χ²_k < x) ≤ (e·x/k)^(k/2) puts x = (k/e)·p^(2/k) at probability p, so ‖∇L‖ ≤ √(Σg²/x)."""
    k = len(gs)
    return math.sqrt(sum(g * g for g in gs) / ((k / math.e) * p ** (2 / k)))


def gaussian_rms(n: int) -> float:
    """A bound on the rms of n standard normal draws: rms² ~ χ²ₙ/n, within 1 + λ·√(2/n)."""
    return math.sqrt(1 + LAMBDA * math.sqrt(2 / max(n, 1)))


def gaussian_max(n: int) -> float:
    """A bound on max|z| over n standard normal draws: √(2 ln 2n) + λ/2 (exceeded with probability < 1e-3)."""
    return math.sqrt(2 * math.log(2 * max(n, 1))) + LAMBDA / 2


@dataclass
class Trajectory:
    """Tolerances for two runs of the same ZO steps that round differently (a 1-rank vs a 2-rank run, a run vs
    the reference), from one run's step records. Every bound is for the *difference of two* computations, each
    within the rounding model of the exact value.

    update:    "adam": step 0 moves every element by lr·sign(g·z), whatever |g| (so it only needs g's sign to be
               certain); later, m̂/√v̂ is homogeneous of degree 0 in the g's, so a relative error δ in them moves
               it by ≤ 2δ (≤ 2 once δ ≥ 1). "sgd" (SGD, LOZO-M's averaged momentum): θ moves by lr·g_s·z_s with
               weights summing to ≤ 1 over the steps, so Δθ ≤ lr·Σ|Δg_s|·max|z|.
    n:         trainable elements.
    z_max:     bound on |z| per element of the update direction ("sgd").
    direction_rel: relative error of the direction itself (AGZO's A, computed from this step's activations).
    z_norm:    ‖Δz‖₂ / direction_rel (default √n).
    momentum:  β of an averaged momentum N ← β·N + (1 − β)·g·z (LOZO-M): step s's g·z has moved θ by the share
               1 − β^k of it k steps later.
    adam_from_start: the records start at Adam's first step (False: from a resumed checkpoint's state).
    theta_max: bound on |θ| (each update rounds by u·|θ| in each run); 1 for the tiny models: norm scales start at 1,
               linear weights at N(0, 0.02²), ZO-Act's B at 0 and moves by ≤ 2·lr per step.

    A parameter difference Δθ feeds back into later losses: for "sgd" Δθ = lr·Σ Δg_s·z_s and ∇L·z_s is the
    directional derivative g_s measured at step s (allowed to have changed by as much again since: 2·max|g|);
    otherwise |∇L·Δθ| ≤ ‖∇L‖·√n·max|Δθ| (Cauchy–Schwarz), with ‖∇L‖ bounded from the g's (norm_from_samples).
    Both runs must perturb along the same directions: ZO-Act runs on different bases are compared through the
    reference on each run's own basis (tests/test_distributed.py).
    """

    records: list[dict]
    eps: float
    lr: float
    update: str
    n: int
    z_max: float = 0.0
    z_norm: float = 0.0
    momentum: float = 0.0
    adam_from_start: bool = True
    theta_max: float = 1.0
    one_sided: bool = False
    direction_rel: float = 0.0
    forward_rel: float = TINY_FORWARD_REL

    def __post_init__(self):
        gs = [abs(r["proj_grad"]) for r in self.records]
        grad_norm = norm_from_samples(gs)
        weight = lambda k: 1 - self.momentum ** k  # noqa: E731  share of step s's g·z applied k steps later
        self._loss, self._g, self._param = [], [], []
        param, delta = 0.0, 0.0
        for t, r in enumerate(self.records):
            if self.update == "sgd":  # ∇L·Δθ = lr·Σ w·(Δg_s·∇L·z_s + g_s·∇L·Δz_s), ‖Δz_s‖₂ ≤ direction_rel·z_norm
                feedback = self.lr * sum(weight(t - s) * (self._g[s] * 2 * max(gs) + gs[s] * grad_norm
                                                          * self.direction_rel * (self.z_norm or math.sqrt(self.n)))
                                         for s in range(t))
            else:
                feedback = grad_norm * math.sqrt(self.n) * param
            lerr = 2 * loss_atol(max(abs(r["loss_plus"]), abs(r["loss_minus"])), self.forward_rel) + feedback
            gerr = proj_grad_atol(lerr, self.eps, self.one_sided)
            self._loss.append(lerr)
            self._g.append(gerr)
            if self.update == "adam" and (t > 0 or not self.adam_from_start):
                # the step mixes every g so far: the largest relative error counts
                delta = max(delta, gerr / max(gs[t], 1e-30), self._g[0] / max(gs[0], 1e-30))
                param += self.lr * 2 * min(delta, 1.0)
            param += 2 * U * self.theta_max  # the update's own rounding, in each run
            self._param.append(param)
        if self.update == "sgd":
            steps = len(self.records)
            per_step = [weight(steps - s) * (self._g[s] + gs[s] * self.direction_rel) for s in range(steps)]
            self._sgd_sum = self.lr * sum(per_step)
            self._param[-1] = self._sgd_sum * self.z_max + 2 * steps * U * self.theta_max

    def loss(self, t: int) -> float:
        """Allowed |ΔL±| at step t (0-based)."""
        return self._loss[t]

    def proj_grad(self, t: int) -> float:
        """Allowed |Δg| at step t."""
        return self._g[t]

    def param(self) -> float:
        """Allowed max|Δθ| per element after every recorded step ("sgd": from z_max; param_rms is the normwise
        bound rms(Δθ) ≤ lr·Σ w·|Δg_s|·rms(z), far tighter where z is a product such as LOZO's U Vᵀ)."""
        assert self.update != "sgd" or self.z_max > 0, "Trajectory(update='sgd') needs z_max for param()"
        return self._param[-1]

    def param_rms(self, z_rms: float) -> float:
        """"sgd": allowed root-mean-square of Δθ over a tensor whose directions have rms ≤ z_rms."""
        return self._sgd_sum * z_rms + 2 * len(self.records) * U * self.theta_max

    def assert_conditioned(self) -> None:
        """Every g's sign is certain. When a change to the code or the test makes a step ill-conditioned
        (g ≈ 0), this says so instead of comparing with a vacuous tolerance."""
        for t, r in enumerate(self.records):
            assert abs(r["proj_grad"]) > 2 * self._g[t], (
                f"step {t}: |g| = {abs(r['proj_grad']):.2e} is within its rounding bound ±{self._g[t]:.2e}: "
                "the comparison is ill-conditioned; compare fewer steps or use a larger zo_eps")


def assert_meaningful(bound: float, moved: float, what: str = "") -> None:
    """The comparison can fail: the bound on a parameter difference is under a quarter of how far training moved
    the parameter, so a bug that changes the update by a quarter of itself or more is caught (a vacuous
    tolerance would accept any bug)."""
    assert bound < 0.25 * moved, f"{what} tolerance {bound:.2e} is not small next to the change {moved:.2e}"


def eigvec_atol(sigma_rel: float, gap_rel: float) -> float:
    """Davis–Kahan: an eigenvector of Σ + ΔΣ moves by ≤ √2·‖ΔΣ‖/gap; both relative to ‖Σ‖."""
    return math.sqrt(2) * sigma_rel / gap_rel


def basis_atol(gap_rel: float, trace_ratio: float, forward_rel: float = TINY_FORWARD_REL) -> float:
    """ZO-Act's V: Σ = Σ h hᵀ from activations h off by forward_rel each, so ‖ΔΣ‖ ≤ 2·forward_rel·Σ‖h‖² =
    2·forward_rel·tr Σ (trace_ratio = tr Σ / λ_max); accumulated and decomposed in fp64, exact next to that.
    Davis–Kahan turns it into an eigenvector error (gap_rel: the kept eigenvalues' gap / λ_max)."""
    return eigvec_atol(2 * forward_rel * trace_ratio, gap_rel)


# Backprop: every gradient element passes the forward's reductions and their transposes; a weight's gradient
# also sums over the batch's tokens (8 rows × ≤ 16 tokens in the tests).
TINY_BACKWARD_REL = forward_rel(max(64, 8 * 16), 2 * (8 * 2 + 3))


def first_order_bounds(steps: list[dict], start: dict, lr: float, momentum: float,
                       backward_rel: float = TINY_BACKWARD_REL) -> list[dict]:
    """Normwise bounds on ‖Δθ‖₂ (all trainable tensors together) after each backprop step of torch's SGD with
    momentum (buf ← β·buf + g, θ ← θ − lr·buf), for two runs that round differently, from a reference's trajectory (fp32
    too, one unpadded example at a time: within the same model): steps[t] = {"loss", "grads": {name: g_t}, "params": {name: θ after step t}}, `start` = θ before
    step 0. The gradient is off by 2·backward_rel·‖g‖₂ (normwise rounding), plus its response to the parameter
    difference, ‖H·Δθ‖ ≤ λ·κ·‖Δθ‖ with κ the largest secant ‖Δg‖/‖Δθ‖ of the reference's own steps so far (‖H‖
    along the trajectory; λ for other directions). The update is linear in the error. The loss moves by
    ≤ ‖∇L‖·‖Δθ‖. Adam has no such bound: it divides each element by its own gradient, so an element whose
    gradient is within rounding of 0 may step by ±lr either way. Returns per step {"loss", "param"}."""
    names = list(start)
    norm = lambda d: math.sqrt(sum(float((t.double() ** 2).sum()) for t in d.values()))  # noqa: E731
    dtheta = buf = curvature = 0.0
    out = []
    for t, s in enumerate(steps):
        gnorm = norm(s["grads"])
        loss = 2 * loss_atol(s["loss"]) + gnorm * dtheta
        if t > 0:
            before, earlier = steps[t - 1]["params"], (steps[t - 2]["params"] if t > 1 else start)
            moved = norm({n: before[n] - earlier[n] for n in names})
            if moved > 0:
                curvature = max(curvature, norm({n: s["grads"][n] - steps[t - 1]["grads"][n] for n in names}) / moved)
        err = 2 * backward_rel * gnorm + LAMBDA * curvature * dtheta
        buf = momentum * buf + err
        dtheta = dtheta + lr * buf + 2 * U * norm(s["params"])  # and the update's own rounding, in each run
        out.append({"loss": loss, "param": dtheta})
    return out
