"""The interfaces of a training method: its config and capabilities, the runtime services it is given, the ZO
step every zeroth-order method shares, and the step records.

A method never imports deepspeed, torch.distributed or dszo's comm: the runtime hands it this rank's partition of
each trainable tensor, a loss function and the scalar all-reduce (dszo/zero.py implements it under ZeRO-3).
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, Protocol

import torch
from torch import nn

from dszo.directions import direction_seed, step_seed
from dszo.errors import ConfigError, QuantizationError


@dataclass
class Partition:
    """The elements [start, end) of a flattened tensor that this rank owns (DeepSpeed's word for a rank's slice)."""

    name: str
    key: int                  # directions.tensor_key(name)
    shape: tuple[int, ...]
    start: int
    end: int
    local: torch.Tensor       # 1-D, end - start elements, updated in place

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


# --- configuration and capabilities --------------------------------------------------------------------------

@dataclass(frozen=True)
class Capabilities:
    """What code outside a method needs to know about it (instead of testing its name)."""

    zeroth_order: bool = True            # steps from forward passes only (else: the first-order reference)
    replayable: bool = True              # a run is determined by (seed, g, lr) per step: `dszo replay` rebuilds it
    resumable: bool = True               # its whole state lives in dszo's checkpoints
    world_partition: bool = False        # needs one ZeRO-3 partition group over every rank (gradient reduction)
    writes_base_weights: bool = False    # updates the model's own weights: refuses a quantized base
    result_file: str = "trainable.safetensors"  # the trained tensors of a finished run
    exports_adapter: bool = False        # the result is a LoRA-shaped adapter (`dszo export --format peft`)
    calibration_examples: int = 0        # training examples read by a calibration pass before the first step
    forwards_per_direction: int = 2      # example-forwards a direction costs (± eps; AGZO: f+ only)
    forwards_per_step: int = 0           # example-forwards a step costs besides its directions' (AGZO: its f0)


@dataclass
class MethodConfig:
    """Options every method has; each method extends it with its own (see dszo/methods/<method>.py)."""

    name: str = "zo_act"
    zo_eps: float = 1e-2
    num_directions: int = 1
    # Distribution of the perturbation directions: gaussian (the papers') or rademacher (±1: E[z zᵀ] = I too;
    # 8-12x cheaper to draw here, which matters where a method draws a dense direction per weight on a CPU).
    directions: Literal["gaussian", "rademacher"] = "gaussian"
    # Low-rank methods apply ±eps*Z inside the layers on a doubled batch: L+ and L- from one forward
    # (one ZeRO-3 gather of the frozen weights). false: two forwards.
    functional_perturbation: bool = True
    base_update: ClassVar[str] = "writes its update into the base weights"   # why a quantized base is refused

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def check_model(self, model) -> None:
        """Refuse a model set-up the method cannot train (e.g. writing into a quantized base)."""
        if self.capabilities().writes_base_weights:
            refuse_quantized(self.name, model.quantization, self.base_update)

    def validate(self) -> None:
        if self.zo_eps <= 0:
            raise ConfigError(f"method.zo_eps must be > 0, got {self.zo_eps}")
        if self.num_directions < 1:
            raise ConfigError("method.num_directions must be >= 1")


def refuse_quantized(method: str, quantization: str, how: str, subset_hint: str = "") -> None:
    """The error of a method that would write into frozen quantized weights (none when the base is unquantized)."""
    if quantization == "none":
        return
    raise QuantizationError(
        f"method {method} {how}, but model.quantization is {quantization}: the base weights are frozen "
        f"{quantization} and cannot take an update. Use method zo_act (trains coefficients on top of the frozen "
        f"quantized weights; first_order with parameterization: zo_act is its backprop reference), {subset_hint}"
        "or set model.quantization: none")


def require_sgd(cfg, update: str) -> None:
    """Methods whose update is SGD along their own low-rank direction (LOZO, AGZO) refuse another optim."""
    if cfg.optim != "sgd":
        raise ConfigError(f"method {cfg.method.name} updates W with SGD along {update}; set optim: sgd "
                          f"(got optim: {cfg.optim})")


# --- what the runtime offers ----------------------------------------------------------------------------------

class ZORuntime(Protocol):
    """The services a zeroth-order method uses (dszo/zero.py: ZeroRuntime)."""

    world_size: int
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]

    def partition(self, name: str, param: nn.Parameter) -> Partition: ...

    def loss_sums(self, batch, doubled: bool) -> tuple:
        """Σ loss over the first and the second copy of `batch` (second is 0 when not doubled), and n. The sums may
        be float64 0-d tensors on the model's device (read by the step after its all-reduce) or floats."""

    def forward(self, batch) -> None:
        """A forward over `batch` whose output is not needed (calibration)."""

    def reduce_step(self, sums: torch.Tensor) -> torch.Tensor:
        """The step's all-reduce of its loss sums (the communication layer carries the stop flag along)."""


