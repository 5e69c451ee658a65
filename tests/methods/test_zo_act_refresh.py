"""ZO-Act's basis refresh (method.basis_refresh_steps): the coefficients re-expressed in the new basis against an
independent least-squares reference, the layer's function kept where the spans agree, the sharded computation
(slices that cut rows, as DeepSpeed's do) equal to the single-rank one, and when it happens."""
from __future__ import annotations

import copy
import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from dszo.config import TrainConfig
from dszo.directions import tensor_key
from dszo.errors import ConfigError
from dszo.methods.base import Partition
from dszo.methods.zo_act import ZOAct, ZOActConfig
from conftest import launch, load_adapter, tiny_config
from methods.local_runtime import LocalRuntime
from methods.test_zo_act_basis import Inputs
from tolerances import U

N_IN, N_OUT, R = 9, 7, 2   # V 9x2 and B 7x2: split over 2 ranks, each tensor's halves cut a row


class ThreadRanks:
    """`world` ranks emulated by threads of one process: rank k owns elements [k·c, (k+1)·c) of every flattened
    tensor (c = ⌈numel / world⌉); the all-reduce sums the ranks' tensors in rank order at a barrier."""

    def __init__(self, world: int) -> None:
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def run(self, work) -> list:
        """work(k) on every rank k at once; the results in rank order."""
        results, errors = [None] * self.world, []

        def target(k):
            try:
                results[k] = work(k)
            except BaseException as e:   # noqa: BLE001 -- re-raised in the test's thread
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(k,)) for k in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class ShardRuntime(LocalRuntime):
    def __init__(self, model, group: ThreadRanks, k: int) -> None:
        super().__init__(model)
        self.group, self.k = group, k

    def partition(self, name, p):
        n, world = p.numel(), self.group.world
        c = -(-n // world)
        lo, hi = min(n, self.k * c), min(n, (self.k + 1) * c)
        return Partition(name, tensor_key(name), tuple(p.shape), lo, hi, p.data.view(-1)[lo:hi])

    def all_reduce_sum(self, t):
        g = self.group
        g.slots[self.k] = t.clone()
        g.barrier.wait()
        total = g.slots[0].clone()
        for s in g.slots[1:]:
            total += s
        g.barrier.wait()
        return total


def _method(model, **method) -> ZOAct:
    cfg = TrainConfig()
    cfg.optim = "adam"
    cfg.method.rank, cfg.method.basis_oversample = R, N_IN   # the sketch spans every column: exact in fp64
    for k, v in method.items():
        setattr(cfg.method, k, v)
    m = ZOAct(cfg, run_seed=0)
    m.attach(model)
    return m


def _batches(seed: int, scales: torch.Tensor, mix: torch.Tensor, count: int = 4) -> list[Inputs]:
    g = torch.Generator().manual_seed(seed)
    return [Inputs((torch.randn(3, 5, scales.numel(), generator=g) * scales) @ mix.T) for _ in range(count)]


def _trained_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"B": torch.randn(N_OUT, R, generator=g), "exp_avg": torch.randn(N_OUT, R, generator=g) * 1e-3,
            "exp_avg_sq": torch.rand(N_OUT, R, generator=g) * 1e-6}


