"""The interface every ZO method implements, and the runtime services it is given.

A method never imports deepspeed or torch.distributed: the runtime hands it the shard of each trainable
tensor this rank owns, a loss function and the scalar all-reduce.
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from dszo.directions import direction_seed, gaussian, step_seed
from dszo.optim import ShardOptimizer


@dataclass
class Shard:
    """The elements [start, end) of a flattened trainable tensor that this rank owns."""

    name: str
    key: int                  # directions.tensor_key(name)
    shape: tuple[int, ...]
    start: int
    end: int
    local: torch.Tensor       # 1-D, end - start elements, updated in place

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class StepStats:
    loss_plus: float
    loss_minus: float
    proj_grad: float          # g of the first direction (all directions in `proj_grads`)
    num_examples: int
    lr: float
    proj_grads: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: bool = False     # non-finite loss: the update was not applied


class Runtime(Protocol):
    def shard(self, name: str, param: nn.Parameter) -> Shard: ...

    def loss_sums(self, batch, doubled: bool) -> tuple[float, float, int]:
        """Σ loss over the first and the second copy of `batch` (second is 0 when not doubled), and n."""

    def forward(self, batch) -> None:
        """A forward over `batch` whose output is not needed (calibration)."""

    # The first-order reference only: a differentiable loss, and the engine's backward and optimiser step.
    def loss_sum_with_grad(self, batch) -> tuple[torch.Tensor, int]: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def optimizer_step(self) -> None: ...

    def reduce_step(self, sums: torch.Tensor) -> torch.Tensor:
        """The step's all-reduce of its loss sums (the runtime may carry control flags along with them)."""

    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    world_size: int


class Method(ABC):
    """What train.py drives: attach to the model, name the trainable tensors, set up after sharding, step."""

    name: str = ""
    result_file: str = "trainable.safetensors"   # what train.py writes the trained tensors to
    frozen_1d: list[str] = []                     # 1-D tensors a method would train but cannot perturb (logged)

    def __init__(self, cfg, run_seed: int) -> None:
        self.cfg = cfg            # the whole TrainConfig (method section at cfg.method)
        self.run_seed = run_seed

    @abstractmethod
    def attach(self, model: nn.Module) -> None:
        """Add adapters / select trainable tensors, before the model is sharded."""

    @abstractmethod
    def trainable(self) -> dict[str, nn.Parameter]:
        """Name -> parameter of every tensor the method trains."""

    def extra_state(self) -> dict[str, nn.Parameter]:
        """Name -> parameter of fixed tensors saved with the result (e.g. ZO-Act's bases)."""
        return {}

    def torch_optimizer(self):
        """A torch optimiser for the engine to own (the first-order reference), or None: ZO methods update
        their shards themselves and the engine stays forward-only."""
        return None

    @abstractmethod
    def setup(self, rt: Runtime, calibration_batches: list) -> None:
        """After sharding: take shards, compute bases, create optimiser state. calibration_batches is None when
        the state will be restored from a checkpoint (no calibration pass)."""

    # -- checkpoints: the state a resume needs besides the trained tensors and extra_state ---------------
    def state_shards(self) -> dict[str, Shard]:
        """Optimiser / momentum state as flat slices of named tensors (this rank's part)."""
        return {}

    def state_scalars(self) -> dict:
        return {}

    def load_state(self, reader, scalars: dict) -> None:
        """Restore what state_shards / state_scalars saved; `reader.read(name, start, end)` gives any slice."""

    @abstractmethod
    def step(self, t: int, micro_batches: list, lr: float, rt: Runtime) -> StepStats:
        """One optimisation step at 0-based step t over this rank's micro-batches."""


