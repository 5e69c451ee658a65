"""`python -m dszo {train,evaluate,replay,export} ...` (see dszo/cli.py)."""
from dszo.cli import entry

if __name__ == "__main__":
    entry()