class BackpropRuntime(ZORuntime, Protocol):
    """What the first-order reference uses besides: a differentiable loss, the engine's backward and step."""

    def loss_sum_with_grad(self, batch) -> tuple[torch.Tensor, int]: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def optimizer_step(self) -> None: ...


def plain_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(param.shape)


# --- step records ---------------------------------------------------------------------------------------------

@dataclass
class ZOStep:
    """One ZO step: the mean losses at the two measured points and g of every direction."""

    loss_plus: float
    loss_minus: float
    proj_grads: list[float]
    num_examples: int
    lr: float
    timings: dict[str, float] = field(default_factory=dict)
    skipped: bool = False     # non-finite loss: the update was not applied

    @property
    def loss(self) -> float:
        return 0.5 * (self.loss_plus + self.loss_minus)

    @property
    def proj_grad(self) -> float:
        """g of the first direction."""
        return self.proj_grads[0]

    def metrics(self) -> dict:
        return {"loss": self.loss, "loss_plus": self.loss_plus, "loss_minus": self.loss_minus,
                "proj_grad": self.proj_grad, "proj_grads": self.proj_grads, "lr": self.lr,
                "num_examples": self.num_examples}

    def describe_bad(self) -> str:
        return f"L+ = {self.loss_plus}, L- = {self.loss_minus}"


@dataclass
class FirstOrderStep:
    """One backprop step: the mean loss of the global batch before the update."""

    loss: float
    num_examples: int
    lr: float
    timings: dict[str, float] = field(default_factory=dict)
    skipped: bool = False     # never: the engine always applies its update

    def metrics(self) -> dict:
        return {"loss": self.loss, "lr": self.lr, "num_examples": self.num_examples}

    def describe_bad(self) -> str:
        return f"loss = {self.loss}"


# --- methods --------------------------------------------------------------------------------------------------

class Method(ABC):
    """What the trainer drives: attach to the model, name the trainable tensors, set up after partitioning,
    step; its state for checkpoints through state_dict / load_state_dict."""

    name: str = ""
    frozen_1d: list[str] = []                     # 1-D tensors a method would train but cannot perturb (logged)

    def __init__(self, cfg, run_seed: int) -> None:
        self.cfg = cfg            # the whole TrainConfig (method section at cfg.method)
        self.run_seed = run_seed
        self.capabilities = cfg.method.capabilities()
        self.partitions: dict[str, Partition] = {}
        self.fixed_partitions: dict[str, Partition] = {}

    @abstractmethod
    def attach(self, model: nn.Module, shape_of: Callable = plain_shape) -> None:
        """Add adapters / select trainable tensors, before the model is partitioned. `shape_of(param)`: a
        parameter's whole shape (the frozen base may already be partitioned)."""

    @abstractmethod
    def trainable(self) -> dict[str, nn.Parameter]:
        """Name -> parameter of every tensor the method trains."""

    def extra_state(self) -> dict[str, nn.Parameter]:
        """Name -> parameter of fixed tensors saved with the result (e.g. ZO-Act's bases)."""
        return {}

    def torch_optimizer(self):
        """A torch optimiser for the engine to own (the first-order reference), or None: ZO methods update
        their partitions themselves and the engine stays forward-only."""
        return None

    def setup(self, runtime: ZORuntime, calibration_batches: list | None) -> None:
        """After partitioning: take this rank's partitions, then the method's own set-up (bases, optimiser state).
        calibration_batches is None when the state will be restored from a checkpoint (no calibration pass)."""
        self.partitions = {n: runtime.partition(n, p) for n, p in self.trainable().items()}
        self.fixed_partitions = {n: runtime.partition(n, p) for n, p in self.extra_state().items()}
        self.prepare(runtime, calibration_batches)

    def prepare(self, runtime: ZORuntime, calibration_batches: list | None) -> None:
        """The method's own set-up once its partitions exist."""

    def setup_metrics(self) -> dict:
        """Facts about the set-up worth a line in the metrics' setup event (e.g. ZO-Act's basis scales)."""
        return {}

    @abstractmethod
    def step(self, t: int, micro_batches: list, lr: float, runtime: ZORuntime):
        """One optimisation step at 0-based step t over this rank's micro-batches; returns its step record."""

    # -- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """name -> this rank's Partition of a tensor (trained, fixed, optimiser state) or a JSON scalar."""
        return {**self.partitions, **self.fixed_partitions, **self.optimizer_state_dict()}

    def load_state_dict(self, saved) -> None:
        """`saved` (checkpoint.SavedState) reads any slice of what state_dict held, on any world size."""
        for part in {**self.partitions, **self.fixed_partitions}.values():
            saved.load_into(part)
        self.load_optimizer_state_dict(saved)

    def optimizer_state_dict(self) -> dict:
        """Optimiser / momentum state: Partitions named `<tensor>::<key>`, and scalars."""
        return {}

    def load_optimizer_state_dict(self, saved) -> None:
        """Restore what optimizer_state_dict saved; `saved.read(name, start, end)` gives any slice."""


