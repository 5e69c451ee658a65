"""Config loading: types, unknown keys, YAML quirks, CLI overrides, DeepSpeed batch-size checks."""
import json
from pathlib import Path

import pytest

from dszo.config import ConfigError, TrainConfig, load_config, load_ds_config, parse_overrides


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_yaml_scientific_notation_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path, "learning_rate: 1e-4\nmethod:\n  zo_eps: 1e-3\n"))
    assert cfg.learning_rate == pytest.approx(1e-4) and isinstance(cfg.learning_rate, float)
    assert cfg.method.zo_eps == pytest.approx(1e-3)


def test_unknown_top_level_key_names_key_and_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'.*did you mean 'learning_rate'"):
        load_config(write(tmp_path, "learning_rat: 1e-4\n"))


def test_unknown_nested_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'method.rnak'.*'method.rank'"):
        load_config(write(tmp_path, "method:\n  rnak: 4\n"))


@pytest.mark.parametrize("text,match", [
    ("max_steps: ten\n", r"'max_steps': expected an integer, got 'ten'"),
    ("learning_rate: fast\n", r"'learning_rate': expected a number"),
    ("overwrite_output_dir: maybe\n", r"'overwrite_output_dir': expected true/false"),
    ("optim: adagrad\n", r"'optim': 'adagrad' is not one of \['adam', 'momentum', 'sgd'\]"),
    ("method: 3\n", r"'method': expected a section"),
    ("method:\n  target_modules: {a: 1}\n", r"'method.target_modules': expected a list"),
    ("max_steps: 1.5\n", r"'max_steps': expected an integer"),
    ("learning_rate: -1\n", r"learning_rate must be > 0"),
    ("method:\n  rank: 0\n", r"method.rank must be >= 1"),
    ("data:\n  task: jsonl\n", r"needs data.path"),
    ("- a\n- b\n", r"must hold a mapping"),
    ("load_best_model_at_end: true\n", r"load_best_model_at_end needs dev evaluations .*set eval_steps"),
    ("load_best_model_at_end: true\neval_steps: 5\nmetric_for_best_model: f1\n",
     r"metric_for_best_model 'f1': task rotten_tomatoes reports loss and accuracy"),
    ("load_best_model_at_end: true\neval_steps: 5\nmethod:\n  name: first_order\n",
     r"cannot load first_order's best state back"),
    ("greater_is_better: maybe\n", r"'greater_is_better': expected true/false"),
])
def test_bad_values_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: /nonexistent.yaml"):
        load_config("/nonexistent.yaml")


def test_cli_overrides_on_top_of_yaml(tmp_path):
    over = parse_overrides(["--learning_rate", "5e-4", "--method.rank=4", "--method.target_modules", "q_proj,v_proj"])
    cfg = load_config(write(tmp_path, "learning_rate: 1e-3\nmethod:\n  rank: 2\n"), over)
    assert cfg.learning_rate == pytest.approx(5e-4)
    assert cfg.method.rank == 4
    assert cfg.method.target_modules == ["q_proj", "v_proj"]


def test_cli_override_without_value():
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--max_steps"])


def _ds(tmp_path, obj):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(obj))
    return str(p)


def test_ds_config_auto_batch_sizes_are_filled(tmp_path):
    cfg = TrainConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    ds = load_ds_config(_ds(tmp_path, {"train_batch_size": "auto", "zero_optimization": {"stage": 3}}), cfg, 3)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0


@pytest.mark.parametrize("obj,match", [
    ({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 3}},
     r"train_micro_batch_size_per_gpu = 16 but the dszo config implies 8"),
    ({"train_batch_size": 8, "zero_optimization": {"stage": 3}}, r"train_batch_size = 8 but .* implies 16"),
    ({"zero_optimization": {"stage": 2}}, r"set zero_optimization.stage to 3"),
    ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}, r"remove the 'optimizer' section"),
    ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}, r"set model.dtype"),
    ({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100000}},
     r"stage3_param_persistence_threshold must be 0"),
])
def test_ds_config_mismatches(tmp_path, obj, match):
    with pytest.raises(ConfigError, match=match):
        load_ds_config(_ds(tmp_path, obj), TrainConfig(per_device_train_batch_size=8), 2)


def test_ds_config_missing_or_invalid(tmp_path):
    with pytest.raises(ConfigError, match="DeepSpeed config not found"):
        load_ds_config(str(tmp_path / "nope.json"), TrainConfig(), 1)
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(str(p), TrainConfig(), 1)


@pytest.mark.parametrize("path", sorted((__import__("pathlib").Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert cfg.method.name in path.stem


@pytest.mark.parametrize("name", ["lozo", "lozo_m", "agzo"])
def test_low_rank_sgd_methods_refuse_other_optimisers(name):
    from dszo.methods import get_method

    cfg = load_config(None, {"method": {"name": name}, "optim": "adam"})
    with pytest.raises(ConfigError, match=rf"method {name} updates W with SGD along .*set optim: sgd \(got optim: adam\)"):
        get_method(name)(cfg, run_seed=0)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(str(path))
