"""An all-gather through shared memory, for process groups whose ranks share one host.

Why: ZeRO-3 gathers every frozen weight before each module's forward (483 gathers a forward for the bundled
model). On CPU, gloo carries them over loopback TCP at 0.2-1.5 GB/s (benchmarks/results/cpu_step.json); the
gathers then cost about as much as the forward's arithmetic. Ranks on one host can instead copy each other's
shard straight out of shared memory at memory speed.

The protocol (no locks, no syscalls on the hot path). Each rank owns one segment: a header with two
counters, `written` and `read`, each on its own cache line, then two slots of `capacity` bytes. Gather number
s (counted from 1, in the same order on every rank, as collectives are called) uses slot s % 2:
  1. wait until every peer's `read` >= s - 2 (none still reads this slot from gather s - 2);
  2. copy my shard into my slot; a fence; `written` = s;
  3. for each peer: wait until its `written` >= s, copy its slot into its place in the output;
  4. `read` = s.
Two slots let a rank write gather s + 1 while a slower peer still reads gather s. Every wait has a deadline
(the run's collective timeout): a peer that never comes raises instead of hanging. Pure data movement, so the
result is bit-identical to any other all-gather.

This module knows nothing of torch.distributed: `comm.py` decides which groups are on one host, supplies the
agreement collective used when segments are (re)allocated, and installs the gather.
"""
from __future__ import annotations

import mmap
import os
import threading
import time
from typing import Callable

import numpy as np
import torch

HEADER = 128  # int64 counters: [0] written, [4 + slot] bytes in that slot, [8] read (its own cache line)
MIN_CAPACITY = 1 << 20
SHM_DIR = "/dev/shm"
_FENCE = threading.Lock()


def fence() -> None:
    """Keeps Python from reordering the counter store before the copy: a lock's acquire/release is a locked
    instruction (a full barrier for ordinary stores on x86). The copy's own stores are ordered anyway: ATen's copy
    kernel uses ordinary stores (x86 makes them visible in program order, also across its OpenMP join) and glibc's
    memcpy ends its streaming-store loops with SFENCE."""
    _FENCE.acquire()
    _FENCE.release()


def supported() -> bool:
    """x86-64 Linux with a /dev/shm. Elsewhere (ARM's weaker memory order, no tmpfs) callers use their
    collective library."""
    return os.uname().machine in ("x86_64", "AMD64") and os.path.isdir(SHM_DIR)