class ZOMethod(Method):
    """A zeroth-order method. The step is shared: for each direction, the method measures two losses on
    this rank's micro-batches, the three sums are all-reduced, the method turns them into the projected
    gradient g and accumulates g into its update, which it applies once per step."""

    @abstractmethod
    def losses(self, t: int, dseed: int, batch, runtime: ZORuntime) -> tuple[float, float, int]:
        """(Σ loss at one point, Σ loss at the other, n) over this rank's `batch` for direction `dseed`."""

    def projected_gradient(self, a: float, b: float, n: float) -> float:
        """Two-sided SPSA: (L(θ+εZ) - L(θ-εZ)) / 2ε."""
        return (a - b) / n / (2 * self.cfg.method.zo_eps)

    @abstractmethod
    def accumulate(self, t: int, dseed: int, coeff: float) -> None:
        """Add coeff * (this direction, on this rank's partitions) to the step's update."""

    @abstractmethod
    def update(self, t: int, lr: float) -> None:
        """Apply the accumulated update to this rank's partitions."""

    @abstractmethod
    def discard(self) -> None:
        """Drop what accumulate() gathered this step (a skipped step)."""

    def begin_step(self, t: int, micro_batches: list, runtime: ZORuntime) -> None:
        """Before the step's directions (AGZO: the unperturbed losses and the step's subspace)."""

    def step(self, t: int, micro_batches: list, lr: float, runtime: ZORuntime) -> ZOStep:
        """Direction slot k (batch.slot; one slot unless direction_groups > 1) of sequential direction d is direction
        d·G + k, measured on the slot's batches; one all-reduce per d carries all G slots' sums."""
        seed, groups = step_seed(self.run_seed, t), self.cfg.direction_groups
        total = self.cfg.method.num_directions * groups
        clock, losses, grads, examples = Stopwatch(), [], [], 0
        with clock("forward"):
            self.begin_step(t, micro_batches, runtime)
        for d in range(self.cfg.method.num_directions):
            with clock("forward"):
                sums = self._slot_sums(t, seed, d, micro_batches, runtime)
            with clock("all_reduce"):   # the step's only collective, and its one read of device values: a few scalars
                reduced = runtime.reduce_step(sums.reshape(-1)).view(groups, 3).tolist()
            for k, (a, b, n) in enumerate(reduced):
                g = self.projected_gradient(a, b, n)
                if math.isfinite(g):                      # the same on every rank: g comes from all-reduced sums
                    with clock("update"):
                        self.accumulate(t, direction_seed(seed, d * groups + k), g / total)
                losses.append((a / n, b / n))
                grads.append(g)
                examples += int(n) if d == 0 else 0
        skipped = not all(math.isfinite(g) for g in grads)  # a NaN/inf loss: no update at all this step
        with clock("update"):
            self.discard() if skipped else self.update(t, lr)
        return ZOStep(loss_plus=sum(x for x, _ in losses) / total, loss_minus=sum(y for _, y in losses) / total,
                      proj_grads=grads, num_examples=examples, lr=lr, timings=dict(clock.totals), skipped=skipped)

    def _slot_sums(self, t: int, seed: int, d: int, micro_batches: list, runtime: ZORuntime) -> torch.Tensor:
        """[G, 3] sums of sequential direction d: this rank's slots filled, the others zero."""
        groups, sums = self.cfg.direction_groups, {}
        for batch in micro_batches:
            k = getattr(batch, "slot", 0)   # micro-batches that are not dszo Batches (tools, tests): one slot
            measured = _as_sums(self.losses(t, direction_seed(seed, d * groups + k), batch, runtime))
            sums[k] = measured if k not in sums else sums[k] + measured
        like = next(iter(sums.values()))
        return torch.stack([sums[k] if k in sums else torch.zeros_like(like) for k in range(groups)])


def _as_sums(measured: tuple) -> torch.Tensor:
    """(Σ L at one point, Σ L at the other, n) as float64 [3], on the device of the sums (no host sync)."""
    a, b, n = measured
    a, b = (torch.as_tensor(x, dtype=torch.float64) for x in (a, b))
    return torch.stack([a, b.to(a.device), torch.full((), float(n), dtype=torch.float64, device=a.device)])


class Stopwatch:
    """Seconds spent per phase of a step."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, key: str):
        tic = time.perf_counter()
        yield
        self.totals[key] += time.perf_counter() - tic