def _refresh(world: int, calibration: list, later: list, trained: dict, **method) -> dict[str, torch.Tensor]:
    """Bases from `calibration`, B and Adam's moments set to `trained`, then a refresh on `later`; each rank
    gets every world-th batch. Returns the whole V before and after, B and the moments after."""
    with torch.random.fork_rng():
        torch.manual_seed(0)   # the same W in every call: output_rms scales V by the layer's output W h
        base = nn.Sequential(nn.Linear(N_IN, N_OUT))
    group = ThreadRanks(world)
    models = [copy.deepcopy(base) for _ in range(world)]
    methods = [_method(model, **method) for model in models]
    # One storage for V and B, as ZeRO-3's gathered parameters: every rank's forward sees the whole tensors,
    # each rank writes only its slice (its sketch buffers stay its own).
    for model in models[1:]:
        model[0].zo_V, model[0].zo_B = models[0][0].zo_V, models[0][0].zo_B
    models[0][0].zo_B.data.copy_(trained["B"])   # the initial calibration runs at V = 0: B plays no part in it

    def work(k):
        m, rt = methods[k], ShardRuntime(models[k], group, k)
        m.setup(rt, calibration[k::world])
        group.barrier.wait()   # every rank has written its slice of the first V
        before = models[k][0].zo_V.detach().clone()
        part = m.partitions["0.zo_B"]
        m.estimate.optimizer.state["0.zo_B"] = {key: trained[key].reshape(-1)[part.start:part.end].clone()
                                                for key in ("exp_avg", "exp_avg_sq")}
        group.barrier.wait()   # every rank has read the old V before any writes the new one
        m.refresh_bases(rt, later[k::world])
        return before, m, part

    out = {}
    for before, m, part in group.run(work):   # each rank contributes the slices it owns
        out["V_before"] = before
        v = m.fixed_partitions["0.zo_V"]
        pieces = {"V": (v, v.local), "B": (part, part.local),
                  **{key: (part, t) for key, t in m.estimate.optimizer.state["0.zo_B"].items()}}
        for key, (p, local) in pieces.items():
            out.setdefault(key, torch.full((p.numel,), float("nan")))[p.start:p.end] = local
    shapes = {"V": (N_IN, R), "V_before": (N_IN, R)}
    return {k: t.view(shapes.get(k, (N_OUT, R))) for k, t in out.items()}


def _reference(v_old, v_new, trained) -> dict[str, torch.Tensor]:
    """Least squares, solved by QR (torch.linalg.lstsq), in float64: T = argmin ‖V' Tᵀ − V‖, so that
    B T V'ᵀ is BVᵀ's best fit in the new basis; the moments transform as the coefficients (v: by T∘T)."""
    t = torch.linalg.lstsq(v_new.double(), v_old.double()).solution.T
    return {"B": trained["B"].double() @ t, "exp_avg": trained["exp_avg"].double() @ t,
            "exp_avg_sq": trained["exp_avg_sq"].double() @ (t * t)}


