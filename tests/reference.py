"""An independent single-process, plain-PyTorch ZO-Act: no DeepSpeed, no dszo model/method/optimiser code.

It reuses only what defines *which* data and directions a run uses -- dszo.data (examples, split, step
sampler, prompt tokens) and dszo.directions (Z as a function of seed, tensor and element) -- and computes
everything else its own way: one unpadded example at a time, forward hooks on a plain HF model, the
exact eigendecomposition for the basis, torch.optim.Adam for the update.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from dszo.config import DataConfig
from dszo.data import PromptEncoder, StepSampler
from dszo.tasks import get_task, load_splits
from dszo.directions import direction_seed, gaussian, step_seed, tensor_key


class _Reference:
    """A plain HF model and the run's training examples, scored one unpadded example at a time."""

    def __init__(self, model_dir, data_cfg: dict, seed: int, eps: float, quantization=None):
        # quantization: a transformers BitsAndBytesConfig, applied by plain from_pretrained (no DeepSpeed)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                          quantization_config=quantization).eval()
        self.model.requires_grad_(False)
        # bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first forward, and the repack
        # fails for layers narrower than a quantization block (the tiny model's 32 < 64: "shape '[32, 0]' is
        # invalid"); the plain kernel computes the same function. Only CPUs with AVX512-BF16 take that path.
        for m in self.model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        dc = DataConfig(**data_cfg)
        task = get_task(dc)
        self.enc = PromptEncoder(AutoTokenizer.from_pretrained(model_dir), task, dc)
        rendered = [task.render(e) for e in load_splits(dc, task)["train"]]
        self.tokens = [self.enc.prompt_ids(r.prompt) for r in rendered]
        self.labels = [r.label for r in rendered]
        self.seed, self.eps = seed, eps

    def mean_loss(self, idx) -> float:
        total = 0.0
        for i in idx:
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([self.tokens[i]])).logits[0, -1, self.enc.candidate_ids]
            total += float(F.cross_entropy(logits[None].double(), torch.tensor([self.labels[i]])))
        return total / len(idx)

    def two_point(self, idx, params: dict, z: dict) -> dict:
        orig = {n: p.detach().clone() for n, p in params.items()}
        out = {}
        for sign in (+1.0, -1.0):
            for n, p in params.items():
                p.data.copy_(orig[n] + sign * self.eps * z[n])
            out[sign] = self.mean_loss(idx)
        for n, p in params.items():
            p.data.copy_(orig[n])
        g = (out[1.0] - out[-1.0]) / (2 * self.eps)
        return {"loss_plus": out[1.0], "loss_minus": out[-1.0], "proj_grad": g}


