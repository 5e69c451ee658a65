"""Shared fixtures: a tiny Llama with its own word-level tokenizer, a tiny sentiment JSONL, and helpers that
launch real ranks (deepspeed / torchrun / mpirun launchers, gloo) on them."""
from __future__ import annotations

import json
import os
import glob
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DSZO_CACHE", str(REPO / ".cache"))

POSITIVE = "good great superb moving brilliant charming fresh witty".split()
NEGATIVE = "bad dull boring awful tedious stale clumsy weak".split()
NEUTRAL = "the film movie plot story cast a an is was very quite rather and but this that".split()
SPECIAL = ["[PAD]", "[UNK]", "It", "terrible"]


def _vocab() -> list[str]:
    return SPECIAL + sorted(set(POSITIVE + NEGATIVE + NEUTRAL))


def make_sentences(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.random() < 0.5
        words = rng.sample(NEUTRAL, 4) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words[: rng.randint(3, 6)] + words[-1:]),
                     "label": "fresh" if label else "rotten"})
    return rows


def build_tiny_model(path: Path, seed: int = 0, layers: int = 2) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocab())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_data") / "sentiment.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_sentences(240)))
    return path


def tiny_config(model: Path, data: Path, out: Path, **overrides) -> dict:
    cfg = {
        "model": {"name_or_path": str(model)},
        "data": {"task": "jsonl", "path": str(data), "template": "{sentence} It was",
                 "labels": ["rotten", "fresh"], "candidates": [" terrible", " great"],
                 "dev_size": 24, "test_size": 16},
        # basis_oversample >= every layer width: the sketch spans the whole input space, so the basis is the
        # exact eigendecomposition and the tests can compare it with torch.linalg.eigh.
        # orthonormal: the bounds on a run's V (tests/tolerances.py) are for unit eigenvectors; the default
        # output_rms scaling is tested against the reference in test_basis_scale.py.
        "method": {"name": "zo_act", "rank": 2, "zo_eps": 1e-2, "num_calibration": 16,
                   "calibration_batch_size": 4, "basis_oversample": 64, "basis_scale": "orthonormal"},
        "deepspeed": str(REPO / "ds_configs" / "zero3_cpu.json"),
        "output_dir": str(out), "seed": 7, "max_steps": 3, "learning_rate": 1e-2,
        "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "logging_steps": 1,
        "disable_tqdm": True,
    }
    for k, v in overrides.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Threads per launched rank (DSZO_TEST_RANK_THREADS, default 1: the ranks share CI's 2 cores). Thread counts
# change reduction orders, so the suite is also run with 2 (docs/numerics.md).
RANK_THREADS = os.environ.get("DSZO_TEST_RANK_THREADS", "1")

# Runs compared with a derived tolerance launch one side on other kernels -- PyTorch's scalar ATen kernels and
# MKL's conditional-numerical-reproducibility code path for its BLAS: every machine then checks that its own
# kernels and those agree, the kind of difference a CPU of another kind (AVX-512 vs AVX2) sees -- a cheap guard
# against tolerances fitted to one CPU (issue 12). Bit-exact comparisons never use it.
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}


def rank_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": RANK_THREADS, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(REPO), **extra})
    return env


def run_group(cmd: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group: on timeout the launcher *and its ranks* are killed (a rank
    left spinning on 2 CI cores slows every later test to a crawl), then the timeout is raised."""
    kwargs = {"env": rank_env(), "cwd": REPO, **kwargs}
    with subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # lets sim_cluster.sh tear its namespaces down
            try:
                out, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            raise AssertionError(f"{cmd[:3]} did not finish in {timeout} s; killed its process group\n"
                                 f"{(out or '')[-3000:]}\n{(err or '')[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _launch_once(program: list[str], n_ranks: int, launcher: str, bindir: Path, timeout: int, env: dict | None):
    """program: [script.py, args...] or ["-m", "dszo", command, args...]."""
    port = str(free_port())
    module = program[0] == "-m"
    if launcher == "deepspeed":
        cmd = [str(bindir / "deepspeed"), "--num_gpus", str(n_ranks), "--master_port", port,
               *(["--module", *program[1:]] if module else program)]
    elif launcher == "torchrun":
        cmd = [str(bindir / "torchrun"), "--nproc_per_node", str(n_ranks), "--master_port", port, *program]
    elif launcher == "mpirun":
        cmd = ["mpirun", "-np", str(n_ranks), "--allow-run-as-root", "--oversubscribe", "-x", "MASTER_PORT=" + port,
               "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", "-x", "HF_HUB_OFFLINE", sys.executable, *program]
    elif launcher == "python":
        cmd = [sys.executable, *program]
    else:
        raise ValueError(launcher)
    return run_group(cmd, timeout=timeout, env=rank_env(**(env or {}))), port


def launch(cfg: dict, n_ranks: int, launcher: str = "deepspeed", extra: list[str] = (), timeout: int = 300,
           check: bool = True, command: str = "train", with_config: bool = True,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Launch a dszo command on `n_ranks` real ranks -- train as users do, through the dszo/train.py script;
    evaluate / replay as `-m dszo COMMAND` --; `env`: extra environment for them (e.g. OTHER_KERNELS)."""
    out = Path(cfg["output_dir"])
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = out.parent / f"{out.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    program = [str(REPO / "dszo" / "train.py")] if command == "train" else ["-m", "dszo", command]
    program += [*(["--config", str(cfg_path)] if with_config else []), *extra]
    bindir = Path(sys.executable).parent
    ports = []
    for _ in range(3):  # free_port() releases the port before the launcher binds it: another process may win
        proc, port = _launch_once(program, n_ranks, launcher, bindir, timeout, env)
        ports.append(port)
        if proc.returncode == 0 or "Address already in use" not in proc.stderr:
            break
    # Nothing a run set up may outlive it in /dev/shm (DeepSpeed's CPU all-reduce buffers did: 67 MB per rank).
    # dszo's own gather segments (dszo/shm.py) are unlinked once mapped, even when a rank fails.
    leaked = [f for p in ports for pattern in (f"deepspeed_allreduce_buffer_*_{p}_*", f"dszo_ag_*_{p}_*")
              for f in glob.glob(f"/dev/shm/{pattern}")]
    assert not leaked, f"run left shared-memory segments behind: {leaked}"
    if check and proc.returncode != 0:
        raise AssertionError(f"{launcher} run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    if check:  # a gloo rank that exits without barrier + destroy can abort with this at exit
        assert "terminate called" not in proc.stderr, proc.stderr[-4000:]
    return proc


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "event" not in r]


def load_adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "adapter.safetensors"))


@pytest.fixture(scope="session")
def zo_act_spectrum(tiny_model, tiny_data, tmp_path_factory) -> dict:
    """The exact ZO-Act bases of tiny_config's defaults (tests/reference.py) and their eigengaps, from which the
    tolerance on a run's V is derived (tests/tolerances.py: basis_atol)."""
    from reference import ReferenceZOAct

    cfg = tiny_config(tiny_model, tiny_data, tmp_path_factory.mktemp("spectrum"))
    m = cfg["method"]
    ref = ReferenceZOAct(tiny_model, cfg["data"], rank=m["rank"], seed=cfg["seed"], eps=m["zo_eps"],
                         lr=cfg["learning_rate"])
    v = ref.compute_bases(m["num_calibration"])
    return {"V": v, "gap_rel": ref.gap_rel, "trace_ratio": ref.trace_ratio}
