"""`python -m dszo`: the four commands, their --help, DeepSpeed's --local_rank before the command, usage errors."""
import subprocess
import sys

import pytest

from conftest import REPO, rank_env

COMMANDS = ("train", "evaluate", "replay", "export")


def _dszo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dszo", *args], cwd=REPO, env=rank_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    proc = _dszo(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m dszo {command}")


def test_local_rank_before_the_command_is_accepted():
    proc = _dszo("--local_rank=0", "evaluate", "--help")
    assert proc.returncode == 0 and "--split" in proc.stdout


def test_no_or_unknown_command_is_a_usage_error():
    for args in ((), ("fit",)):
        proc = _dszo(*args)
        assert proc.returncode == 2 and all(c in proc.stderr for c in COMMANDS)


def test_the_training_script_is_the_train_command():
    proc = subprocess.run([sys.executable, str(REPO / "dszo" / "train.py"), "--help"], cwd=REPO, env=rank_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m dszo train")


@pytest.mark.parametrize("command", ("evaluate", "replay", "export"))
def test_the_scripts_of_earlier_versions_name_their_replacement(command):
    proc = subprocess.run([sys.executable, str(REPO / "dszo" / f"{command}.py"), "--help"], cwd=REPO, env=rank_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and f"python -m dszo {command}" in proc.stderr