class ReferenceZOAct(_Reference):
    """W frozen; forward hooks add (Vᵀx)ᵀ(B ± εZ)ᵀ; exact eigh for V; torch.optim.Adam on B."""

    def __init__(self, model_dir, data_cfg: dict, rank: int, seed: int, eps: float, lr: float, quantization=None):
        super().__init__(model_dir, data_cfg, seed, eps, quantization)
        self.rank = rank
        head = self.model.get_output_embeddings()
        self.layers = {n: m for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
        self.V: dict[str, torch.Tensor] = {}
        self.B = {n: torch.zeros(m.out_features, rank, requires_grad=True) for n, m in self.layers.items()}
        self.opt = torch.optim.Adam(list(self.B.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8)
        self.sign = 0.0
        self.z: dict[str, torch.Tensor] = {}
        self.capture: dict[str, list] | None = None
        for n, m in self.layers.items():
            m.register_forward_hook(self._hook(n))

    def _hook(self, name):
        def hook(module, inputs, output):
            x = inputs[0]
            if self.capture is not None:
                self.capture.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).double())
                self.output_sq[name] = self.output_sq.get(name, 0.0) + float(output.double().square().sum())
                return output
            if name not in self.V:
                return output
            b = self.B[name] + self.sign * self.eps * self.z.get(name, 0.0)  # a graph only under autograd
            return output + (x @ self.V[name]) @ b.T
        return hook

    def compute_bases(self, num_calibration: int, scale: str = "orthonormal") -> dict[str, torch.Tensor]:
        """Exact top-r eigenvectors of Σ h hᵀ over the calibration examples (unit_rms: scaled so that the
        projections have unit mean square; output_rms: the mean square of the layer's output)."""
        idx = StepSampler(len(self.tokens), num_calibration, self.seed).global_indices(0)
        self.capture, self.output_sq = {}, {}
        self.mean_loss(idx)
        acts, self.capture = self.capture, None
        self.gap_rel: dict[str, float] = {}      # min distance of a kept eigenvalue to any other, / the largest
        self.trace_ratio: dict[str, float] = {}  # tr Σ / λ_max
        for name, xs in acts.items():
            h = torch.cat(xs)
            evals, evecs = torch.linalg.eigh(h.T @ h)
            self.trace_ratio[name] = float(evals.sum() / evals[-1])
            kept = evals[-self.rank:]
            gaps = (kept[:, None] - evals[None, :]).abs() + torch.eye(len(evals))[-self.rank:] * float(evals[-1])
            self.gap_rel[name] = float(gaps.min() / evals[-1])
            top, lam = evecs[:, -self.rank:].flip(1), evals[-self.rank:].flip(0)
            top = top * torch.sign(top[top.abs().argmax(0), torch.arange(self.rank)])
            target = {"orthonormal": None, "unit_rms": 1.0,
                      "output_rms": self.output_sq[name] / (h.shape[0] * self.layers[name].out_features)}[scale]
            self.V[name] = (top if target is None else top * (target / (lam / h.shape[0])).sqrt()).float()
        return self.V

    def step(self, t: int, global_batch: int) -> dict:
        idx = StepSampler(len(self.tokens), global_batch, self.seed).global_indices(t)
        s = step_seed(self.seed, t)
        self.z = {n: gaussian(s, tensor_key(f"{n}.zo_B"), 0, b.numel()).view_as(b) for n, b in self.B.items()}
        losses = {}
        for sign in (+1.0, -1.0):
            self.sign = sign
            losses[sign] = self.mean_loss(idx)
        self.sign = 0.0
        g = (losses[1.0] - losses[-1.0]) / (2 * self.eps)
        for n, b in self.B.items():
            b.grad = g * self.z[n]
        self.opt.step()
        return {"loss_plus": losses[1.0], "loss_minus": losses[-1.0], "proj_grad": g}


class ReferenceMeZO(_Reference):
    """Dense Z over every parameter; torch.optim.SGD on g*Z."""

    def __init__(self, model_dir, data_cfg, seed, eps, lr):
        super().__init__(model_dir, data_cfg, seed, eps)
        self.params = dict(self.model.named_parameters())
        self.opt = torch.optim.SGD(list(self.params.values()), lr=lr)

    def step(self, t: int, global_batch: int) -> dict:
        idx = StepSampler(len(self.tokens), global_batch, self.seed).global_indices(t)
        s = step_seed(self.seed, t)
        z = {n: gaussian(s, tensor_key(n), 0, p.numel()).view_as(p) for n, p in self.params.items()}
        res = self.two_point(idx, self.params, z)
        for n, p in self.params.items():
            p.grad = res["proj_grad"] * z[n]
        self.opt.step()
        return res


