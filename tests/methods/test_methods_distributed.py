"""MeZO, LOZO, LOZO-M and AGZO on real ranks: I1 (1 rank = 2 ranks = 2 nodes) and I2 (= an independent
plain-PyTorch computation of the method's math, tests/reference.py)."""
from __future__ import annotations

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from compare import assert_steps_close, assert_tensors_rms_close
from conftest import OTHER_KERNELS, REPO, launch, read_metrics, run_group, step_records, tiny_config
from tolerances import TINY_FORWARD_REL, Trajectory, assert_meaningful, gaussian_rms

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

GLOBAL_BATCH, STEPS = 8, 3
# A run whose |g| at some step is within its rounding bound cannot be compared step by step (Trajectory refuses
# it as ill-conditioned): the seed is one whose 3 steps are well-conditioned for every method here (with the
# counter-based directions of issue 14, seed 7 put LOZO's step 2 and AGZO's step 1 within their bounds).
SEED = 21
METHODS = {
    "mezo": {"method.name": "mezo", "method.zo_eps": 1e-2, "optim": "sgd", "learning_rate": 1e-2},
    "lozo": {"method.name": "lozo", "method.zo_eps": 1e-2, "method.rank": 2, "method.lazy_interval": 2,
             "optim": "sgd", "learning_rate": 1e-2},
    # lr 1e-3: AGZO's one-sided g has twice the rounding error of a two-sided one and its direction carries the
    # activations' rounding; at 1e-2 the feedback into step 1's loss puts g's sign within its rounding bound.
    "agzo": {"method.name": "agzo", "method.zo_eps": 1e-2, "method.rank": 1, "method.power_iters": 3,
             "optim": "sgd", "learning_rate": 1e-3},
    "lozo_m": {"method.name": "lozo_m", "method.zo_eps": 1e-2, "method.rank": 2, "method.lazy_interval": 2,
               "method.momentum": 0.9, "optim": "sgd", "learning_rate": 1e-2},
}


def _cfg(tiny_model, tiny_data, out, method, n_ranks):
    over = {k: v for k, v in METHODS[method].items()}
    cfg = tiny_config(tiny_model, tiny_data, out, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // n_ranks,
                      seed=SEED, **{k: v for k, v in over.items() if not k.startswith("method.")})
    cfg["method"] = {k.split(".", 1)[1]: v for k, v in over.items() if k.startswith("method.")}
    return cfg


