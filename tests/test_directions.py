"""Directions are a pure function of (seed, tensor, element): any slice equals the same slice of the whole, on any
block boundary; the generator is Philox4x32-10 (its published known-answer vectors) with Box–Muller."""
import math

import pytest
import torch

from dszo.directions import CPU_BLOCK, SIGN_CPU_BLOCK, direction, direction_seed, gaussian, mix, philox4x32, step_seed, tensor_key
from tolerances import LAMBDA

CHUNK = 4 * CPU_BLOCK  # normals per block of counters: slices across block boundaries below


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32_10 (counter words, key) -> output words."""
    cases = [((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0A4093822,
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for words, key, want in cases:
        got = philox4x32([torch.tensor([w], dtype=torch.int64) for w in words], key)
        assert [int(g) for g in got] == list(want)


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


def test_normal_distribution_and_no_correlation_within_a_counter():
    z = gaussian(11, tensor_key("ks"), 0, 400_000).double()
    n = z.numel()
    # Kolmogorov–Smirnov: P(D > t) ≈ 2·exp(−2 n t²); t for the suite's tail probability 2·exp(−λ²/2)
    t = LAMBDA / (2 * math.sqrt(n))
    x = z.sort().values
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float(torch.maximum(grid - cdf, cdf - (grid - 1 / n)).abs().max()) < t
    four = z.view(-1, 4)  # the four normals of one Philox counter, and consecutive counters
    m = four.shape[0]
    for a, b in ((0, 1), (0, 2), (1, 3), (2, 3)):
        assert abs(float(torch.corrcoef(torch.stack([four[:, a], four[:, b]]))[0, 1])) < LAMBDA / math.sqrt(m)
    assert abs(float(torch.corrcoef(torch.stack([four[:-1, 3], four[1:, 0]]))[0, 1])) < LAMBDA / math.sqrt(m)


def test_other_dtypes_are_the_fp32_values_cast():
    z = gaussian(3, tensor_key("d"), 17, 5000)
    assert torch.equal(gaussian(3, tensor_key("d"), 17, 5000, dtype=torch.float64), z.double())
    assert torch.equal(gaussian(3, tensor_key("d"), 17, 5000, dtype=torch.bfloat16), z.bfloat16())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: drawn on the GPU only where there is one")
def test_drawn_on_the_device_equal_the_cpu_values_to_the_last_bits():
    cpu = gaussian(8, tensor_key("g"), 5, 3 * CHUNK)
    cuda = gaussian(8, tensor_key("g"), 5, 3 * CHUNK, device="cuda")
    assert cuda.device.type == "cuda"
    # the Philox words are exact integers on both; fp32 log/sqrt/cos/sin of the two libraries differ by a few ulp
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=8 * 2.0 ** -24, atol=8 * 2.0 ** -24 * 6)


def test_rademacher_values_are_the_philox_bits_low_bit_first():
    """Element i of a Rademacher direction is bit i mod 32 of word (i mod 128) // 32 of Philox(counter i // 128):
    bit 1 -> -1, bit 0 -> +1, checked against the generator itself (whose known answers are tested above)."""
    seed, key = 11, 5
    z = direction("rademacher", seed, key, 0, 3 * 128)
    words = philox4x32([torch.arange(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
                        torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)], mix(seed, key))
    for i in (0, 1, 31, 32, 77, 127, 128, 200, 383):
        bit = (int(words[(i % 128) // 32][i // 128]) >> (i % 32)) & 1
        assert z[i] == (-1.0 if bit else 1.0), i


SIGN_BLOCK = 128 * SIGN_CPU_BLOCK  # values per block of counters


@pytest.mark.parametrize("start,end", [(0, 1), (5, 300), (127, 129), (1000, 70001),
                                       (SIGN_BLOCK - 3, SIGN_BLOCK + 3)])
def test_rademacher_slices_equal_the_whole_and_are_plus_minus_one(start, end):
    whole = direction("rademacher", 3, 9, 0, SIGN_BLOCK + 10)
    assert torch.equal(direction("rademacher", 3, 9, start, end), whole[start:end])
    assert set(whole.unique().tolist()) == {-1.0, 1.0}
    n = whole.numel()   # mean 0, variance 1: the mean is within LAMBDA standard deviations (1/sqrt(n))
    assert abs(float(whole.mean())) < LAMBDA / math.sqrt(n)
