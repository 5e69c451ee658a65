"""The interface every ZO method implements, and the runtime services it is given.

A method never imports deepspeed or torch.distributed: the runtime hands it the shard of each trainable
tensor this rank owns, a loss function and the scalar all-reduce.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn


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


class Runtime(Protocol):
    def shard(self, name: str, param: nn.Parameter) -> Shard: ...

    def loss_sums(self, batch, doubled: bool) -> tuple[float, float, int]:
        """Σ loss over the first and the second copy of `batch` (second is 0 when not doubled), and n."""

    def forward(self, batch) -> None:
        """A forward over `batch` whose output is not needed (calibration)."""

    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]


class ZOMethod(ABC):
    name: str = ""

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

    @abstractmethod
    def setup(self, rt: Runtime, calibration_batches: list) -> None:
        """After sharding: take shards, compute bases, create optimiser state."""

    @abstractmethod
    def step(self, t: int, micro_batches: list, lr: float, rt: Runtime) -> StepStats:
        """One optimisation step at 0-based step t over this rank's micro-batches."""


REGISTRY: dict[str, type[ZOMethod]] = {}


def register(cls: type[ZOMethod]) -> type[ZOMethod]:
    REGISTRY[cls.name] = cls
    return cls
