"""Per-rank thread counts, the collective counter, stale build locks."""
import pytest
import torch

from dszo import comm


def test_threads_split_between_local_ranks(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "2")  # the deepspeed launcher's name for it
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    before = torch.get_num_threads()
    try:
        assert comm.set_cpu_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert comm.set_cpu_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_counter_counts_payload_bytes():
    c = comm.CommCounter()
    calls = []
    wrapped = c._wrap("all_reduce", lambda t, **kw: calls.append(t))
    wrapped(torch.zeros(3, dtype=torch.float64))
    assert c.bytes["all_reduce"] == 24 and c.calls["all_reduce"] == 1 and len(calls) == 1


def test_stale_torch_extension_build_locks_are_cleared(tmp_path, monkeypatch):
    """A build killed mid-way leaves `lock`; torch would wait on it forever. Old locks go, fresh ones stay."""
    import os
    import time


    for name, age in (("old_op", comm.STALE_LOCK_S + 60), ("building_op", 5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "lock").touch()
        os.utime(tmp_path / name / "lock", (time.time() - age, time.time() - age))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match="stale build lock"):
        assert comm.clear_stale_build_locks() == [str(tmp_path / "old_op" / "lock")]
    assert not (tmp_path / "old_op" / "lock").exists() and (tmp_path / "building_op" / "lock").exists()


@pytest.mark.parametrize("keys,rank,groups,want", [
    (["a", "a", "b", "b"], 2, 1, ([0], 2, 4)),             # one group: rank order, whatever the nodes
    (["a", "b", "a", "b"], 1, 1, ([0], 1, 4)),
    (["a", "a", "b"], 2, 1, ([0], 2, 3)),                  # unequal nodes are fine without groups
    (["a", "a", "b", "b"], 3, 2, ([1], 1, 2)),             # one group per node
    (["a", "b", "a", "b"], 2, 2, ([0], 1, 2)),             # interleaved placement: node a = ranks 0, 2
    (["a", "a", "b", "b", "c", "c", "d", "d"], 5, 2, ([1], 1, 4)),   # two nodes per group
    (["a", "a", "b", "b"], 1, 4, ([0, 1], 1, 2)),          # more groups than nodes: each node measures two
])
def test_direction_slots(monkeypatch, keys, rank, groups, want):
    monkeypatch.setattr(comm, "NODE_OF", keys)
    monkeypatch.setattr(comm, "world_size", lambda: len(keys))
    monkeypatch.setattr(comm, "rank", lambda: rank)
    assert comm.direction_slots(groups) == want


def test_direction_groups_that_do_not_fit_the_nodes_are_refused(monkeypatch):
    monkeypatch.setattr(comm, "world_size", lambda: 3)
    monkeypatch.setattr(comm, "rank", lambda: 0)
    monkeypatch.setattr(comm, "NODE_OF", ["a", "b", "c"])
    with pytest.raises(ValueError, match="must divide the number of nodes or be a multiple"):
        comm.direction_slots(2)
    monkeypatch.setattr(comm, "NODE_OF", ["a", "a", "b"])
    with pytest.raises(ValueError, match="same number of ranks on every node"):
        comm.direction_slots(2)
