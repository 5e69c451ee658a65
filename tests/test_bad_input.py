"""Bad input, end to end: each case runs the real command line (dszo/train.py, python -m dszo evaluate / replay /
export) and must give a clear message naming the problem and the fix, a non-zero exit, and leave what
was already written as it was. DSZO_BAD_INPUT_TABLE=path writes the cases and their messages as a table."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import REPO, launch, rank_env, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def done_run(tiny_model, tiny_data, tmp_path_factory):
    """A finished 1-rank run with checkpoints at steps 2 and 4 and a replay log."""
    out = tmp_path_factory.mktemp("bad") / "done"
    launch(tiny_config(tiny_model, tiny_data, out, max_steps=4, save_steps=2, save_total_limit=0), 1, "python")
    return out


def _snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


def _fsize_limit(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def _cases(tiny_model, tiny_data, tmp, done):
    """(name, argv for python, regex of the message, folder whose files must not change, preexec)."""
    base = tiny_config(tiny_model, tiny_data, tmp / "out", max_steps=2)

    def cfg_file(name, cfg=None, **over):
        c = json.loads(json.dumps(cfg or {**base, "output_dir": str(tmp / f"out_{name}")}))
        for k, v in over.items():
            node = c
            *parents, leaf = k.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = v
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(c))
        return str(path)

    def data(name, text):
        (tmp / name).write_text(text)
        return str(tmp / name)

    train = str(REPO / "dszo" / "train.py")           # the script, as launchers run it
    evaluate, replay, export = "evaluate", "replay", "export"   # `python -m dszo COMMAND`
    (tmp / "held").mkdir()
    (tmp / "held" / "config.yaml").write_text("precious: true\n")
    corrupt = tmp / "corrupt"
    shutil.copytree(done, corrupt)
    (corrupt / "checkpoint-4" / "rank00000-of-00001.safetensors").write_bytes(b"\x00" * 100)
    full = tmp / "full"
    shutil.copytree(done, full)
    shutil.rmtree(full / "checkpoint-4")
    (full / "latest").write_text("checkpoint-2\n")
    ds_opt = data("ds_opt.json", json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}))
    nolog = tmp / "nolog"
    shutil.copytree(done, nolog)
    (nolog / "replay.jsonl").unlink()
    quant = tmp / "quant_run"
    shutil.copytree(done, quant)
    (quant / "config.yaml").write_text((quant / "config.yaml").read_text().replace("quantization: none",
                                                                                    "quantization: nf4"))
    done_cfg = yaml.safe_load((done / "config.yaml").read_text())
    return [
        ("unknown config key", [train, "--config", cfg_file("k", **{"warmup_stepz": 3})], r"unknown config key 'warmup_stepz' \(did you mean 'warmup_steps'\?\)", None, None),
        ("wrong type", [train, "--config", cfg_file("t", max_steps="ten")], r"'max_steps': expected an integer, got 'ten'", None, None),
        ("bad value", [train, "--config", cfg_file("v", learning_rate=-1)], r"learning_rate must be > 0", None, None),
        ("missing config file", [train, "--config", str(tmp / "nope.yaml")], r"config file not found", None, None),
        ("YAML syntax error", [train, "--config", data("y.yaml", "max_steps: [1,\n")], r"not valid YAML|could not parse", None, None),
        ("unknown method", [train, "--config", cfg_file("m", **{"method.name": "adamw_zo"})], r"unknown method 'adamw_zo'", None, None),
        ("unknown task", [train, "--config", cfg_file("tk", **{"data.task": "sst3"})], r"unknown data.task 'sst3'.*sst2", None, None),
        ("generation task with classification loss", [train, "--config", cfg_file("g", **{"data.task": "squad"})], r"generation task: train it with data.loss: lm", None, None),
        ("a method that writes W on a quantized base", [train, "--config", cfg_file("q", **{"method": {"name": "mezo"}, "model.quantization": "nf4"})], r"mezo.*quantized|quantized.*mezo", None, None),
        ("partition node for first_order", [train, "--config", cfg_file("p", partition="node", **{"method": {"name": "first_order"}})], r"partition: node cannot train first_order", None, None),
        ("DeepSpeed config with an optimizer", [train, "--config", cfg_file("d"), "--deepspeed_config", ds_opt], r"remove the 'optimizer' section", None, None),
        ("missing DeepSpeed config (launcher argument)", [train, "--config", cfg_file("dm"), "--deepspeed_config", str(tmp / "none.json")], r"DeepSpeed config not found", None, None),
        ("missing model path", [train, "--config", cfg_file("mm", **{"model.name_or_path": str(tmp / "no_model")})], r"no_model: no such model folder; give a local Hugging Face model folder", None, None),
        ("missing data path", [train, "--config", cfg_file("dp", **{"data.path": str(tmp / "no.jsonl")})], r"data.path not found", None, None),
        ("malformed data row", [train, "--config", cfg_file("mr", **{"data.path": data("bad.jsonl", '{"sentence": "good", "label": "fresh"}\n{oops\n')})], r"bad.jsonl:2: not valid JSON", None, None),
        ("unknown label", [train, "--config", cfg_file("ul", **{"data.path": data("ul.jsonl", '{"sentence": "good", "label": "meh"}\n')})], r"ul.jsonl:1: unknown label 'meh'", None, None),
        ("empty data file", [train, "--config", cfg_file("ed", **{"data.path": data("empty.jsonl", "\n")})], r"no examples found", None, None),
        ("output_dir holds another run", [train, "--config", cfg_file("h", output_dir=str(tmp / "held"))], r"already holds a run.*overwrite_output_dir", tmp / "held", None),
        ("output_dir not writable", [train, "--config", cfg_file("nw", output_dir="/proc/dszo_out")], r"cannot write to output_dir /proc/dszo_out", None, None),
        ("resume without a checkpoint", [train, "--config", cfg_file("rn", output_dir=str(tmp / "fresh"), resume_from_checkpoint="latest")], r"no 'latest' pointer", None, None),
        ("checkpoint from another method config", [train, "--config", cfg_file("rm", done_cfg, **{"method.rank": 3}, resume_from_checkpoint="latest")], r"saved with method.rank = 2, this run has 3: resume with the same settings", done, None),
        ("checkpoint from another rank layout (global batch)", [train, "--config", cfg_file("rl", done_cfg, per_device_train_batch_size=3, resume_from_checkpoint="latest")], r"global batch 8 .* per_device_train_batch_size", done, None),
        ("corrupted checkpoint file", [train, "--config", cfg_file("rc", done_cfg, output_dir=str(corrupt), resume_from_checkpoint="latest")], r"rank00000-of-00001.safetensors is corrupted.*earlier checkpoint", None, None),
        ("disk full while saving (file-size limit)", [train, "--config", cfg_file("df", done_cfg, output_dir=str(full), resume_from_checkpoint="latest")], r"could not write its checkpoint shard .*File too large.*previous checkpoint is intact", full / "checkpoint-2", _fsize_limit(20_000)),
        ("evaluate a folder that is not a run", [evaluate, "--run", str(tmp)], r"no config.yaml there", None, None),
        ("evaluate with both --config and --run", [evaluate, "--run", str(done), "--config", cfg_file("ev")], r"give either --config .* or --run", done, None),
        ("replay a run without a log", [replay, "--run", str(nolog)], r"replay.jsonl not found: the run wrote no replay log", nolog, None),
        ("merge onto a quantized base", [export, "--run", str(quant), "--format", "merged"], r"nf4-quantized: W \+ B Vᵀ cannot be stored", quant, None),
    ]


def test_bad_input_table(tiny_model, tiny_data, tmp_path, done_run):
    cases = _cases(tiny_model, tiny_data, tmp_path, done_run)
    assert len(cases) >= 20
    before = {name: _snapshot(keep) for name, _, _, keep, _ in cases if keep}

    def run(case):
        name, argv, _, _, pre = case
        program = ["-m", "dszo", *argv] if argv[0] in ("evaluate", "replay", "export") else argv
        return subprocess.run([sys.executable, *program], cwd=REPO, env=rank_env(), capture_output=True, text=True,
                              timeout=180, preexec_fn=pre)

    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(run, cases))
    rows, failures = [], []
    for (name, _, pattern, keep, _), proc in zip(cases, procs):
        msg = next((ln for ln in proc.stderr.splitlines() if ln.startswith("dszo:")), "")
        rows.append((name, proc.returncode, msg))
        if proc.returncode == 0 or not re.search(pattern, msg) or "Traceback" in proc.stderr:
            failures.append(f"{name}: exit {proc.returncode}, message {msg!r}\n{proc.stderr[-1500:]}")
        if keep and _snapshot(keep) != before[name]:
            failures.append(f"{name}: files in {keep} changed")
    if os.environ.get("DSZO_BAD_INPUT_TABLE"):
        Path(os.environ["DSZO_BAD_INPUT_TABLE"]).write_text(
            "| case | exit | message |\n|---|---|---|\n" + "".join(
                f"| {n} | {c} | `{m.replace(str(tmp_path), '…').replace('|', '/')}` |\n" for n, c, m in rows))
    assert not failures, "\n\n".join(failures)
