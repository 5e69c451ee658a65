"""A single-process runtime for unit tests of method math on plain modules (no DeepSpeed): this process
owns every element and the all-reduce is the identity. Multi-rank behaviour is tested with real ranks."""
import torch

from dszo.directions import tensor_key
from dszo.methods.base import Partition


class LocalRuntime:
    def __init__(self, model):
        self.model = model

    def partition(self, name, p):
        return Partition(name, tensor_key(name), tuple(p.shape), 0, p.numel(), p.data.view(-1))

    def forward(self, batch):
        with torch.no_grad():
            self.model(batch.x)

    @staticmethod
    def all_reduce_sum(t):
        return t

    reduce_step = all_reduce_sum
