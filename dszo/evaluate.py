"""Held-out evaluation, sharded across ranks: each rank scores its part, only counts are all-reduced."""
from __future__ import annotations

import torch

from dszo import comm
from dszo.scoring import per_example_loss


def evaluate(rt, split, batch_size: int) -> dict:
    """Accuracy and mean candidate cross-entropy of `split` (an EncodedSplit) under the current model."""
    batches = split.rank_batches(list(range(len(split))), comm.rank(), comm.world_size(), batch_size)
    totals = torch.zeros(3, dtype=torch.float64)  # correct, loss sum, n
    for batch in batches:
        logits = rt.logits(batch).cpu()
        valid = batch.valid.double()
        totals[0] += float(((logits.argmax(-1) == batch.labels).double() * valid).sum())
        totals[1] += float((per_example_loss(logits, batch.labels).double() * valid).sum())
        totals[2] += float(valid.sum())
    correct, loss, n = rt.all_reduce_sum(totals).tolist()
    return {"accuracy": correct / n, "loss": loss / n, "num_examples": int(n)}