class Segment:
    """One rank's mapped segment: header counters plus two slots."""

    def __init__(self, path: str, capacity: int, create: bool) -> None:
        self.capacity = capacity
        size = HEADER + 2 * capacity
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                # Reserve the pages now: a tmpfs that is too small fails here with ENOSPC, not later with SIGBUS.
                os.posix_fallocate(fd, 0, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.counters = np.frombuffer(self.map, dtype=np.int64, count=HEADER // 8)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)

    def written(self) -> int:
        return int(self.counters[0])

    def read(self) -> int:
        return int(self.counters[8])

    def slot(self, seq: int, nbytes: int) -> torch.Tensor:
        start = HEADER + (seq % 2) * self.capacity
        return self.bytes[start:start + nbytes]

    def close(self) -> None:
        del self.counters, self.bytes
        self.map.close()


def wait_until(ready: Callable[[], bool], deadline: float, what: str) -> None:
    """Spin briefly (a peer usually arrives within microseconds), then yield the core, then sleep: ranks may
    outnumber cores, and a spinning rank must not starve the peer it waits for."""
    polls = 0
    while not ready():
        polls += 1
        if polls < 200:
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"shared-memory all-gather: {what} did not arrive within the collective timeout "
                               "(a peer rank died or is stuck; set DSZO_SHM_GATHER=0 to use gloo instead)")
        if polls < 20000:
            os.sched_yield()
        else:
            time.sleep(50e-6)


class ShmAllGather:
    """All-gather over the `size` ranks of one host's group; this rank is `index` among them.

    `agree(ok) -> bool` is a collective of the group returning whether every rank's `ok` is true; it is only
    called when segments are (re)allocated, i.e. at the first gather and when a larger one arrives. `name`
    must be the same on every rank of the group and differ between groups and jobs."""

    def __init__(self, name: str, index: int, size: int, timeout_s: float, agree: Callable[[bool], bool]) -> None:
        self.name, self.index, self.size, self.timeout_s, self.agree = name, index, size, timeout_s, agree
        self.segments: list[Segment] = []
        self.seq = 0
        self.generation = 0
        self.usable = True

    def _path(self, generation: int, index: int) -> str:
        return os.path.join(SHM_DIR, f"dszo_ag_{self.name}_{generation}_{index}")

    def _allocate(self, nbytes: int) -> bool:
        """Collective: every rank maps every rank's new segment, or all give up on shared memory."""
        capacity = max(MIN_CAPACITY, 1 << (max(nbytes, 1) - 1).bit_length())
        for s in self.segments:
            s.close()
        self.segments, self.generation, self.seq = [], self.generation + 1, 0
        mine = self._path(self.generation, self.index)
        try:
            own = Segment(mine, capacity, create=True)
        except OSError:
            own = None
        try:
            if not self.agree(own is not None):  # every rank's segment exists (or none is used)
                self._give_up(own, mine)
                return False
            try:
                self.segments = [own if j == self.index else Segment(self._path(self.generation, j), capacity, False)
                                 for j in range(self.size)]
            except OSError:
                self.segments = []
            ok = self.agree(bool(self.segments))  # every rank has mapped every segment: names can go
        finally:   # also when a peer died during the agreement: nothing stays behind in /dev/shm
            if own is not None and os.path.exists(mine):
                os.unlink(mine)   # the mappings stay valid
        if not ok:
            self._give_up(own, None)
        return ok

    def _give_up(self, own, path) -> None:
        for s in self.segments:
            if s is not own:
                s.close()
        if own is not None:
            own.close()
        if path is not None and os.path.exists(path):
            os.unlink(path)
        self.segments, self.usable = [], False

    def __call__(self, inp: torch.Tensor, out: torch.Tensor) -> bool:
        """Gather `inp` of every rank into `out` (rank order). False: not done, use another collective (this
        group has no usable shared memory, or the tensors are not contiguous CPU tensors)."""
        if not (self.usable and inp.device.type == "cpu" and out.device.type == "cpu" and inp.is_contiguous()
                and out.is_contiguous() and out.numel() * out.element_size() == self.size * inp.numel() *
                inp.element_size() and inp.dtype == out.dtype):
            return False
        src = inp.view(-1).view(torch.uint8)
        nbytes = src.numel()
        if not self.segments or nbytes > self.segments[0].capacity:
            if not self._allocate(nbytes):
                return False
        self._gather(src, out.view(-1).view(torch.uint8), nbytes)
        return True

    def _gather(self, src: torch.Tensor, dst: torch.Tensor, nbytes: int) -> None:
        self.seq += 1
        seq, deadline = self.seq, time.monotonic() + self.timeout_s
        own = self.segments[self.index]
        for j, peer in enumerate(self.segments):
            wait_until(lambda: peer.read() >= seq - 2, deadline, f"local rank {j}'s read of gather {seq - 2}")
        own.slot(seq, nbytes).copy_(src)
        own.counters[4 + seq % 2] = nbytes
        fence()
        own.counters[0] = seq
        for j, peer in enumerate(self.segments):
            part = dst[j * nbytes:(j + 1) * nbytes]
            if j == self.index:
                part.copy_(src)
                continue
            wait_until(lambda: peer.written() >= seq, deadline, f"local rank {j}'s shard of gather {seq}")
            fence()
            if int(peer.counters[4 + seq % 2]) != nbytes:   # ranks must gather in the same order with the same sizes
                raise RuntimeError(f"shared-memory all-gather {seq}: local rank {j} gathers "
                                   f"{int(peer.counters[4 + seq % 2])} bytes, this rank {nbytes}: the ranks issue "
                                   "different gathers (set DSZO_SHM_GATHER=0 and report this)")
            part.copy_(peer.slot(seq, nbytes))
        fence()
        own.counters[8] = seq

    def close(self) -> None:
        for s in self.segments:
            s.close()
        self.segments = []
