"""The one place that builds a run: data, the model under ZeRO-3, the method, the runtime -- returned as a `Run`.

Training, evaluation, replay (and the export's reading of a finished run) all start here, so that each sees
the same model, method and partitioning for the same config.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from dszo import comm
from dszo.config import TrainConfig, load_ds_config
from dszo.data import EncodedSplit, PromptEncoder, StepSampler
from dszo.methods import Method, get_method
from dszo.scoring import Generation, Scorer


class TaskData:
    """The task's examples, its encoder, and the encoded splits a run or an evaluation needs (made on demand)."""

    def __init__(self, cfg: TrainConfig) -> None:
        from transformers import AutoTokenizer

        from dszo.assets import resolve_tokenizer_path
        from dszo.tasks import get_task, load_splits

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer_path(cfg.model.name_or_path),
                                                       trust_remote_code=cfg.model.trust_remote_code)
        self.task = get_task(cfg.data)
        self.parts = load_splits(cfg.data, self.task)
        self.encoder = PromptEncoder(self.tokenizer, self.task, cfg.data)
        d = cfg.data
        self.generation = Generation(self.tokenizer, d.max_new_tokens, d.stop) if self.task.generation else None

    def train_split(self) -> EncodedSplit:
        return EncodedSplit(self.encoder, self.parts["train"], "train")

    def eval_split(self, name: str) -> EncodedSplit:
        d = self.cfg.data
        return EncodedSplit(self.encoder, self.parts[name], "eval", d.num_demos, self.parts["train"], d.split_seed)

    def scorer(self) -> Scorer:
        return Scorer(self.encoder.candidate_ids, self.cfg.data.loss, self.cfg.data.scoring)


@dataclass
class Run:
    """Everything a run needs before its first step."""

    cfg: TrainConfig
    run_seed: int
    data: TaskData
    method: Method
    runtime: "zero.ZeroRuntime"  # noqa: F821  (dszo.zero, imported where the run is built)
    train_split: Optional[EncodedSplit] = None
    timings: dict = field(default_factory=dict)   # seconds per phase, and the partition layout


def build_run(cfg: TrainConfig, run_seed: int, training: bool = True, calibrate: bool = True) -> Run:
    """Data, model under ZeRO-3, method and runtime. `training`: also the training split and the method's set-up
    (its calibration pass unless `calibrate` is false: a resume loads the bases from the checkpoint)."""
    from dszo import zero

    tic = time.perf_counter()
    data = TaskData(cfg)
    train_split = data.train_split() if training else None
    timings = {"data_s": time.perf_counter() - tic}
    ds_config, partition, timings["partition"] = _partition_layout(cfg)
    method = get_method(cfg.method.name)(cfg, run_seed)
    model = zero.load_model(cfg, ds_config, partition)
    method.attach(model, zero.full_shape)
    engine = zero.initialize(model, ds_config, method.torch_optimizer(), partition)
    run = Run(cfg, run_seed, data, method, zero.ZeroRuntime(engine, data.scorer()), train_split, timings)
    timings["model_s"] = time.perf_counter() - tic - timings["data_s"]
    if training:
        method.setup(run.runtime, calibration_batches(run) if calibrate else None)
        timings["method_setup_s"] = time.perf_counter() - tic - timings["data_s"] - timings["model_s"]
    return run


def _partition_layout(cfg: TrainConfig) -> tuple[dict, Optional[comm.PartitionGroup], dict]:
    """The DeepSpeed config, the ZeRO-3 partition group (None: the world) and its description for the metrics."""
    ds_config = load_ds_config(cfg.deepspeed, cfg, comm.world_size())
    per_node = cfg.partition != "world" and not cfg.method.capabilities().world_partition
    partition, num_nodes = comm.node_partition(cfg.ddp_timeout, per_node=per_node)
    if partition is not None:
        # DeepSpeed checks train_batch_size against its data-parallel size, here the node's ranks, not the world;
        # without the key it derives its own from micro batch x accumulation (dszo's sampler uses the world).
        ds_config.pop("train_batch_size")
    layout = {"mode": "node" if partition else "world", "num_nodes": num_nodes,
              "group_size": partition.get_data_parallel_world_size() if partition else comm.world_size()}
    return ds_config, partition, layout


def calibration_batches(run: Run) -> list:
    """This rank's part of the calibration examples: the first `calibration_examples` of a seeded order of the
    training set (only methods with a calibration phase -- ZO-Act's bases -- declare any)."""
    num = run.method.capabilities.calibration_examples
    if not num:
        return []
    indices = StepSampler(len(run.train_split), num, run.run_seed).global_indices(0)
    return run.train_split.rank_batches(indices, comm.rank(), comm.world_size(), run.cfg.method.calibration_batch_size)
