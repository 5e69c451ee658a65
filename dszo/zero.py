"""The ZeRO-3 side: the model under a DeepSpeed ZeRO-3 engine (forward-only for the ZO methods), and the runtime
that methods use (partitions of trainable tensors, losses, the scalar all-reduce). With dszo/comm.py, the only
module that touches DeepSpeed or its `ds_*` parameter attributes.

The frozen base weights are partitioned at construction (HfDeepSpeedConfig + from_pretrained); the
method's tensors (ZO-Act's V and B) are converted to ZeRO-3 parameters by deepspeed.initialize, with
`stage3_param_persistence_threshold: 0` so that every one of them is partitioned, never replicated.
Each rank then updates its own partition (`param.ds_tensor`) in place; ZeRO-3 gathers the whole tensor
around each forward as it does for any parameter.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dszo import comm
from dszo.directions import tensor_key
from dszo.methods.base import Partition
from dszo.quantization import is_quantized
from dszo.scoring import Scorer, greedy_generate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(cfg, ds_config: dict, partition=None):
    """from_pretrained under HfDeepSpeedConfig: each rank materialises only its partition of the weights.

    With a per-node `partition` (comm.PartitionGroup) the model is built whole on each rank and partitioned among
    the node's ranks by deepspeed.initialize: transformers' ZeRO-3 loader reads the checkpoint on global rank 0
    only and broadcasts within each parameter's group, so every node but the first would get no weights."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from dszo.assets import random_model_config, resolve_model_path
    from dszo.quantization import bnb_config

    quant = bnb_config(cfg.model, DTYPES[cfg.model.dtype])
    hf_ds = HfDeepSpeedConfig(ds_config) if partition is None else None  # must outlive the model's build
    shape = random_model_config(cfg.model.name_or_path)
    if shape is not None:
        model = _random_model(shape, cfg, quant)
        del hf_ds
        return _frozen(model)
    path = resolve_model_path(cfg.model.name_or_path)
    try:
        # A quantized model is built whole on each rank (transformers quantizes while loading) and partitioned
        # by deepspeed.initialize; an unquantized one is partitioned at construction.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.model.dtype], quantization_config=quant,
                                                     trust_remote_code=cfg.model.trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"could not load model.name_or_path={cfg.model.name_or_path!r} ({path}): {e}. "
                                "Give a local HF model folder (config.json + safetensors) or a reachable hub name")
    del hf_ds
    return _frozen(model)


def _frozen(model: nn.Module) -> nn.Module:
    from dszo.quantization import prepare_for_zero3

    prepare_for_zero3(model)
    model.requires_grad_(False)
    model.eval()
    return model


