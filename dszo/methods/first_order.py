"""The first-order reference: backprop on the same parameterisations, data and optimisers as the ZO methods.

`parameterization: zo_act` trains ZO-Act's coefficient matrices B on the same activation bases V (computed
by the same calibration); `full` trains the parameters named by `trainable` (fnmatch patterns, as MeZO).
Here the engine is a real DeepSpeed ZeRO-3 *training* engine: the torch optimiser (AdamW / SGD with
momentum / SGD, the hyper-parameters of the dszo config, 1-D tensors exempt from weight decay) is handed
to deepspeed.initialize, gradients are reduce-scattered and each rank steps its partition -- what a user
comparing against first-order ZeRO-3 data-parallel fine-tuning would run. The loss is the mean over the
whole global batch, as for the ZO methods; the model stays in eval mode (no dropout) so that both see the
same function. The ZO options (zo_eps, num_directions, functional_perturbation) are ignored.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from dszo.errors import ConfigError
from dszo.methods.base import BackpropRuntime, Capabilities, FirstOrderStep, Method, plain_shape, refuse_quantized
from dszo.methods.mezo import SUBSET_HINT, select_parameters
from dszo.methods.registry import register
from dszo.methods.zo_act import ZOAct, ZOActConfig


@dataclass
class FirstOrderConfig(ZOActConfig):
    name: str = "first_order"
    parameterization: Literal["zo_act", "full"] = "zo_act"
    # full: fnmatch patterns over parameter names ("*" = all of them); zo_act uses rank/target_modules/...
    trainable: list[str] = field(default_factory=lambda: ["*"])

    def capabilities(self) -> Capabilities:
        adapter = self.parameterization == "zo_act"
        # Its optimiser state lives in DeepSpeed's training engine (not in dszo's checkpoints), its gradients are
        # reduced over every rank (one partition group), and it logs no seeds to replay.
        return Capabilities(zeroth_order=False, replayable=False, resumable=False, world_partition=True,
                            writes_base_weights=not adapter, exports_adapter=adapter,
                            result_file="adapter.safetensors" if adapter else "trainable.safetensors",
                            calibration_examples=self.num_calibration if adapter else 0)

    def check_model(self, model) -> None:
        if self.parameterization == "full" and "*" in self.trainable:
            refuse_quantized(self.name, model.quantization, "with parameterization full and trainable ['*'] updates "
                             "every weight", SUBSET_HINT)

    def validate(self) -> None:
        super().validate()
        if self.parameterization == "full" and not self.trainable:
            raise ConfigError("method.trainable must name at least one parameter pattern")


class FirstOrder(Method):
    name = "first_order"

    def __init__(self, cfg, run_seed: int) -> None:
        super().__init__(cfg, run_seed)
        self.adapters = ZOAct(cfg, run_seed) if cfg.method.parameterization == "zo_act" else None

    def attach(self, model: nn.Module, shape_of=plain_shape) -> None:
        self.shape_of = shape_of
        if self.adapters is not None:
            self.adapters.attach(model)
            self.params = self.adapters.trainable()
        else:
            self.params = select_parameters(model, self.cfg.method.trainable, self.name, self.cfg.model.quantization)
        for p in self.params.values():
            p.requires_grad_(True)

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.params

    def extra_state(self) -> dict[str, nn.Parameter]:
        return self.adapters.extra_state() if self.adapters is not None else {}

    def setup_metrics(self) -> dict:
        return self.adapters.setup_metrics() if self.adapters is not None else {}

    def torch_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        decay = [p for p in self.params.values() if len(self.shape_of(p)) >= 2]
        no_decay = [p for p in self.params.values() if len(self.shape_of(p)) < 2]
        groups = [g for g in ({"params": decay, "weight_decay": c.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        if c.optim == "adam":
            self.optimizer = torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                               eps=c.adam_epsilon)
        else:
            momentum = c.momentum if c.optim == "momentum" else 0.0
            self.optimizer = torch.optim.SGD(groups, lr=c.learning_rate, momentum=momentum)
        return self.optimizer

    def prepare(self, runtime: BackpropRuntime, calibration_batches: list | None) -> None:
        if self.adapters is not None:
            self.adapters.compute_bases(runtime, calibration_batches)

    def step(self, t: int, micro_batches: list, lr: float, runtime: BackpropRuntime) -> FirstOrderStep:
        tic = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The engine averages gradients over ranks and micro-batches; scale each micro-batch's loss sum so
        # that the result is the gradient of the mean over the whole global batch (n_global examples).
        local_n = sum(int(b.valid.sum()) for b in micro_batches)
        n_global = float(runtime.all_reduce_sum(torch.tensor([float(local_n)], dtype=torch.float64))[0])
        scale = len(micro_batches) * runtime.world_size / n_global
        total = 0.0
        for batch in micro_batches:
            loss_sum, _ = runtime.loss_sum_with_grad(batch)
            runtime.backward(loss_sum * scale)
            runtime.optimizer_step()              # DeepSpeed steps the optimiser at the accumulation boundary
            total += float(loss_sum.detach())
        loss = float(runtime.reduce_step(torch.tensor([total], dtype=torch.float64))[0]) / n_global
        return FirstOrderStep(loss=loss, num_examples=int(n_global), lr=lr,
                              timings={"forward_backward": time.perf_counter() - tic})


register(FirstOrderConfig, FirstOrder)