class ZOMethod(Method):
    """A zeroth-order method. The step is shared: for each direction, the method measures two losses on
    this rank's micro-batches, the three sums are all-reduced, the method turns them into the projected
    gradient g and accumulates g into its update, which it applies once per step."""

    @abstractmethod
    def losses(self, t: int, dseed: int, batch, rt: Runtime) -> tuple[float, float, int]:
        """(Σ loss at one point, Σ loss at the other, n) over this rank's `batch` for direction `dseed`."""

    def projected_gradient(self, a: float, b: float, n: float) -> float:
        """Two-sided SPSA: (L(θ+εZ) - L(θ-εZ)) / 2ε."""
        return (a - b) / n / (2 * self.cfg.method.zo_eps)

    @abstractmethod
    def accumulate(self, t: int, dseed: int, coeff: float) -> None:
        """Add coeff * (this direction, on this rank's shards) to the step's update."""

    @abstractmethod
    def update(self, t: int, lr: float) -> None:
        """Apply the accumulated update to this rank's shards."""

    @abstractmethod
    def discard(self) -> None:
        """Drop what accumulate() gathered this step (a skipped step)."""

    def step(self, t: int, micro_batches: list, lr: float, rt: Runtime) -> StepStats:
        seed, n_dir = step_seed(self.run_seed, t), self.cfg.method.num_directions
        clock, losses, grads = _Stopwatch(), [], []
        for d in range(n_dir):
            dseed = direction_seed(seed, d)
            with clock("forward"):
                sums = torch.zeros(3, dtype=torch.float64)
                for batch in micro_batches:
                    sums += torch.tensor(self.losses(t, dseed, batch, rt), dtype=torch.float64)
            with clock("all_reduce"):
                a, b, n = rt.reduce_step(sums).tolist()      # the step's only collective: a few scalars
            g = self.projected_gradient(a, b, n)
            if math.isfinite(g):                          # the same on every rank: g comes from all-reduced sums
                with clock("update"):
                    self.accumulate(t, dseed, g / n_dir)
            losses.append((a / n, b / n))
            grads.append(g)
        skipped = not all(math.isfinite(g) for g in grads)  # a NaN/inf loss: no update at all this step
        with clock("update"):
            self.discard() if skipped else self.update(t, lr)
        return StepStats(loss_plus=sum(x for x, _ in losses) / n_dir, loss_minus=sum(y for _, y in losses) / n_dir,
                         proj_grad=grads[0], num_examples=int(n), lr=lr, proj_grads=grads, timings=dict(clock.totals),
                         skipped=skipped)


class _Stopwatch:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, key: str):
        tic = time.perf_counter()
        yield
        self.totals[key] += time.perf_counter() - tic


class DenseEstimate:
    """ĝ = Σ_d coeff_d Z_d on this rank's shards (dense Gaussian Z), applied by a shard optimiser."""

    def __init__(self, shards: dict[str, Shard], cfg, no_decay: frozenset = frozenset()) -> None:
        self.shards = shards
        self.optimizer = ShardOptimizer(cfg.optim, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon,
                                        cfg.momentum, cfg.weight_decay, no_decay=no_decay)
        self.estimate = {n: torch.zeros_like(s.local) for n, s in shards.items()}

    def direction(self, dseed: int, shard: Shard) -> torch.Tensor:
        return gaussian(dseed, shard.key, shard.start, shard.end, dtype=shard.local.dtype, device=shard.local.device)

    def accumulate(self, dseed: int, coeff: float) -> None:
        for name, s in self.shards.items():   # only the slice of Z this rank owns
            self.estimate[name].add_(self.direction(dseed, s), alpha=coeff)

    def apply(self, lr: float) -> None:
        self.optimizer.step({n: (s.local, self.estimate[n]) for n, s in self.shards.items()}, lr)
        self.discard()

    def discard(self) -> None:
        for e in self.estimate.values():
            e.zero_()

    def state_shards(self) -> dict[str, Shard]:
        return {f"{n}::{k}": Shard(f"{n}::{k}", s.key, s.shape, s.start, s.end, t)
                for n, s in self.shards.items() for k, t in self.optimizer.state.get(n, {}).items()}

    def state_scalars(self) -> dict:
        return {"optimizer_steps": self.optimizer.steps}

    def load_state(self, reader, scalars: dict) -> None:
        self.optimizer.steps = int(scalars["optimizer_steps"])
        names = reader.names()
        for n, s in self.shards.items():
            for key in sorted(k for k in names if k.startswith(n + "::")):
                self.optimizer.state.setdefault(n, {})[key[len(n) + 2:]] = reader.read(key, s.start, s.end).to(s.local)


class DenseEstimateState:
    """For methods whose update is a DenseEstimate in `self.estimate` (ZO-Act, MeZO): dropping a skipped step's
    estimate and the checkpoint state (the optimiser's moments) are the estimate's."""

    def discard(self) -> None:
        self.estimate.discard()

    def state_shards(self) -> dict[str, Shard]:
        return self.estimate.state_shards()

    def state_scalars(self) -> dict:
        return self.estimate.state_scalars()

    def load_state(self, reader, scalars: dict) -> None:
        self.estimate.load_state(reader, scalars)


def require_sgd(cfg, update: str) -> None:
    """Methods whose update is SGD along their own low-rank direction (LOZO, AGZO) refuse another optim."""
    if cfg.optim != "sgd":
        from dszo.config import ConfigError

        raise ConfigError(f"method {cfg.method.name} updates W with SGD along {update}; set optim: sgd "
                          f"(got optim: {cfg.optim})")


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls
