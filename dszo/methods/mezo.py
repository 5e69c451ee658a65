"""MeZO: dense directions (Gaussian, or Rademacher: method.directions) over the trainable tensors themselves.

Nothing is written into the weights while measuring, and no copy of them is kept: around each module's forward,
after ZeRO-3 has gathered its weights, a pre-hook points each trained parameter at θ + (±ε)Z -- a temporary the
size of that module's weights, Z regenerated from the seed a slice at a time -- and a post-hook, which runs before ZeRO-3 releases
the gather, points it back at θ. So θ is never modified and needs no exact restore (θ+εz-2εz+εz is not θ in
floating point), the owned partition is written only by the update, and a gathered weight that ZeRO-3 keeps for
reuse (a tied embedding, a prefetch) is the unperturbed one. Two forwards per direction: a dense perturbation
cannot be applied to half a batch. Weight decay, as in the reference implementation, skips 1-D tensors.
"""
from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from dszo.errors import ConfigError
from dszo.methods.base import Capabilities, MethodConfig, ZOMethod, ZORuntime, plain_shape, refuse_quantized
from dszo.directions import direction, tensor_key
from dszo.methods.estimates import DenseEstimate, DenseEstimateState
from dszo.methods.perturbation import Perturbation
from dszo.methods.registry import register
from dszo.quantization import is_quantized

SUBSET_HINT = "restrict method.trainable to unquantized tensors (e.g. ['*norm*']), "


@dataclass
class MeZOConfig(MethodConfig):
    name: str = "mezo"
    zo_eps: float = 1e-3
    # Which parameters are trained: fnmatch patterns over parameter names ("*" = all of them).
    trainable: list[str] = field(default_factory=lambda: ["*"])

    def capabilities(self) -> Capabilities:
        return Capabilities(writes_base_weights=True)   # its quantized tensors are refused at attach

    def check_model(self, model) -> None:
        if "*" in self.trainable:   # all parameters: certainly the quantized linear weights (others: at attach)
            refuse_quantized(self.name, model.quantization, "with method.trainable ['*'] writes into every weight",
                             SUBSET_HINT)

    def validate(self) -> None:
        super().validate()
        if not self.trainable:
            raise ConfigError("method.trainable must name at least one parameter pattern")


