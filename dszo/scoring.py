"""Candidate scoring: logits of the answer tokens at the last (scored) position, and the loss.

Only the last position's hidden state goes through the LM head (`logits_to_keep=1`), which saves the
vocabulary projection over every other token. The loss is the cross-entropy over the candidates
(classification as in MeZO's train_as_classification).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def candidate_logits(model, batch, candidate_ids: list[int]) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, candidate_ids].float()


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")
