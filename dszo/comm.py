"""All of dszo's communication: process-group init, the scalar all-reduce.

Nothing else in dszo calls a collective directly (ZeRO-3's own parameter gathers happen inside DeepSpeed).
Every collective made in the process -- dszo's and DeepSpeed's -- can be counted by `CommCounter`,
which wraps torch.distributed's functions before DeepSpeed binds them.
"""
from __future__ import annotations

import os
import signal
import warnings
from collections import defaultdict
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from dszo import shm
from dszo.launcher import local_world_size, map_launcher_env


def set_cpu_threads() -> int:
    """Ranks sharing a node's cores each get cores / local ranks threads, unless OMP_NUM_THREADS is set."""
    if os.environ.get("OMP_NUM_THREADS"):
        n = int(os.environ["OMP_NUM_THREADS"])
    else:
        n = max(1, (os.cpu_count() or 1) // local_world_size())
    torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------------------------
# Counting every collective's payload


class CommCounter:
    """Wraps torch.distributed's collectives to count calls and payload bytes per operation.

    Payload = bytes of the tensor(s) a rank contributes to (all-reduce, broadcast) or receives from
    (all-gather: the whole output buffer) the collective. Install before `deepspeed.init_distributed`,
    which binds torch.distributed's all-gather function at construction.
    """

    OPS = ("all_reduce", "all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather", "broadcast",
           "reduce_scatter_single",
           "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single", "all_reduce_coalesced",
           "all_gather_coalesced", "reduce", "gather", "scatter", "all_gather_object", "broadcast_object_list")

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        # Bytes by reach: collectives whose group lies inside one node vs groups spanning several nodes.
        self.reach: dict[str, int] = defaultdict(int)
        self.node_of: Optional[list] = None  # node key of every rank (node_partition sets it)
        self._spans: dict[int, bool] = {}
        self._orig: dict = {}

    @staticmethod
    def _nbytes(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(CommCounter._nbytes(t) for t in x)
        return 0

    def install(self) -> "CommCounter":
        for name in self.OPS:
            fn = getattr(dist, name, None)
            if fn is None or name in self._orig:
                continue
            self._orig[name] = fn
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            first = args[0] if args else next(iter(kwargs.values()), None)
            group = kwargs.get("group") or next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
            self.record(name, self._nbytes(first), group)
            return fn(*args, **kwargs)

        counted.__wrapped__ = fn
        return counted

    def record(self, name: str, nbytes: int, group) -> None:
        self.calls[name] += 1
        self.bytes[name] += nbytes
        self.reach["spans_nodes" if self._spans_nodes(group) else "within_node"] += nbytes

    def original(self, name: str):
        """The uncounted function: for collectives that are the transport's own bookkeeping."""
        return self._orig.get(name, getattr(dist, name))

    def _spans_nodes(self, group) -> bool:
        if self.node_of is None or len(set(self.node_of)) == 1:
            return False
        if group is None or group is dist.group.WORLD:
            return True
        if id(group) not in self._spans:
            self._spans[id(group)] = len({self.node_of[r] for r in dist.get_process_group_ranks(group)}) > 1
        return self._spans[id(group)]

    def snapshot(self) -> dict:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls), "reach": dict(self.reach)}

    @staticmethod
    def delta(before: dict, after: dict) -> dict:
        return {kind: {k: v - before[kind].get(k, 0) for k, v in after[kind].items() if v - before[kind].get(k, 0)}
                for kind in ("bytes", "calls", "reach")}


COUNTER: Optional[CommCounter] = None
TIMEOUT_S: float = 1800.0  # the run's collective timeout (init sets it); shared-memory waits use it too


# ----------------------------------------------------------------------------------------------
# Process group


