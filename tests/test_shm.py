"""The shared-memory all-gather (dszo/shm.py) against gloo's, on real processes; its timeout; no /dev/shm left."""
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dszo import comm, shm
from tests.conftest import free_port

pytestmark = pytest.mark.skipif(not shm.supported(), reason="shared-memory gathers need x86-64 Linux with /dev/shm")

# (numel per rank, dtype): small, a non-multiple of 8 bytes, a growth past the first capacity, then small again
CASES = [(1000, torch.float32), (333, torch.uint8), (3 * shm.MIN_CAPACITY // 8 + 5, torch.float64),
         (64, torch.bfloat16), (1, torch.int64)]


def _segments() -> set:
    return {p.name for p in Path(shm.SHM_DIR).glob("dszo_ag_*")}


def _compare_with_gloo(rank: int, world: int, port: int, failures) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for i, (numel, dtype) in enumerate(CASES * 2):
            g = torch.Generator().manual_seed(100 * i + rank)
            inp = (torch.randn(numel, generator=g) * 100).to(dtype)
            ours, theirs = torch.empty(world * numel, dtype=dtype), torch.empty(world * numel, dtype=dtype)
            assert comm.local_all_gather(inp, ours, None), "the world group of one host must gather through shm"
            dist.all_gather_into_tensor(theirs, inp)
            if not torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8)):
                failures.append(f"rank {rank} case {i}: {numel} x {dtype} differs from gloo")
        # a non-contiguous output is left to gloo
        assert not comm.local_all_gather(torch.zeros(4), torch.zeros(world * 4, 2)[:, 0], None)
    except Exception as e:  # noqa: BLE001 -- reported by the parent
        failures.append(f"rank {rank}: {e!r}")
    finally:
        comm.abandon()


@pytest.mark.parametrize("world", [2, 3])
def test_equals_gloo_bit_for_bit_and_leaves_no_segment(world):
    before = _segments()
    with mp.Manager() as manager:
        failures = manager.list()
        mp.spawn(_compare_with_gloo, args=(world, free_port(), failures), nprocs=world)
        assert not list(failures), list(failures)
    assert _segments() <= before, "segments are unlinked once every rank has mapped them"


def _peer_never_gathers(rank: int, port: int, result) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def agree(ok: bool) -> bool:
        flag = torch.tensor([int(not ok)])
        dist.all_reduce(flag)
        return int(flag) == 0

    gather = shm.ShmAllGather(f"test_{port}", rank, 2, timeout_s=1.0, agree=agree)
    inp, out = torch.ones(10), torch.empty(20)
    assert gather(inp, out)  # both ranks: segments allocated, one gather done
    if rank == 0:
        tic = time.monotonic()
        try:
            gather(inp, out)  # rank 1 never comes
        except TimeoutError as e:
            result["error"], result["seconds"] = str(e), time.monotonic() - tic
    else:
        time.sleep(4)
    gather.close()
    dist.destroy_process_group()


def test_a_peer_that_never_comes_raises_after_the_timeout():
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_peer_never_gathers, args=(free_port(), result), nprocs=2)
        assert "local rank 1" in result.get("error", "") and "DSZO_SHM_GATHER=0" in result["error"], dict(result)
        assert 1.0 <= result["seconds"] < 3.5, dict(result)
