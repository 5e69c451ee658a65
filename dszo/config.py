"""Typed run configuration: dataclasses loaded from YAML, CLI overrides on top, strict validation.

Training options use the names of HF `TrainingArguments` (learning_rate, max_steps, ...). Model, data
and method options live in their own sections. Unknown keys and wrong types are errors that name the
key; a number written `1e-4` (which YAML 1.1 reads as a string) is accepted for float fields.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from dszo import best
from dszo.errors import ConfigError
from dszo.methods import registry
from dszo.methods.base import MethodConfig

__all__ = ["ConfigError", "DataConfig", "MethodConfig", "ModelConfig", "TrainConfig", "load_config",
           "load_ds_config", "parse_overrides", "to_dict", "dump_yaml", "method_config_class"]


def method_config_class(name: str) -> type:
    """The config class of the method named `name` (dszo/methods/registry.py)."""
    return registry.lookup(name).config


@dataclass
class ModelConfig:
    # A local HF causal-LM folder, a hub name (where a hub is reachable), or `bundled:smollm2-135m`.
    name_or_path: str = "bundled:smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    # Frozen base weights as bitsandbytes 4-bit (nf4 / fp4) or 8-bit, partitioned by ZeRO-3 (dszo/quantization.py).
    quantization: Literal["none", "nf4", "fp4", "int8"] = "none"
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"   # 4-bit matmul dtype
    double_quant: bool = False                                             # 4-bit: quantize the absmax too


@dataclass
class DataConfig:
    """The task, where its rows come from, how examples are sampled, scored and prompted (dszo/tasks/)."""
    # rotten_tomatoes (bundled, offline) | trec (bundled with --transfer) | sst2 rte cb boolq wsc wic multirc copa
    # record squad drop |
    # custom (also: jsonl, csv) -- a template and answers given here.
    task: str = "rotten_tomatoes"
    # A data file (.jsonl/.json/.csv/.parquet), a folder of split files, or a datasets save_to_disk folder;
    # empty: a benchmark task loads its HF dataset by name where a hub is reachable.
    path: Optional[str] = None
    # Custom tasks: the prompt (str.format over the row's fields), the label values in class order and one
    # answer per class, appended to the prompt; or per-row answers from `choices_field` (a list).
    template: str = "{sentence} It was"
    label_field: str = "label"
    labels: list[str] = field(default_factory=lambda: ["rotten", "fresh"])
    candidates: list[str] = field(default_factory=lambda: [" terrible", " great"])
    choices_field: Optional[str] = None
    # Sampling: one file is split into dev / test / train; split folders follow MeZO (test from validation,
    # dev and train from train). train_size 0 = every remaining training example.
    train_size: int = 0
    dev_size: int = 300
    test_size: int = 1000
    split_seed: int = 0
    max_length: int = 128               # tokens per row; longer prompts lose their beginning
    # Training loss: classification = cross-entropy over the candidates' scores (MeZO's train_as_classification);
    # lm = negative log-likelihood of the right answer's tokens (the only one for generation tasks).
    loss: Literal["classification", "lm"] = "classification"
    # Evaluation score of a candidate: mean token log-prob, sum, or calibrated (minus its log-prob after the
    # task's content-free prompt).
    scoring: Literal["mean", "sum", "calibrated"] = "mean"
    num_demos: int = 0                  # in-context demonstrations (from the train split) in evaluation prompts
    max_new_tokens: int = 50            # generation tasks: greedy decoding length and stop strings
    stop: list[str] = field(default_factory=lambda: ["\n"])


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=lambda: method_config_class("zo_act")())
    deepspeed: str = "ds_configs/zero3_cpu.json"
    output_dir: str = "runs/default"
    overwrite_output_dir: bool = False
    seed: int = 42
    max_steps: int = 100
    learning_rate: float = 1e-3
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    optim: Literal["adam", "momentum", "sgd"] = "adam"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    momentum: float = 0.9
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    logging_steps: int = 10
    eval_steps: int = 0               # 0: evaluate only before and after training
    test_eval_steps: int = 0          # also the test split every N steps, for curves in reports (never for selection)
    save_steps: int = 0               # resumable checkpoint every N steps (0: none; SIGTERM and a new dev-best model
                                      # with load_best_model_at_end always save one)
    save_total_limit: int = 2         # keep the newest N checkpoints (0: all)
    resume_from_checkpoint: Optional[str] = None   # "latest" (output_dir's pointer) or a checkpoint folder
    max_bad_steps: int = 10           # stop (with a checkpoint) after N steps in a row with a non-finite loss; 0: never
    replay_log: bool = True           # <output_dir>/replay.jsonl: (seed, g, lr) per step; `dszo replay` rebuilds the run
    eval_before_training: bool = True
    # Keep the dev-best model (dszo/best.py): a dev evaluation that beats the earlier ones saves a checkpoint, which
    # is loaded back at the end for the test split and the saved tensors. The metric: loss or accuracy (f1 or
    # exact_match for generation tasks); greater_is_better unset: true unless the metric is a loss (HF's rule).
    load_best_model_at_end: bool = False
    metric_for_best_model: str = "loss"
    greater_is_better: Optional[bool] = None
    do_predict: bool = False          # also evaluate the test split at the end (results.json: test_*)
    ddp_timeout: int = 600            # seconds; every collective fails after this instead of hanging
    # ZeRO-3 partition group of the frozen base and the trainable tensors. node: each node holds one sharded copy
    # and parameter gathers stay inside the node (only dszo's scalars cross nodes); world: one copy over all ranks
    # (for a model that does not fit in one node). auto: node for ZO methods on several nodes, else world.
    partition: Literal["auto", "world", "node"] = "auto"
    # Direction parallelism: G groups of whole nodes each measure their own direction of the step on their part of
    # the global batch (G x num_directions directions a step); only the G x 3 loss sums cross nodes. 1: off.
    direction_groups: int = 1
    disable_tqdm: bool = False
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl, tensorboard
    log_comm_bytes: bool = True       # count bytes of every collective (cheap) and log them per step
    log_memory: bool = True           # peak RSS per rank in the metrics


# ----------------------------------------------------------------------------------------------
# Loading and validation


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [v.strip() for v in str(value).split(",")] if isinstance(value, str) else [value]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r} ({type(value).__name__})")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a section (mapping), got {value!r}")
        if tp is MethodConfig:  # the section's fields depend on the method it names
            tp = method_config_class(str(value.get("name", MethodConfig.name)))
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r} ({type(value).__name__})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r} ({type(value).__name__})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r} ({type(value).__name__})")
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in hints:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{k}'{hint}")
        kwargs[k] = _coerce(v, hints[k], f"{prefix}{k}")
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
    d[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """`--learning_rate 1e-4 --method.rank=4` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}: overrides are written --key value or --key=value")
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override {a} has no value: write {a} VALUE or {a}=VALUE")
            k, v = a[2:], args[i + 1]
            i += 2
        _set_dotted(out, k, yaml.safe_load(v) if v != "" else "")
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Optional[str], overrides: Optional[dict] = None) -> TrainConfig:
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    cfg = _build(TrainConfig, _deep_merge(raw, overrides or {}))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.max_steps >= 0, f"max_steps must be >= 0, got {cfg.max_steps}")
    need(cfg.learning_rate > 0, f"learning_rate must be > 0, got {cfg.learning_rate}")
    need(cfg.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1")
    need(cfg.per_device_eval_batch_size >= 1, "per_device_eval_batch_size must be >= 1")
    need(cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
    need(cfg.ddp_timeout >= 1, "ddp_timeout must be >= 1 second")
    for key in ("save_steps", "save_total_limit", "max_bad_steps", "eval_steps", "test_eval_steps", "logging_steps"):
        need(getattr(cfg, key) >= 0, f"{key} must be >= 0, got {getattr(cfg, key)}")
    need(0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1, "adam_beta1/adam_beta2 must lie in [0, 1)")
    need(cfg.direction_groups >= 1, f"direction_groups must be >= 1, got {cfg.direction_groups}")
    need(cfg.direction_groups == 1 or cfg.method.capabilities().zeroth_order,
         f"direction_groups > 1 needs a zeroth-order method; {cfg.method.name} computes gradients")
    need(not (cfg.direction_groups > 1 and cfg.partition == "world"),
         "direction_groups > 1 needs partition: node (or auto): every group of nodes holds its own sharded copy")
    need(not (cfg.partition == "node" and cfg.method.capabilities().world_partition),
         f"partition: node cannot train {cfg.method.name}: its gradients must be reduced across every rank of every "
         "node, which a per-node ZeRO-3 group does not do; use partition: world (or auto)")
    cfg.method.validate()
    cfg.method.check_model(cfg.model)
    d = cfg.data
    from dszo.tasks import REGISTRY
    from dszo.tasks.sources import BUNDLED

    need(d.task in REGISTRY, f"unknown data.task {d.task!r}; choose one of {', '.join(sorted(REGISTRY))}")
    task = REGISTRY[d.task]
    bundled = d.task in BUNDLED   # rows from an installed package, the prompt from the config
    if bundled or d.task in ("custom", "jsonl", "csv"):
        need(d.choices_field or len(d.candidates) == len(d.labels) >= 2,
             f"data.candidates ({len(d.candidates)}) and data.labels ({len(d.labels)}) must have the same length >= 2")
        need(bundled or d.path, f"data.task '{d.task}' needs data.path (a data file or folder)")
    else:
        defaults = DataConfig()
        for key in ("template", "labels", "candidates", "choices_field"):
            need(getattr(d, key) == getattr(defaults, key),
                 f"data.{key} is for custom tasks; task {d.task} uses the MeZO paper's prompt and answers "
                 f"(dszo/tasks/); for your own prompt use task: custom")
    need(not (task.kind == "generation" and d.loss != "lm"),
         f"task {d.task} is a generation task: train it with data.loss: lm (the answer tokens' likelihood)")
    if cfg.load_best_model_at_end:
        need(0 < cfg.eval_steps < cfg.max_steps, "load_best_model_at_end needs dev evaluations during training to "
             f"choose from: set eval_steps below max_steps ({cfg.max_steps}), e.g. a tenth of it")
        need(cfg.method.capabilities().resumable, f"load_best_model_at_end cannot load {cfg.method.name}'s best "
             "state back: it lives in DeepSpeed's training engine, which dszo's checkpoints do not hold")
        known = best.metrics_of(task.kind)
        need(best.metric_name(cfg.metric_for_best_model) in known, f"metric_for_best_model "
             f"{cfg.metric_for_best_model!r}: task {d.task} reports {' and '.join(known)} on the dev split")
    for key in ("train_size", "dev_size", "test_size", "num_demos"):
        need(getattr(d, key) >= 0, f"data.{key} must be >= 0, got {getattr(d, key)}")
    need(d.max_length >= 8 and d.max_new_tokens >= 1, "data.max_length must be >= 8 and data.max_new_tokens >= 1")
    for r in cfg.report_to:
        need(r in ("jsonl", "tensorboard"), f"report_to: unknown reporter {r!r} (jsonl, tensorboard)")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# DeepSpeed config: lives in ds_configs/*.json; batch sizes are checked against ours.


def load_ds_config(path: str, cfg: TrainConfig, world_size: int) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path} (set `deepspeed:` or --deepspeed_config)")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"DeepSpeed config {path}: dszo shards the frozen base with ZeRO-3; "
                          f"set zero_optimization.stage to 3 (got {stage!r})")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"DeepSpeed config {path}: remove the '{key}' section; dszo owns the optimiser "
                              "(set optim / learning_rate / lr_scheduler_type in the dszo config)")
    for key in ("fp16", "bf16"):
        if ds.get(key, {}).get("enabled") in (True, "true", "auto"):
            raise ConfigError(f"DeepSpeed config {path}: '{key}.enabled' would cast the trainable coefficients; "
                              "set model.dtype in the dszo config instead (coefficients stay fp32)")
    zero = ds["zero_optimization"]
    for key in ("stage3_param_persistence_threshold", "stage3_model_persistence_threshold"):
        # A persistent (replicated) parameter would ignore the in-place update of its partition.
        if zero.setdefault(key, 0) != 0:
            raise ConfigError(f"DeepSpeed config {path}: zero_optimization.{key} must be 0 so that every trainable "
                              f"tensor is partitioned, not replicated (got {zero[key]})")
    expected = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size,
    }
    for key, want in expected.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = want
        elif have != want:
            raise ConfigError(
                f"DeepSpeed config {path}: {key} = {have} but the dszo config implies {want} "
                f"(per_device_train_batch_size={cfg.per_device_train_batch_size}, gradient_accumulation_steps="
                f"{cfg.gradient_accumulation_steps}, world size {world_size}); set it to \"auto\" or {want}")
    return ds