def init(timeout_s: int, count_collectives: bool = True) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on CUDA)."""
    global COUNTER, TIMEOUT_S
    TIMEOUT_S = float(timeout_s)
    map_launcher_env()
    if count_collectives and COUNTER is None:
        COUNTER = CommCounter().install()
    clear_stale_build_locks()
    import deepspeed  # local: the ZO math never imports deepspeed

    # DeepSpeed 0.19 still calls the old name on every gather; one warning per rank is noise, not news.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # DeepSpeed's CPU backend also sets up a shared-memory all-reduce when LOCAL_SIZE == world size. Only
    # inference tensor parallelism uses it, and it costs: 67 MB of /dev/shm per rank that is never unlinked
    # (it filled a 24 GiB CI machine after ~350 runs) and a spin-wait without timeout on peers that never
    # come. Hiding LOCAL_SIZE for the duration of the call skips it; ZeRO-3 and dszo use gloo collectives.
    local_size = os.environ.pop("LOCAL_SIZE", None)
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False,
                                   timeout=timedelta(seconds=timeout_s))
    finally:
        if local_size is not None:
            os.environ["LOCAL_SIZE"] = local_size


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over all ranks (the per-step scalars, evaluation counts, basis sketches)."""
    if world_size() == 1:
        return values
    out = values.to(device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


class StopFlag:
    """A stop request (SIGTERM from Slurm's preemption or time limit, SIGINT) rides on the step's all-reduce as one
    more float, so that every rank learns of it at the same step without a second collective."""

    def __init__(self) -> None:
        self.requested = False   # this rank was asked to stop
        self.agreed = False      # some rank was: every rank stops after the same step

    def install_handlers(self) -> None:
        """Catch SIGTERM / SIGINT from now on (a new run in this process starts with no request)."""
        self.requested = self.agreed = False

        def handler(signum, frame):
            self.requested = True
        _on_stop_signals(handler)

    @staticmethod
    def raise_on_signal(make_error) -> None:
        """Until install_handlers: SIGTERM / SIGINT raise make_error() at once. During set-up there is nothing new
        to save, and waiting for the first step's all-reduce would hold a preempted job for minutes."""
        def handler(signum, frame):
            raise make_error()
        _on_stop_signals(handler)


def _on_stop_signals(handler) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


STOP = StopFlag()


def reduce_step(sums: torch.Tensor) -> torch.Tensor:
    """The step's one all-reduce: this rank's loss sums, with its stop request appended (STOP.agreed after)."""
    out = all_reduce_sum(torch.cat([sums, sums.new_tensor([float(STOP.requested)])]))
    STOP.agreed = STOP.agreed or bool(out[-1] > 0)
    return out[:-1]


def broadcast_int(value: int, src: int = 0) -> int:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device())
    dist.broadcast(t, src)
    return int(t.item())


