"""dszo/train.py as a script, for launchers that take one (deepspeed, torchrun, mpirun, srun):

    deepspeed --num_nodes 4 --hostfile hosts dszo/train.py --config C.yaml [--key value ...]

The same as `python -m dszo train ...` (dszo/cli.py). This shim is the one place that puts the repository on
sys.path, because a launcher runs the file without installing the package.
"""
import sys
from pathlib import Path

if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dszo.cli import exit_now, main

    exit_now(main(["train", *sys.argv[1:]]))