def _full_rank_data(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.logspace(1, -1, N_IN), torch.linalg.qr(torch.randn(N_IN, N_IN, generator=g))[0]


def _tolerance(ref: torch.Tensor) -> float:
    """fp32 storage of V' (≤ U relative each) enters T through ≤ 2·N_IN-term products of O(1) entries, then
    B T adds R-term fp64 sums, and the result is rounded to fp32 once more."""
    return float(ref.abs().max()) * (2 * 2 * N_IN * U + 2 * U)


@pytest.mark.parametrize("world,scale", [(1, "orthonormal"), (2, "orthonormal"), (2, "unit_rms"),
                                                     (2, "output_rms")])
def test_the_coefficients_follow_the_new_basis_as_least_squares_does(world, scale):
    scales, mix = _full_rank_data(0)
    calibration = _batches(1, scales, mix)
    later = _batches(2, scales * torch.linspace(0.3, 3.0, N_IN), mix)   # the activations' spectrum changed
    trained = _trained_state(3)
    got = _refresh(world, calibration, later, trained, basis_scale=scale)
    assert float((got["V"] - got["V_before"]).abs().max()) > 0.1   # a new basis, not the old one again
    ref = _reference(got["V_before"], got["V"], trained)
    for key in ("B", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(got[key].double(), ref[key], atol=_tolerance(ref[key]), rtol=0)
    assert bool((got["exp_avg_sq"] >= 0).all())


def test_two_ranks_equal_one_rank():
    scales, mix = _full_rank_data(4)
    calibration, later = _batches(5, scales, mix), _batches(6, scales.flip(0), mix)
    trained = _trained_state(7)
    one, two = _refresh(1, calibration, later, trained), _refresh(2, calibration, later, trained)
    # the sketches' fp64 sums add up in another order (~N·u₆₄ over the eigen-gap), then V is rounded to fp32:
    # at most one ulp apart; B and the moments inherit that through T
    torch.testing.assert_close(two["V"], one["V"], atol=2 * U * float(one["V"].abs().max()), rtol=0)
    for key in ("B", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(two[key].double(), one[key].double(), atol=2 * _tolerance(one[key]), rtol=0)


def test_the_layer_computes_the_same_function_when_the_spans_agree():
    g = torch.Generator().manual_seed(8)
    span = torch.linalg.qr(torch.randn(N_IN, R, generator=g))[0]
    scales = torch.tensor([4.0, 1.5])

    def in_span(seed):   # activations in span(u) only: every basis computed from them spans span(u)
        gg = torch.Generator().manual_seed(seed)
        return [Inputs((torch.randn(3, 5, R, generator=gg) * scales) @ span.T) for _ in range(3)]

    trained = _trained_state(9)
    got = _refresh(2, in_span(10), in_span(11), trained)
    before = trained["B"].double() @ got["V_before"].double().T
    after = got["B"].double() @ got["V"].double().T
    # the two bases agree to their fp32 rounding and the data's (fp32 inputs are off span(u) by ~U)
    torch.testing.assert_close(after, before, atol=float(before.abs().max()) * 8 * N_IN * U, rtol=0)


def test_the_refresh_runs_every_n_steps_and_not_at_the_start():
    scales, mix = _full_rank_data(12)
    model = nn.Sequential(nn.Linear(N_IN, N_OUT))
    m, rt = _method(model, basis_refresh_steps=2), LocalRuntime(model)
    m.setup(rt, _batches(13, scales, mix))
    first = model[0].zo_V.detach().clone()
    for t in (0, 1):
        m.begin_step(t, _batches(14 + t, scales.flip(0), mix), rt)
        assert torch.equal(model[0].zo_V.detach(), first), t
    m.begin_step(2, _batches(16, scales.flip(0), mix), rt)
    assert not torch.equal(model[0].zo_V.detach(), first)


def test_refresh_option_checks_and_replay():
    assert ZOActConfig().capabilities().replayable
    assert not ZOActConfig(basis_refresh_steps=50).capabilities().replayable
    with pytest.raises(ConfigError, match="basis_refresh_steps must be >= 0"):
        ZOActConfig(basis_refresh_steps=-1).validate()


def _checkpoint_tensor(folder: Path, key: str) -> torch.Tensor:
    """A tensor of a dszo checkpoint, assembled from every rank's slice."""
    whole, shape = None, None
    for path in sorted(folder.glob("rank*.safetensors")):
        with safe_open(str(path), "pt") as f:
            start, end, shape = json.loads(f.metadata()["dszo_index"])[key]
            whole = torch.full((math.prod(shape),), float("nan")) if whole is None else whole
            whole[start:end] = f.get_tensor(key).reshape(-1)
    return whole.view(shape)


@pytest.mark.multirank
@pytest.mark.slow
def test_a_run_refreshes_its_bases_and_resumes_across_the_refresh(tiny_model, tiny_data, tmp_path):
    """2 ranks under ZeRO-3, a refresh before step 3 (t = 2); resumed from the checkpoint saved after step 2,
    the run redoes the refresh from the same batches and ends bit-identical (same ranks and kernels, as I4)."""
    base = tiny_config(tiny_model, tiny_data, tmp_path / "run")
    cfg = {**base, "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 4,
           "method": {**base["method"], "basis_refresh_steps": 2}}
    launch(cfg, 2)
    run = tmp_path / "run"
    final = load_adapter(run)
    v_key = next(k for k in final if k.endswith(".zo_V"))
    before = _checkpoint_tensor(run / "checkpoint-2", v_key)
    assert not torch.allclose(final[v_key], before)   # the refresh changed the bases
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("checkpoint-4", "adapter.safetensors", "results.json"))
    (resumed / "latest").write_text("checkpoint-2")
    launch({**cfg, "output_dir": str(resumed), "resume_from_checkpoint": "latest"}, 2)
    again = load_adapter(resumed)
    assert again.keys() == final.keys()
    for k in final:
        assert torch.equal(final[k], again[k]), k