def _random_model(config_path, cfg, quant) -> nn.Module:
    """A model of a real architecture's shape with random weights (partitioned at construction under ZeRO-3)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dszo.errors import ConfigError

    if quant is not None:
        raise ConfigError("model.quantization needs real weights (bitsandbytes quantizes while loading); a random:"
                          " model is built from its config: set model.quantization: none")
    config = AutoConfig.from_pretrained(str(config_path))
    return AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.model.dtype],
                                            trust_remote_code=cfg.model.trust_remote_code)


def initialize(model: nn.Module, ds_config: dict, optimizer=None, partition=None):
    """Forward-only for the ZO methods; with `optimizer` (the first-order reference) a ZeRO-3 training engine
    that reduce-scatters gradients and steps each rank's partition. `partition` (comm.PartitionGroup) is handed
    to DeepSpeed as its mpu: the engine's partition group becomes the node's ranks."""
    import deepspeed

    if optimizer is not None:  # torch.optim.SGD is outside DeepSpeed's list of ZeRO-tested optimisers; it is ours
        ds_config = {**ds_config, "zero_allow_untested_optimizer": True}
    _gather_through_shared_memory()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, optimizer=optimizer, mpu=partition)
    engine.eval()  # no dropout, for ZO and first-order alike
    return engine


class _Gathered:
    """The handle of a gather that has already completed (DeepSpeed waits on every gather's handle)."""

    def wait(self, **_) -> None:
        return None


def _gather_through_shared_memory() -> None:
    """Route ZeRO-3's parameter gathers through comm.local_all_gather: ranks on one host copy each other's
    shards out of shared memory instead of over loopback TCP (DeepSpeed funnels every gather through
    partition_parameters._dist_allgather_fn). Groups spanning hosts and CUDA tensors keep DeepSpeed's path."""
    from deepspeed.runtime.zero import partition_parameters as pp

    original = pp._dist_allgather_fn
    if getattr(original, "dszo_local", False):
        return

    def gather(input_tensor, output_tensor, group=None):
        if comm.local_all_gather(input_tensor, output_tensor, group):
            return _Gathered()
        return original(input_tensor, output_tensor, group)

    gather.dszo_local = True
    pp._dist_allgather_fn = gather


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's whole shape, also once ZeRO-3 has partitioned it (its .shape is then empty)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def zero3_partition(name: str, param: nn.Parameter) -> Partition:
    """This rank's partition of a ZeRO-3 parameter, as a flat view of `param.ds_tensor` (updated in place)."""
    part = param.ds_tensor
    size = part.ds_numel
    start = size * dist.get_rank(group=param.ds_process_group)
    end = min(start + size, param.ds_numel)
    local = part.data.view(-1)[: max(0, end - start)]
    return Partition(name=name, key=tensor_key(name), shape=tuple(param.ds_shape), start=start,
                     end=max(start, end), local=local)


def gather_full(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Whole tensors (on every rank; collective) of ZeRO-3 parameters."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.data.detach().clone().cpu() for n, p in params.items()}


def quantized_bytes(model: nn.Module) -> dict:
    """Bytes of the quantized weights: whole tensors and this rank's ZeRO-3 partitions (after initialize)."""
    total = local = 0
    for p in model.parameters():
        if not is_quantized(p):
            continue
        total += int(torch.Size(full_shape(p)).numel()) * p.element_size()
        part = getattr(p, "ds_tensor", None)
        local += (part.numel() if part is not None else p.numel()) * p.element_size()
    return {"quantized_weight_bytes": total, "quantized_weight_bytes_local": local}


class ZeroRuntime:
    """What a ZO method may use (methods.base.ZORuntime): partitions, losses, forwards and the scalar all-reduce;
    and the first-order reference's backward and optimiser step (methods.base.BackpropRuntime)."""

    def __init__(self, engine, scorer: Scorer) -> None:
        self.engine = engine
        self.scorer = scorer
        self.device = comm.device()
        self.all_reduce_sum = comm.all_reduce_sum
        self.world_size = comm.world_size()

    def reduce_step(self, sums: torch.Tensor) -> torch.Tensor:
        """The step's one all-reduce; the communication layer carries the stop flag along with the sums."""
        return comm.reduce_step(sums)

    def partition(self, name: str, param: nn.Parameter) -> Partition:
        return zero3_partition(name, param)

    @torch.no_grad()
    def scores(self, batch) -> torch.Tensor:
        """[examples, candidates] scores under the evaluation rule."""
        return self.scorer.scores(self.engine, batch.to(self.device))

    @torch.no_grad()
    def generate(self, batch, max_new_tokens: int, finished) -> list[list[int]]:
        def all_finished(local: bool) -> bool:
            return bool(self.all_reduce_sum(torch.tensor([0.0 if local else 1.0]))[0] == 0)

        return greedy_generate(self.engine, batch.to(self.device), max_new_tokens, finished, all_finished)

    @torch.no_grad()
    def loss_sums(self, batch, doubled: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        """float64 sums on the model's device: the step reads them once, after its all-reduce (no host sync here)."""
        rows = batch.doubled() if doubled else batch
        losses = self.scorer.losses(self.engine, rows.to(self.device)).double()
        valid = rows.valid.to(losses.device, torch.float64)
        b = batch.num_examples
        first = (losses[:b] * valid[:b]).sum()
        second = (losses[b:] * valid[b:]).sum() if doubled else torch.zeros((), dtype=torch.float64, device=losses.device)
        return first, second, int(batch.valid.sum())

    @torch.no_grad()
    def forward(self, batch) -> None:
        self.scorer.losses(self.engine, batch.to(self.device))

    def loss_sum_with_grad(self, batch) -> tuple[torch.Tensor, int]:
        batch = batch.to(self.device)
        losses = self.scorer.losses(self.engine, batch)
        return (losses * batch.valid.to(losses.dtype)).sum(), int(batch.valid.sum())

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def optimizer_step(self) -> None:
        self.engine.step()


class LocalRuntime(ZeroRuntime):
    """One process, no DeepSpeed: the plain model, every element owned here, the all-reduce is the identity.
    For tools that run a method's own code on a single machine (benchmarks/gradient_fidelity.py)."""

    def __init__(self, model: nn.Module, scorer: Scorer, device: str = "cpu") -> None:
        self.engine, self.scorer, self.device = model, scorer, torch.device(device)
        self.all_reduce_sum = lambda t: t
        self.world_size = 1

    def reduce_step(self, sums: torch.Tensor) -> torch.Tensor:
        return sums

    def partition(self, name: str, param: nn.Parameter) -> Partition:
        return Partition(name=name, key=tensor_key(name), shape=tuple(param.shape), start=0, end=param.numel(),
                         local=param.data.view(-1))