class ReferenceMeZOGroups(ReferenceMeZO):
    """Direction parallelism's math, sequentially: direction k of the step (seed direction_seed(step seed, k)) is
    measured on part k of the global batch; SGD on the mean of the G g_k·Z_k."""

    def step_groups(self, t: int, global_batch: int, groups: int) -> list[dict]:
        idx = StepSampler(len(self.tokens), global_batch, self.seed).global_indices(t)
        part, s = len(idx) // groups, step_seed(self.seed, t)
        grads = {n: torch.zeros_like(p) for n, p in self.params.items()}
        results = []
        for k in range(groups):
            z = {n: gaussian(direction_seed(s, k), tensor_key(n), 0, p.numel()).view_as(p)
                 for n, p in self.params.items()}
            res = self.two_point(idx[k * part:(k + 1) * part], self.params, z)
            for n in self.params:
                grads[n] += res["proj_grad"] / groups * z[n]
            results.append(res)
        for n, p in self.params.items():
            p.grad = grads[n]
        self.opt.step()
        return results


def vectors(model) -> dict[str, torch.Tensor]:
    """The 1-D parameters (norm scales, biases), under the names dszo gives them once their module is wrapped."""
    return {n.rsplit(".", 1)[0] + ".base." + n.rsplit(".", 1)[1]: p for n, p in model.named_parameters() if p.dim() == 1}


class ReferenceLOZO(_Reference):
    """Z = U Vᵀ per linear weight written into W, dense z on 1-D tensors; W -= lr g U Vᵀ, or LOZO-M's
    momentum N in the small space (and N ← β N + (1-β) g z on the 1-D tensors)."""

    def __init__(self, model_dir, data_cfg, seed, eps, lr, rank, lazy_interval, momentum=0.0):
        from dszo.methods.lozo import v_seed

        super().__init__(model_dir, data_cfg, seed, eps)
        head = self.model.get_output_embeddings()
        self.weights = {f"{n}.base.weight": m.weight for n, m in self.model.named_modules()
                        if isinstance(m, torch.nn.Linear) and m is not head}
        self.lr, self.rank, self.nu, self.beta, self.v_seed = lr, rank, lazy_interval, momentum, v_seed
        self.N: dict[str, torch.Tensor] = {}
        self.vectors = vectors(self.model)
        self.weights.update(self.vectors)

    def _uv(self, t, name, w):
        m, n = w.shape
        key = tensor_key(name)
        u = gaussian(step_seed(self.seed, t), key, 0, m * self.rank).view(m, self.rank)
        v = gaussian(self.v_seed(self.seed, t, self.nu), key, 0, n * self.rank).view(n, self.rank)
        return u, v

    def step(self, t: int, global_batch: int) -> dict:
        idx = StepSampler(len(self.tokens), global_batch, self.seed).global_indices(t)
        s = step_seed(self.seed, t)
        uv = {name: self._uv(t, name, w) for name, w in self.weights.items() if name not in self.vectors}
        z = {n: u @ v.T for n, (u, v) in uv.items()}
        z.update({n: gaussian(s, tensor_key(n), 0, p.numel()) for n, p in self.vectors.items()})
        res = self.two_point(idx, self.weights, z)
        g = res["proj_grad"]
        for name, p in self.vectors.items():
            if self.beta > 0:
                self.N[name] = self.beta * self.N.get(name, torch.zeros_like(p)) + (1 - self.beta) * g * z[name]
                p.data -= self.lr * self.N[name]
            else:
                p.data -= self.lr * g * z[name]
        for name, w in self.weights.items():
            if name in self.vectors:
                continue
            u, v = uv[name]
            if self.beta > 0:
                if name in self.N and t % self.nu == 0:
                    v_old = self._uv(t - 1, name, w)[1]
                    self.N[name] = self.N[name] @ (v_old.T @ v) / w.shape[1]
                self.N[name] = self.beta * self.N.get(name, torch.zeros_like(u)) + (1 - self.beta) * g * u
                w.data -= self.lr * self.N[name] @ v.T
            else:
                w.data -= self.lr * g * (u @ v.T)
        return res