def select_parameters(model: nn.Module, patterns: list[str], method: str, quantization: str) -> dict[str, nn.Parameter]:
    """Parameters whose names match any fnmatch pattern (tied tensors appear once); quantized ones refused."""
    params = {n: p for n, p in model.named_parameters() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    if not params:
        raise ValueError(f"method.trainable {patterns} matched no parameter of the model")
    quantized = [n for n, p in params.items() if is_quantized(p)]
    if quantized:
        refuse_quantized(method, quantization, f"would write into {len(quantized)} quantized tensors matched by "
                                               f"method.trainable {patterns} (e.g. {quantized[0]})", SUBSET_HINT)
    return params


class MeZO(DenseEstimateState, ZOMethod):
    name = "mezo"

    def attach(self, model: nn.Module, shape_of=plain_shape) -> None:
        self.model = model
        self.params = select_parameters(model, self.cfg.method.trainable, self.name, self.cfg.model.quantization)
        self.perturbation = Perturbation(self.cfg.method.directions)

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.params

    def prepare(self, runtime: ZORuntime, calibration_batches: list | None) -> None:
        no_decay = frozenset(n for n, p in self.partitions.items() if len(p.shape) < 2)
        self.estimate = DenseEstimate(self.partitions, self.cfg, no_decay=no_decay)
        self._hook_modules()

    def _hook_modules(self) -> None:
        """Hooks on every module that owns a trained parameter (a tied one: on each of its modules). Registered after
        deepspeed.initialize, the pre-hook runs after ZeRO-3's gather; the post-hook is put first, before its release."""
        names = {id(p): n for n, p in self.params.items()}
        self.reached: set[str] = set()                   # trained tensors a perturbed forward has gone through
        self.saved: list[tuple[nn.Module, dict]] = []   # per hooked module: attribute -> θ while perturbed
        self.spare: dict[tuple, list[torch.Tensor]] = defaultdict(list)   # θ ± εZ buffers between modules
        for module in self.model.modules():
            owned = [(attr, names[id(p)]) for attr, p in module.named_parameters(recurse=False) if id(p) in names]
            if owned:
                saved: dict[str, torch.Tensor] = {}
                self.saved.append((module, saved))
                module.register_forward_pre_hook(partial(self._perturbed, owned, saved))
                module.register_forward_hook(partial(self._restored, saved), prepend=True)

    def _perturbed(self, owned: list, saved: dict, module: nn.Module, args) -> None:
        p = self.perturbation
        if not p.active:
            return
        for attr, name in owned:   # Z drawn here and dropped after: never held for more than one module
            param = getattr(module, attr)
            theta = param.data
            if theta.numel() != self.partitions[name].numel:   # ZeRO-3's gather hook must have run before this one
                raise RuntimeError(f"MeZO: {name} holds {theta.numel()} of its {self.partitions[name].numel} elements "
                                   f"when {type(module).__name__} runs: it is not gathered, so it cannot be perturbed")
            saved[attr] = theta
            self.reached.add(name)
            param.data = self._shifted(theta, tensor_key(name))

    def _shifted(self, theta: torch.Tensor, key: int) -> torch.Tensor:
        """θ ± εZ, Z drawn a slice at a time into a reused buffer; the result goes into a buffer of θ's shape that
        earlier forwards used (`spare`: one per shape, or per nesting level where modules with trained weights
        nest), so that a step maps and page-faults no fresh memory for them."""
        p, n = self.perturbation, theta.numel()
        spare = self.spare[(theta.shape, theta.dtype, theta.device)]
        out = spare.pop() if spare else torch.empty_like(theta)
        flat_in, flat_out = theta.reshape(-1), out.view(-1)
        for lo in range(0, n, DenseEstimate.SLICE):
            hi = min(n, lo + DenseEstimate.SLICE)
            z = direction(p.kind, p.seed, key, lo, hi, dtype=theta.dtype, device=theta.device,
                          out=self.estimate.scratch.get("z", hi - lo, theta))
            torch.add(flat_in[lo:hi], z, alpha=p.sign * p.eps, out=flat_out[lo:hi])
        return out

    def _restored(self, saved: dict, module: nn.Module, args=None, output=None) -> None:
        outputs = output if isinstance(output, (tuple, list)) else [output]
        taken = {o.untyped_storage().data_ptr() for o in outputs if isinstance(o, torch.Tensor)}
        for attr in list(saved):
            param = getattr(module, attr)
            shifted, param.data = param.data, saved.pop(attr)
            if shifted.untyped_storage().data_ptr() not in taken:   # a module that returns (a view of) its weight
                self.spare[(shifted.shape, shifted.dtype, shifted.device)].append(shifted)   # keeps its buffer

    def losses(self, t: int, dseed: int, batch, runtime: ZORuntime) -> tuple[float, float, int]:
        try:
            measured = self.perturbation.measure(runtime, batch, dseed, self.cfg.method.zo_eps, doubled=False)
        finally:   # a forward that raised skipped its post-hooks: θ back everywhere
            for module, saved in self.saved:
                self._restored(saved, module)
        missed = sorted(set(self.params) - self.reached)
        if missed:   # read outside their own module's forward: they would get updates but no perturbation
            raise ConfigError(f"method mezo perturbs a weight in the forward of the module that owns it, but {len(missed)} "
                              f"trained tensors were not used there (e.g. {missed[0]}); leave them out of "
                              "method.trainable")
        return measured

    def accumulate(self, t: int, dseed: int, coeff: float) -> None:
        self.estimate.accumulate(dseed, coeff)

    def update(self, t: int, lr: float) -> None:
        self.estimate.apply(lr)


register(MeZOConfig, MeZO)
