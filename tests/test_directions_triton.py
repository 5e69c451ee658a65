"""The fused Triton kernels of dszo/directions_triton.py against the torch-op directions they replace on CUDA:
Philox's integer words (hence every Rademacher value) bit for bit, the Gaussians within the rounding of
Box–Muller's log/sqrt/cos/sin. On a CUDA machine the kernels run on the GPU; elsewhere, where Triton is
installed, in Triton's interpreter (TRITON_INTERPRET=1, a subprocess: it must be set before Triton is
imported); where neither, the test is skipped (CI's CPU image has no Triton)."""
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

CASES = [(0, 1000), (3, 517), (130, 131), (1000, 5000), (127, 1 << 16)]
SEED, KEY = 5, 77


def compare(device: str) -> list[str]:
    """Problems found comparing the kernels with the torch-op path on `device` (empty: none)."""
    from dszo import directions_triton as fused
    from dszo.directions import mix, torch_ops_direction

    u, problems, key = 2.0 ** -24, [], mix(SEED, KEY)
    for start, end in CASES:
        signs = fused.draw("rademacher", key, start, end, device)
        if not torch.equal(signs, torch_ops_direction("rademacher", key, start, end, torch.float32, device)):
            problems.append(f"rademacher [{start}, {end}) differs")
        got = fused.draw("gaussian", key, start, end, device).double().cpu()
        whole = -(-end // 4) * 4   # whole counters, so that every element has its pair
        want = torch_ops_direction("gaussian", key, 0, whole, torch.float32, device).double().cpu()
        # radius of each element's Box–Muller pair (elements 2i, 2i+1 share one): each implementation's log, sqrt,
        # cos and sin are within 4 ulp; the angle 2πu carries ulp(2π), which moves cos/sin by as much
        pair = want.view(-1, 2)
        radius = pair.norm(dim=1).repeat_interleave(2)[start:end]
        allowed = 2 * (3 * 4 * u + 4 * u * 2 * math.pi) * radius + 2 * u
        worst = float(((got - want[start:end]).abs() - allowed).max())
        if worst > 0:
            problems.append(f"gaussian [{start}, {end}): beyond the rounding bound by {worst:.2e}")
    return problems


def test_fused_kernels_equal_the_torch_op_directions():
    if torch.cuda.is_available():
        assert compare("cuda") == []
        return
    if importlib.util.find_spec("triton") is None:
        pytest.skip("neither CUDA nor Triton here: the fused kernels run only on CUDA machines")
    code = "import json; from tests.test_directions_triton import compare; print(json.dumps(compare('cpu')))"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-2000:]
