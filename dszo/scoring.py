"""Scoring a batch: candidate scores per example, the training loss, and greedy generation.

- One row per example with single-token answers: the answers' logits at the last position only
  (`logits_to_keep=1` skips the vocabulary projection over every other token); cross-entropy over them is
  MeZO's `train_as_classification`.
- One row per (example, candidate): the log-likelihood of the candidate's tokens, their mean (`mean`, the
  default, as MeZO trains) or sum (`sum`); `calibrated` subtracts the same answer's log-likelihood after the
  task's content-free prompt (MeZO's "sfc"). The classification loss is the cross-entropy over these scores;
  the LM loss (`data.loss: lm`) is the mean negative log-likelihood of the right answer's tokens.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

MISSING = -1e9  # score of a candidate an example does not have (ReCoRD's entity counts differ)


def candidate_logits(model, batch, candidate_ids: list[int]) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, candidate_ids].float()


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def row_log_likelihoods(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the log-probabilities of each row's last target_len tokens, target_len). Only the logits of the
    last max(target_len) + 1 positions are formed."""
    k = int(batch.target_len.max())
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=k + 1, use_cache=False)
    logp = out.logits[:, :-1].float().log_softmax(-1)                        # predicts the last k tokens
    tok = logp.gather(-1, batch.input_ids[:, -k:, None]).squeeze(-1)        # [rows, k]
    scored = torch.arange(k, device=tok.device)[None] >= (k - batch.target_len)[:, None]
    return (tok * scored).sum(-1), batch.target_len.to(tok.dtype)


class Scorer:
    def __init__(self, candidate_ids: Optional[list[int]], loss: str = "classification", rule: str = "mean") -> None:
        self.candidate_ids, self.loss, self.rule = candidate_ids, loss, rule

    def scores(self, model, batch, rule: Optional[str] = None) -> torch.Tensor:
        """[examples, candidates]: higher is more likely (MISSING where an example has fewer candidates)."""
        if batch.row_example is None:
            return candidate_logits(model, batch, self.candidate_ids)
        rule = rule or self.rule
        total, n = row_log_likelihoods(model, batch)
        s = total / n if rule == "mean" else total
        out = torch.full((batch.num_examples, batch.num_candidates), MISSING, dtype=s.dtype, device=s.device)
        null = batch.row_null
        real = ~null
        out = out.index_put((batch.row_example[real], batch.row_candidate[real]), s[real])
        if rule == "calibrated" and bool(null.any()):
            base = torch.zeros_like(out).index_put((batch.row_example[null], batch.row_candidate[null]), s[null])
            out = out - base
        return out

    def losses(self, model, batch) -> torch.Tensor:
        """[examples] training loss."""
        if self.loss == "lm":
            return -self.scores(model, batch, rule="mean")[:, 0]
        # Training scores answers by their mean (or summed) log-likelihood; calibration is an evaluation rule.
        return per_example_loss(self.scores(model, batch, rule="sum" if self.rule == "sum" else "mean"), batch.labels)


@torch.no_grad()
def greedy_generate(model, batch, max_new_tokens: int, finished: Callable[[list[int]], bool],
                    all_finished: Callable[[bool], bool]) -> list[list[int]]:
    """Greedy decoding with a KV cache. `finished(tokens)` says whether a row is done (stop string or EOS);
    `all_finished(local)` agrees across ranks, so that every rank runs the same number of forwards (ZeRO-3
    gathers parameters collectively)."""
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    new: list[list[int]] = [[] for _ in range(ids.shape[0])]
    done = [not v for v in batch.row_valid().tolist()]
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                new[i].append(t)
                done[i] = finished(new[i])
        if all_finished(all(done)):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return new


class Generation:
    """Greedy decoding settings and the stop test: a stop string in the decoded text, or EOS."""

    def __init__(self, tokenizer, max_new_tokens: int, stop: list[str]) -> None:
        self.tok, self.max_new_tokens, self.stop = tokenizer, max_new_tokens, stop
        self.eos = tokenizer.eos_token_id

    def finished(self, tokens: list[int]) -> bool:
        if self.eos is not None and tokens[-1] == self.eos:
            return True
        text = self.tok.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in self.stop)

    def decode(self, rows: list[list[int]]) -> list[str]:
        out = []
        for tokens in rows:
            text = self.tok.decode(tokens, skip_special_tokens=True)
            for s in self.stop:
                text = text.split(s)[0]
            out.append(text.strip())
        return out
