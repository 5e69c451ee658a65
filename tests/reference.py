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
from dszo.data import PromptEncoder, StepSampler, load_examples, split
from dszo.directions import gaussian, step_seed, tensor_key


class ReferenceZOAct:
    def __init__(self, model_dir, data_cfg: dict, rank: int, seed: int, eps: float, lr: float):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        dc = DataConfig(**data_cfg)
        self.enc = PromptEncoder(AutoTokenizer.from_pretrained(model_dir), dc)
        parts = split(load_examples(dc), dc.dev_size, dc.test_size, dc.split_seed)
        self.train_tokens = self.enc.encode(parts["train"])
        self.train_labels = [e.label for e in parts["train"]]
        self.rank, self.seed, self.eps = rank, seed, eps
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
                return output
            if name not in self.V:
                return output
            b = self.B[name].detach() + self.sign * self.eps * self.z.get(name, 0.0)
            return output + (x @ self.V[name]) @ b.T
        return hook

    def example_loss(self, i: int) -> float:
        ids = torch.tensor([self.train_tokens[i]])
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, -1, self.enc.candidate_ids]
        return float(F.cross_entropy(logits[None].double(), torch.tensor([self.train_labels[i]])))

    def compute_bases(self, num_calibration: int) -> dict[str, torch.Tensor]:
        """Exact top-r eigenvectors of Σ h hᵀ over the calibration examples, scaled to unit RMS projections."""
        idx = StepSampler(len(self.train_tokens), num_calibration, self.seed).global_indices(0)
        self.capture = {}
        for i in idx:
            self.example_loss(i)
        acts, self.capture = self.capture, None
        for name, xs in acts.items():
            h = torch.cat(xs)
            evals, evecs = torch.linalg.eigh(h.T @ h)
            top, lam = evecs[:, -self.rank:].flip(1), evals[-self.rank:].flip(0)
            top = top * torch.sign(top[top.abs().argmax(0), torch.arange(self.rank)])
            self.V[name] = (top / (lam / h.shape[0]).sqrt()).float()
        return self.V

    def step(self, t: int, global_batch: int) -> dict:
        idx = StepSampler(len(self.train_tokens), global_batch, self.seed).global_indices(t)
        s = step_seed(self.seed, t)
        self.z = {n: gaussian(s, tensor_key(f"{n}.zo_B"), 0, b.numel()).view_as(b) for n, b in self.B.items()}
        losses = {}
        for sign in (+1.0, -1.0):
            self.sign = sign
            losses[sign] = sum(self.example_loss(i) for i in idx) / len(idx)
        self.sign = 0.0
        g = (losses[1.0] - losses[-1.0]) / (2 * self.eps)
        for n, b in self.B.items():
            b.grad = g * self.z[n]
        self.opt.step()
        return {"loss_plus": losses[1.0], "loss_minus": losses[-1.0], "proj_grad": g}