@pytest.fixture(scope="module", params=list(METHODS))
def method_runs(request, tiny_model, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    out = {}
    for n in (1, 2):  # the 2-rank run on the scalar kernels: I1 also compares two kinds of CPU kernels
        cfg = _cfg(tiny_model, tiny_data, root / f"r{n}", request.param, n)
        launch(cfg, n, env=OTHER_KERNELS if n == 2 else None)
        out[f"r{n}"] = root / f"r{n}"
    return request.param, out


def _trained(run):
    return load_file(str(run / "trainable.safetensors"))


def tolerance(method: str, run, tiny_model, records=None) -> tuple[Trajectory, dict]:
    """Two runs of `method` (SGD) that round differently, compared normwise per tensor by the rms of z over it:
    Gaussian for MeZO and the 1-D tensors; LOZO's U Vᵀ: z_ij = Σ_k u_ik·v_jk, so by Cauchy–Schwarz
    rms(z) ≤ rank·rms(u)·rms(v); AGZO's R Aᵀ, A (n×rank) with orthonormal columns: ‖R Aᵀ‖_F = ‖R‖_F, so
    rms = √(rank/n)·rms(r). AGZO's A comes from this step's
    activations: each of the power iteration's products with HᵀH carries their error twice (QR is backward
    stable), so A is off by ≤ 2·(power_iters + 1)·2·forward_rel -- an estimate that assumes the iteration is not
    near a tie between its leading directions. Returns the trajectory and each tensor's bound."""
    cfg = yaml.safe_load((run.parent / f"{run.name}.yaml").read_text())
    m, trained = cfg["method"], _trained(run)
    rank = m.get("rank", 1)

    def z_rms(t):
        if method == "mezo" or t.dim() == 1:
            return gaussian_rms(t.numel())
        rows, cols = t.shape
        if method == "agzo":
            return math.sqrt(rank / cols) * gaussian_rms(rows * rank)
        return rank * gaussian_rms(rows * rank) * gaussian_rms(cols * rank)

    direction_rel = 2 * (m["power_iters"] + 1) * 2 * TINY_FORWARD_REL if method == "agzo" else 0.0
    # ‖R ΔAᵀ‖_F ≤ ‖R‖_F·‖ΔA‖₂, R: rows×rank Gaussian per 2-D weight
    r_norm = math.sqrt(sum(t.shape[0] * rank * gaussian_rms(t.shape[0] * rank) ** 2 for t in trained.values() if t.dim() == 2))
    tol = Trajectory(records or step_records(run), eps=m["zo_eps"], lr=cfg["learning_rate"], update="sgd",
                     n=sum(t.numel() for t in trained.values()), one_sided=method == "agzo",
                     direction_rel=direction_rel, z_norm=r_norm, momentum=m.get("momentum", 0.0))
    tol.assert_conditioned()
    base = load_file(str(tiny_model / "model.safetensors"))
    bounds = {k: tol.param_rms(z_rms(t)) for k, t in trained.items()}
    for k, t in trained.items():
        assert_meaningful(bounds[k], float((t - base[k.replace(".base.", ".")]).pow(2).mean().sqrt()), k)
    return tol, bounds


def _close(a, b, method, tiny_model):
    assert_tensors_rms_close(_trained(a), _trained(b), tolerance(method, a, tiny_model)[1].get)


def test_I1_one_rank_equals_two_ranks(method_runs, tiny_model):
    method, runs = method_runs
    _close(runs["r1"], runs["r2"], method, tiny_model)
    assert_steps_close(step_records(runs["r1"]), step_records(runs["r2"]), tolerance(method, runs["r1"], tiny_model)[0])


@pytest.mark.netns
def test_I1_two_nodes_equal_one_rank(method_runs, tiny_model, tiny_data, tmp_path):
    from test_distributed import _can_make_netns

    reason = _can_make_netns()
    if reason:
        pytest.skip(f"2-node test needs network namespaces: {reason}")
    method, runs = method_runs
    cfg_path = tmp_path / "n2.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(tiny_model, tiny_data, tmp_path / "n2", method, 2)))
    proc = run_group(["bash", str(REPO / "launch" / "sim_cluster.sh"), "2", "1", "dszo/train.py", "--config",
                      str(cfg_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    _close(runs["r1"], tmp_path / "n2", method, tiny_model)


def test_I2_equals_plain_pytorch_reference(method_runs, tiny_model):
    from reference import ReferenceAGZO, ReferenceLOZO, ReferenceMeZO

    method, runs = method_runs
    cfg = yaml.safe_load((runs["r2"].parent / "r2.yaml").read_text())
    m = cfg["method"]
    common = dict(data_cfg=cfg["data"], seed=cfg["seed"], eps=m["zo_eps"], lr=cfg["learning_rate"])
    if method == "mezo":
        ref = ReferenceMeZO(tiny_model, **common)
        final = dict(ref.params)
    elif method == "agzo":
        ref = ReferenceAGZO(tiny_model, **common, rank=m["rank"], power_iters=m["power_iters"])
        final = ref.weights
    else:
        ref = ReferenceLOZO(tiny_model, **common, rank=m["rank"], lazy_interval=m["lazy_interval"],
                            momentum=m.get("momentum", 0.0))
        final = ref.weights
    tol, bounds = tolerance(method, runs["r2"], tiny_model)
    assert_steps_close(step_records(runs["r2"]), [ref.step(t, GLOBAL_BATCH) for t in range(STEPS)], tol)
    trained = _trained(runs["r2"])
    assert set(trained) == set(final)
    assert_tensors_rms_close(trained, {k: p.detach() for k, p in final.items()}, bounds.get)


def test_training_moves_only_what_the_method_trains(method_runs, tiny_model):
    method, runs = method_runs
    base = load_file(str(tiny_model / "model.safetensors"))
    trained = _trained(runs["r2"])
    moved = [k for k in trained if not torch.equal(trained[k], base[k.replace(".base.weight", ".weight")])]
    assert moved, "no trainable tensor changed"
    setup = next(r for r in read_metrics(runs["r2"]) if r.get("event") == "setup")
    total = sum(t.numel() for t in trained.values())
    assert setup["trainable_elements_local"] < total  # sharded, not replicated


def test_functional_doubled_batch_gives_the_two_forward_g(method_runs, tiny_model, tiny_data, tmp_path):
    """Design §2.3: the one-forward [batch; batch] path is exact: same L+, L-, g as two forwards."""
    method, runs = method_runs
    if method in ("mezo", "agzo"):
        pytest.skip(f"{method} has no doubled-batch path to compare (dense directions / one-sided estimate)")
    cfg = _cfg(tiny_model, tiny_data, tmp_path / "two_fwd", method, 1)
    cfg["method"]["functional_perturbation"] = False
    launch(cfg, 1)
    # The same math with another batch shape (other matmul blockings): within the rounding model.
    assert_steps_close(step_records(runs["r1"]), step_records(tmp_path / "two_fwd"), tolerance(method, runs["r1"], tiny_model)[0])


def test_I3_all_reduced_bytes_per_step(method_runs, tiny_model):
    """Beyond ZeRO-3's gathers: 3 float64 per step; AGZO adds its all-reduced sketches, measured here."""
    method, runs = method_runs
    cfg = yaml.safe_load((runs["r2"].parent / "r2.yaml").read_text())
    expected_calls, expected_bytes = 1, 32  # [Σ n·L+, Σ n·L−, Σ n, stop request] as float64
    if method == "agzo":
        from safetensors.torch import load_file as lf

        widths = [t.shape[1] for k, t in lf(str(tiny_model / "model.safetensors")).items()
                  if t.dim() == 2 and "embed" not in k and "lm_head" not in k]
        rounds = cfg["method"]["power_iters"] + 1
        expected_calls += rounds
        expected_bytes += rounds * 4 * cfg["method"]["rank"] * sum(widths)
    for rec in step_records(runs["r2"]):
        comm = rec["comm"]
        assert comm["calls"]["all_reduce"] == expected_calls and comm["bytes"]["all_reduce"] == expected_bytes
        assert set(comm["bytes"]) - {"all_reduce"} <= {"all_gather_into_tensor", "all_gather_single", "_all_gather_base"}
