"""`partition: node` on a simulated 2-node x 2-rank cluster (network namespaces, real TCP between nodes).

Each node holds one ZeRO-3-sharded copy of the frozen base and of the trainable tensors; parameter gathers stay
inside the node and the only collective whose group spans nodes is dszo's 3-scalar all-reduce. The run must
still equal the 1-rank run (I1). `partition: world` on the same cluster is the contrast: its gathers span nodes.
"""
from __future__ import annotations

import math

import pytest
import yaml

from conftest import OTHER_KERNELS, REPO, launch, load_adapter, rank_env, read_metrics, run_group, step_records, tiny_config
from compare import assert_same_zo_act_runs
from test_distributed import GLOBAL_BATCH, STEPS, _can_make_netns


def test_first_order_refuses_a_node_partition():
    from dszo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="partition: node cannot train first_order"):
        load_config(None, {"method": {"name": "first_order"}, "partition": "node"})


@pytest.fixture(scope="module")
def cluster_runs(tiny_model, tiny_data, tmp_path_factory):
    reason = _can_make_netns()
    if reason:
        pytest.skip(f"needs network namespaces: {reason}")
    root = tmp_path_factory.mktemp("partition")
    r1 = tiny_config(tiny_model, tiny_data, root / "r1", max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH)
    launch(r1, 1)
    runs = {"r1": root / "r1"}
    for mode in ("node", "world"):
        cfg = tiny_config(tiny_model, tiny_data, root / mode, max_steps=STEPS,
                          per_device_train_batch_size=GLOBAL_BATCH // 4, partition=mode)
        (root / f"{mode}.yaml").write_text(yaml.safe_dump(cfg))
        proc = run_group(["bash", str(REPO / "launch" / "sim_cluster.sh"), "2", "2", "dszo/train.py",
                          "--config", str(root / f"{mode}.yaml")], timeout=420, env=rank_env(**OTHER_KERNELS))
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        runs[mode] = root / mode
    return runs


def _setup(run):
    return next(r for r in read_metrics(run) if r.get("event") == "setup")


def _gather_bytes(tiny_model, run, group_size):
    """ZeRO-3 gathers every parameter once per step; partitions are padded to a multiple of the group size."""
    from safetensors.torch import load_file

    tensors = [*load_file(str(tiny_model / "model.safetensors")).values(), *load_adapter(run).values()]
    return 4 * sum(math.ceil(t.numel() / group_size) * group_size for t in tensors)


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.netns
def test_node_partition_is_exact_and_only_scalars_cross_nodes(cluster_runs, tiny_model, zo_act_spectrum):
    run = cluster_runs["node"]
    setup = _setup(run)
    assert setup["world_size"] == 4
    assert setup["partition"] == {"mode": "node", "num_nodes": 2, "group_size": 2}
    total = sum(v.numel() for k, v in load_adapter(run).items() if k.endswith(".zo_B"))
    assert setup["trainable_elements_local"] == total // 2  # sharded over the node's 2 ranks, one copy per node
    assert_same_zo_act_runs(cluster_runs["r1"], run, zo_act_spectrum)  # I1
    gathers = _gather_bytes(tiny_model, run, 2)
    for rec in step_records(run):
        assert rec["comm"]["bytes"]["all_reduce"] == 4 * 8
        assert rec["comm"]["reach"] == {"spans_nodes": 4 * 8, "within_node": gathers}, rec["comm"]


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.netns
def test_world_partition_gathers_across_nodes(cluster_runs, tiny_model, zo_act_spectrum):
    run = cluster_runs["world"]
    assert _setup(run)["partition"] == {"mode": "world", "num_nodes": 2, "group_size": 4}
    assert_same_zo_act_runs(cluster_runs["r1"], run, zo_act_spectrum)
    gathers = _gather_bytes(tiny_model, run, 4)
    for rec in step_records(run):
        assert rec["comm"]["reach"] == {"spans_nodes": 4 * 8 + gathers}, rec["comm"]
