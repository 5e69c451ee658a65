"""Directions are a pure function of (seed, tensor, element): any slice equals the same slice of the whole."""
import math

import pytest
import torch

from dszo.directions import CHUNK, direction_seed, gaussian, step_seed, tensor_key
from tolerances import LAMBDA


@pytest.mark.parametrize("start,end", [(0, 10), (5, CHUNK + 7), (CHUNK - 3, CHUNK + 3), (2 * CHUNK + 1, 3 * CHUNK + 5)])
def test_slice_equals_slice_of_whole(start, end):
    whole = gaussian(123, tensor_key("w"), 0, 4 * CHUNK)
    assert torch.equal(gaussian(123, tensor_key("w"), start, end), whole[start:end])


def test_partitions_of_any_world_size_reassemble_the_whole():
    numel = 3 * CHUNK + 11
    whole = gaussian(9, tensor_key("layer.B"), 0, numel)
    for world in (1, 2, 3, 7):
        size = -(-numel // world)
        parts = [gaussian(9, tensor_key("layer.B"), r * size, min(numel, (r + 1) * size)) for r in range(world)]
        assert torch.equal(torch.cat(parts), whole)


def test_distinct_streams_and_reproducibility():
    a = gaussian(step_seed(1, 0), tensor_key("x"), 0, 1000)
    assert torch.equal(a, gaussian(step_seed(1, 0), tensor_key("x"), 0, 1000))
    for other in (gaussian(step_seed(1, 1), tensor_key("x"), 0, 1000),
                  gaussian(step_seed(2, 0), tensor_key("x"), 0, 1000),
                  gaussian(step_seed(1, 0), tensor_key("y"), 0, 1000),
                  gaussian(direction_seed(step_seed(1, 0), 1), tensor_key("x"), 0, 1000)):
        assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1]) < LAMBDA / math.sqrt(1000)  # sd of r: 1/√n


def test_standard_normal_statistics():
    z = gaussian(5, tensor_key("s"), 0, 200_000)
    n = z.numel()  # sd of the sample mean: 1/√n; of the sample std: 1/√(2n)
    assert abs(float(z.mean())) < LAMBDA / math.sqrt(n) and abs(float(z.std()) - 1) < LAMBDA / math.sqrt(2 * n)