def all_max_int(value: int) -> int:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def node_key() -> str:
    """What names this rank's node. The simulated cluster's nodes share one hostname, so the launcher-given node
    identity comes first (sim_cluster.sh: DSZO_NODE_ADDR; deepspeed: CROSS_RANK; torchrun: GROUP_RANK; Slurm)."""
    for k in ("DSZO_NODE_ADDR", "CROSS_RANK", "GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(k):
            return f"{k}={os.environ[k]}"
    import socket

    return socket.gethostname()


class PartitionGroup:
    """The `mpu` DeepSpeed takes: its data-parallel group is the ZeRO-3 partition group (the ranks of this node).
    Model parallelism is absent (size 1). dszo's own collectives keep using the world group."""

    def __init__(self, group, ranks: list[int]) -> None:
        self.group, self.ranks = group, ranks

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.ranks

    def get_data_parallel_world_size(self) -> int:
        return len(self.ranks)

    def get_data_parallel_rank(self) -> int:
        return self.ranks.index(rank())

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def node_partition(timeout_s: int, per_node: bool = True) -> tuple[Optional[PartitionGroup], int]:
    """(this node's partition group, number of nodes); the group is None on a single node (it is the world) or
    without `per_node`. Collective: every rank learns every rank's node (the byte counter sorts collectives by
    reach with it) and creates every node's group, in the same order."""
    if world_size() == 1:
        return None, 1
    global NODE_OF
    keys: list = [None] * world_size()
    dist.all_gather_object(keys, node_key())
    nodes = list(dict.fromkeys(keys))  # in order of first rank
    NODE_OF = keys
    if COUNTER is not None:
        COUNTER.node_of = keys
    if len(nodes) == 1 or not per_node:
        return None, len(nodes)
    mine = None
    for key in nodes:
        ranks = [r for r, k in enumerate(keys) if k == key]
        group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
        if rank() in ranks:
            mine = PartitionGroup(group, ranks)
    return mine, len(nodes)


NODE_OF: Optional[list] = None   # node key of every rank, once node_partition has run


def direction_slots(groups: int) -> tuple[list[int], int, int]:
    """Direction parallelism: the world's nodes form `groups` groups of whole nodes; group k measures direction
    slot k on part k of the global batch. Returns (the slots this rank measures, its position among the ranks
    that share them, how many ranks share them). With fewer nodes than groups, each node measures several
    slots one after another (one rank: all of them) -- the same step, sequentially."""
    if groups == 1:   # every rank measures the one slot, in rank order (as before direction parallelism)
        return [0], rank(), world_size()
    keys = NODE_OF if NODE_OF is not None and world_size() > 1 else ["local"] * world_size()
    nodes = list(dict.fromkeys(keys))
    ranks_of = {n: [r for r, k in enumerate(keys) if k == n] for n in nodes}
    if len({len(r) for r in ranks_of.values()}) != 1:
        raise ValueError(f"direction_groups needs the same number of ranks on every node, got "
                         f"{ {n: len(r) for n, r in ranks_of.items()} }")
    me, n = nodes.index(keys[rank()]), len(nodes)
    if groups <= n and n % groups == 0:
        per = n // groups
        slot = me // per
        ranks = sorted(r for node in nodes[slot * per:(slot + 1) * per] for r in ranks_of[node])
        return [slot], ranks.index(rank()), len(ranks)
    if groups > n and groups % n == 0:
        per = groups // n
        return list(range(me * per, (me + 1) * per)), ranks_of[nodes[me]].index(rank()), len(ranks_of[nodes[me]])
    raise ValueError(f"direction_groups = {groups} with {n} nodes: the number of groups must divide the number of "
                     "nodes or be a multiple of it")


STALE_LOCK_S = 3600  # DeepSpeed's CPU comm op builds in about a minute, a CUDA op in minutes: an hour-old lock is stale


def clear_stale_build_locks(max_age_s: float = STALE_LOCK_S) -> list[str]:
    """Remove torch-extension build locks left by a process killed while building (torch waits on such a lock
    forever: every later run would hang at start-up). Returns what was removed."""
    import glob
    import time

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    removed = []
    for lock in glob.glob(os.path.join(root, "*", "lock")) if root else []:
        try:
            if time.time() - os.path.getmtime(lock) > max_age_s:
                os.remove(lock)
                removed.append(lock)
                warnings.warn(f"removed a stale build lock {lock} (older than {max_age_s:.0f} s: its builder died)")
        except OSError:
            pass   # another rank removed it first
    return removed


def prebuild_shm_op() -> None:
    """Build DeepSpeed's CPU shared-memory comm op once (launch/setup.sh), into TORCH_EXTENSIONS_DIR."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        print(f"[assets] accelerator {acc.device_name()}: no CPU comm op to prebuild")
        return
    builder = acc.create_op_builder("ShareMemCommBuilder")
    if builder is None:
        print("[assets] this DeepSpeed has no shared-memory comm op; nothing to build")
        return
    builder.load(verbose=False)
    print(f"[assets] DeepSpeed {builder.NAME} op ready in {os.environ['TORCH_EXTENSIONS_DIR']}")


# ----------------------------------------------------------------------------------------------
# Shared-memory all-gather for groups on one host (ZeRO-3's parameter gathers on CPU; see dszo/shm.py)

_LOCAL_GATHERS: dict = {}  # id(group) -> ShmAllGather, or None where the group spans hosts


def _uncounted(name: str):
    return COUNTER.original(name) if COUNTER is not None else getattr(dist, name)


def _host_identity() -> tuple:
    """Ranks that can share memory: same launcher node, same kernel boot, same network namespace (the
    simulated cluster's nodes are namespaces of one host and must stay apart, as real nodes would)."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return node_key(), boot, os.stat("/proc/self/ns/net").st_ino


def _local_gather(group) -> Optional["shm.ShmAllGather"]:
    """The shared-memory gather of `group`, or None. Collective over the group on its first use."""
    key = id(group) if group is not None else 0
    if key not in _LOCAL_GATHERS:
        _LOCAL_GATHERS[key] = None
        if os.environ.get("DSZO_SHM_GATHER", "1") != "0" and shm.supported():
            members = dist.get_world_size(group)
            ids: list = [None] * members
            _uncounted("all_gather_object")(ids, (_host_identity(), os.urandom(6).hex()), group=group)
            if len({host for host, _ in ids}) == 1:
                # the group's first rank's nonce: no two groups or jobs share a name
                name = (f"{os.getuid()}_{os.environ.get('MASTER_PORT', '')}_{ids[0][1]}").replace("/", "_")

                def agree(ok: bool) -> bool:
                    flag = torch.tensor([0 if ok else 1])
                    _uncounted("all_reduce")(flag, op=dist.ReduceOp.SUM, group=group)
                    return int(flag) == 0

                _LOCAL_GATHERS[key] = shm.ShmAllGather(name, dist.get_rank(group), members, TIMEOUT_S, agree)
    return _LOCAL_GATHERS[key]


def local_all_gather(inp: torch.Tensor, out: torch.Tensor, group) -> bool:
    """All-gather through shared memory when the group lies on one host; False if the caller must use its
    collective. Counted as the all-gather it replaces (bytes within the node)."""
    if torch.cuda.is_available() or dist.get_world_size(group) == 1:
        return False
    gather = _local_gather(group)
    if gather is None or not gather(inp, out):
        return False
    if COUNTER is not None:
        COUNTER.record("all_gather_into_tensor", out.numel() * out.element_size(), group)
    return True


def shutdown() -> None:
    """Barrier + destroy: a gloo process that just exits sometimes aborts with exit -6."""
    if is_initialized():
        try:
            dist.barrier()
        finally:
            _close_local_gathers()
            dist.destroy_process_group()


def abandon() -> None:
    """Destroy the process group without a barrier: after an error, the other ranks may never arrive."""
    _close_local_gathers()
    if is_initialized():
        dist.destroy_process_group()


def _close_local_gathers() -> None:
    for g in _LOCAL_GATHERS.values():
        if g is not None:
            g.close()
    _LOCAL_GATHERS.clear()