class ReferenceAGZO(_Reference):
    """One-sided: f0 captures inputs H of every linear layer; A = QR power iterations on HᵀH from the seeded
    start; Z = R Aᵀ written into W; W -= lr g R Aᵀ."""

    def __init__(self, model_dir, data_cfg, seed, eps, lr, rank, power_iters):
        from dszo.directions import mix
        from dszo.methods.agzo import _OMEGA_STREAM

        super().__init__(model_dir, data_cfg, seed, eps)
        head = self.model.get_output_embeddings()
        self.modules = {f"{n}.base.weight": m for n, m in self.model.named_modules()
                        if isinstance(m, torch.nn.Linear) and m is not head}
        self.weights = {n: m.weight for n, m in self.modules.items()}
        self.vectors = vectors(self.model)
        self.weights.update(self.vectors)
        self.lr, self.rank, self.iters = lr, rank, power_iters
        self.omega_seed = lambda t: mix(seed, _OMEGA_STREAM, t)  # noqa: E731

    def step(self, t: int, global_batch: int) -> dict:
        idx = StepSampler(len(self.tokens), global_batch, self.seed).global_indices(t)
        acts = {n: [] for n in self.modules}
        handles = [m.register_forward_hook(lambda mod, inp, out, n=n: acts[n].append(inp[0].reshape(-1, inp[0].shape[-1])))
                   for n, m in self.modules.items()]
        f0 = self.mean_loss(idx)
        for h in handles:
            h.remove()
        z = {n: gaussian(step_seed(self.seed, t), tensor_key(n), 0, p.numel()) for n, p in self.vectors.items()}
        for name in self.modules:
            w = self.weights[name]
            h = torch.cat(acts[name])
            m, n = w.shape
            q = gaussian(self.omega_seed(t), tensor_key(name), 0, n * self.rank).view(n, self.rank)
            for _ in range(self.iters + 1):
                q = torch.linalg.qr((h.T @ (h @ q)).double())[0].float()
            r = gaussian(step_seed(self.seed, t), tensor_key(name), 0, m * self.rank).view(m, self.rank)
            z[name] = r @ q.T
        orig = {n: w.detach().clone() for n, w in self.weights.items()}
        for n, w in self.weights.items():
            w.data += self.eps * z[n]
        fp = self.mean_loss(idx)
        g = (fp - f0) / self.eps
        for n, w in self.weights.items():
            w.data.copy_(orig[n] - self.lr * g * z[n])
        return {"loss_plus": fp, "loss_minus": f0, "proj_grad": g}


def _backprop_step(ref: _Reference, t: int, global_batch: int) -> dict:
    """One first-order step of `ref.opt` on step t's examples: Σ CE / n backpropagated one unpadded example at
    a time; returns the mean loss."""
    idx = StepSampler(len(ref.tokens), global_batch, ref.seed).global_indices(t)
    ref.opt.zero_grad()
    total = 0.0
    for i in idx:
        logits = ref.model(input_ids=torch.tensor([ref.tokens[i]])).logits[0, -1, ref.enc.candidate_ids]
        loss = F.cross_entropy(logits[None], torch.tensor([ref.labels[i]])) / len(idx)
        loss.backward()
        total += float(loss.detach())
    ref.opt.step()
    return {"loss": total}


class ReferenceFirstOrderZOAct(ReferenceZOAct):
    """Backprop into B on the exact bases; torch.optim.AdamW (weight decay 0)."""

    def step(self, t: int, global_batch: int) -> dict:
        return _backprop_step(self, t, global_batch)


class ReferenceFirstOrderFull(_Reference):
    """Backprop into the parameters matching `patterns`; torch.optim.SGD with momentum."""

    def __init__(self, model_dir, data_cfg, seed, lr, momentum, patterns):
        import fnmatch

        super().__init__(model_dir, data_cfg, seed, eps=0.0)
        self.params = {n: p for n, p in self.model.named_parameters() if any(fnmatch.fnmatchcase(n, q) for q in patterns)}
        for p in self.params.values():
            p.requires_grad_(True)
        self.opt = torch.optim.SGD(list(self.params.values()), lr=lr, momentum=momentum)

    def step(self, t: int, global_batch: int) -> dict:
        return _backprop_step(self, t, global_batch)
