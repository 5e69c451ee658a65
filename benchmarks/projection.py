"""Projection of step time to real clusters: dszo ZO-Act (partition node / world) vs first-order ZeRO-3 data
parallelism of the same model. A small analytic model, calibrated on what benchmarks/ measured here.

    .venv/bin/python benchmarks/projection.py [--gpus-per-node 8 --tflops 989 --mfu 0.4 ...]

Model (every assumption is printed into the output):
- compute: a forward costs 2·P FLOPs per token; ZO-Act's step is one forward over the doubled batch (2·T tokens
  per rank) times the measured step/forward ratio (benchmarks/results/step_zo_act.json: `step_over_fwd2x`);
  first-order costs 6·P per token (forward + backward), T tokens per rank.
- ZeRO-3 parameter all-gather of B bytes over g ranks: B·(g-1)/g / bandwidth + (g-1)·latency (ring). Within a
  node at the intra-node bandwidth; a group spanning nodes runs at the inter-node bandwidth per GPU.
- ZO, partition node: one gather per step inside the node (the doubled batch needs one), then an all-reduce of
  4 float64 (3 loss sums, a stop flag) over the world: 2·log2(world)·inter-node latency. ZO, partition world: the gather spans nodes.
- first-order ZeRO-3: gathers in forward and backward (2 × B) and a reduce-scatter of the gradients (P × grad
  bytes), all over the world group, no overlap with compute (upper bound) and perfect overlap (lower bound).
- memory per GPU (weights + trainable/optimizer state), activations excluded: ZO node: P·bytes / GPUs per
  node; ZO world: P·bytes / world; first-order full fine-tuning with Adam in mixed precision: 16·P / world.
What the step model does not say: ZO methods need many more steps than backprop to reach the same accuracy (see
benchmarks/results/method_comparison.json); it compares the cost of one step.

Time to accuracy, data vs direction parallelism (issue 16), where benchmarks/results/direction_scaling.json exists:
- steps to the 1-node run's final dev loss (--reach-by dev_accuracy: accuracy) at N nodes, per method and mode, follow Amdahl's form
  S(N) = S(1)·(s + (1 − s)/N), s fitted by least squares to the steps measured at N = 1, 2, 4 (or those measured; s: the share
  of the steps that N times more examples, or directions, per step cannot remove). Assumed to carry over from
  the 135M model and task measured to the projected model sizes, and from the measured 8 examples a node to a
  node of 8 GPUs x --batch examples (a larger per-direction batch leaves less for data parallelism to gain) --
  the weakest assumptions here.
- step time at N nodes: the ZO node step above (per-GPU batch fixed), with each method's own measured step /
  forward ratio (step_zo_act.json; MeZO: step_mezo_rademacher.json, the scaling runs' directions). Direction parallelism adds the scalars of
  G = N directions (3G + 1 float64 instead of 4) and applying G − 1 more directions to the GPU's shard: free
  for ZO-Act (its coefficients are ~10⁻⁴ of P), for MeZO G − 1 more draws of Z over the shard (fused into the
  one pass over the weights, so the draws, not the memory traffic, grow: P / GPUs per node / rng_rate each).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def gather_s(nbytes: float, group: int, bw: float, lat: float) -> float:
    return 0.0 if group <= 1 else nbytes * (group - 1) / group / bw + (group - 1) * lat


def project(p: float, nodes: int, a) -> dict:
    g, world = a.gpus_per_node, a.gpus_per_node * nodes
    flops = a.tflops * 1e12 * a.mfu
    tokens = a.batch * a.seq
    wbytes = p * a.bytes_per_param
    inter = nodes > 1
    zo_compute = 2 * p * 2 * tokens / flops * a.zo_step_over_fwd2x
    scalar = 2 * math.log2(world) * a.inter_latency if world > 1 else 0.0
    zo_node = zo_compute + gather_s(wbytes, g, a.intra_bw, a.intra_latency) + scalar
    zo_world = zo_compute + gather_s(wbytes, world, a.inter_bw if inter else a.intra_bw,
                                     a.inter_latency if inter else a.intra_latency) + scalar
    fo_compute = 6 * p * tokens / flops
    bw, lat = (a.inter_bw, a.inter_latency) if inter else (a.intra_bw, a.intra_latency)
    fo_comm = 2 * gather_s(wbytes, world, bw, lat) + gather_s(p * a.grad_bytes, world, bw, lat)
    return {
        "params_b": p / 1e9, "nodes": nodes, "world": world,
        "zo_node_step_s": zo_node, "zo_world_step_s": zo_world,
        "fo_step_s_no_overlap": fo_compute + fo_comm, "fo_step_s_overlap": max(fo_compute, fo_comm),
        "zo_node_tokens_per_s": 2 * tokens * world / zo_node,
        "fo_tokens_per_s_no_overlap": tokens * world / (fo_compute + fo_comm),
        "inter_node_bytes_per_gpu_step": {"zo_node": 32 if inter else 0,
                                          "zo_world": wbytes * (world - 1) / world if inter else 0,
                                          "fo": (2 * wbytes + p * a.grad_bytes) * (world - 1) / world if inter else 0},
        "mem_gib_per_gpu": {"zo_node": wbytes / g / 2**30, "zo_world": wbytes / world / 2**30,
                            "fo_adam": 16 * p / world / 2**30},
    }


def serial_fraction(steps: dict[int, float]) -> float:
    """s of S(N) = S(1)·(s + (1 − s)/N) by least squares over the measured N (closed form, clamped to [0, 1])."""
    xs = {n: 1 - 1 / n for n in steps}
    ys = {n: v / steps[1] - 1 / n for n, v in steps.items()}
    den = sum(x * x for x in xs.values())
    return 1.0 if den == 0 else min(1.0, max(0.0, sum(xs[n] * ys[n] for n in steps) / den))


def measured_steps(scaling: dict, by: str = "dev_loss") -> dict[tuple[str, str], dict[int, float]]:
    """{(method, mode): {nodes: steps to the 1-node final dev loss (or accuracy)}} from direction_scaling.json; a
    run that never reached it counts as its whole length (a lower bound: the projection is then optimistic). The
    loss by default: on 300 dev examples an accuracy jumps by ±0.03 between evaluations, so a run can touch the
    1-node figure early and fall back (measured: ZO-Act's 2-node data run at step 50, below it again at 100); the
    loss moves more smoothly. Either target is one evaluation of one run (ZO-Act's 1-node final dev loss is also
    its lowest), so the fitted s is sensitive to it: the README gives both readings."""
    found: dict = {}
    for r in scaling["runs"].values():
        reached = (r.get("steps_to_1node_final") or {}).get(by)
        for mode in ("data", "directions") if r["nodes"] == 1 else (r["mode"],):
            found.setdefault((r["method"], mode), {})[r["nodes"]] = reached if reached is not None else r["steps"]
    return found


STEP_FILES = {"zo_act": "step_zo_act.json", "mezo": "step_mezo_rademacher.json"}   # the scaling runs' directions


def step_ratios() -> dict[str, float]:
    """Each method's measured step / one forward of the doubled batch (benchmarks/results/step_<method>.json)."""
    found = {}
    for method, name in STEP_FILES.items():
        path = REPO / "benchmarks/results" / name
        if path.exists():
            found[method] = json.loads(path.read_text())["summary"]["step_over_fwd2x"]
    return found


def time_to_accuracy(p: float, nodes: int, method: str, mode: str, steps: dict[int, float], a) -> dict:
    s = serial_fraction(steps)
    own = argparse.Namespace(**{**vars(a), "zo_step_over_fwd2x": a.step_ratios.get(method, a.zo_step_over_fwd2x)})
    step_s = project(p, nodes, own)["zo_node_step_s"]   # the scalar all-reduce: latency-bound, 4 or 3G + 1 floats
    if mode == "directions" and method == "mezo":
        step_s += (nodes - 1) * p / a.gpus_per_node / a.rng_rate
    n_steps = steps[1] * (s + (1 - s) / nodes)
    return {"method": method, "mode": mode, "params_b": p / 1e9, "nodes": nodes, "serial_fraction": s,
            "steps": n_steps, "step_s": step_s, "time_s": n_steps * step_s,
            "inter_node_bytes_per_step": 8 * (3 * (nodes if mode == "directions" else 1) + 1) if nodes > 1 else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-b", type=float, nargs="+", default=[1, 7, 13, 70])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--batch", type=int, default=8, help="examples per GPU per step")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--bytes-per-param", type=float, default=2.0, help="frozen base: 2 bf16, 0.5 nf4")
    ap.add_argument("--grad-bytes", type=float, default=2.0)
    ap.add_argument("--intra-bw", type=float, default=300e9, help="bytes/s per GPU inside a node (NVLink)")
    ap.add_argument("--inter-bw", type=float, default=50e9, help="bytes/s per GPU across nodes (400 Gb/s IB)")
    ap.add_argument("--intra-latency", type=float, default=10e-6)
    ap.add_argument("--inter-latency", type=float, default=20e-6)
    ap.add_argument("--rng-rate", type=float, default=2e11,
                    help="normals drawn per s per GPU (fused Philox + Box-Muller, memory-bound on an H100: assumed)")
    ap.add_argument("--scaling", default="benchmarks/results/direction_scaling.json")
    ap.add_argument("--reach-by", default="dev_loss", choices=["dev_loss", "dev_accuracy"],
                    help="what 'reaching the 1-node run's final figure' is measured by")
    ap.add_argument("--out", default="benchmarks/results/projection.json")
    a = ap.parse_args()
    measured = json.loads((REPO / "benchmarks/results/step_zo_act.json").read_text())["summary"]
    a.zo_step_over_fwd2x = measured["step_over_fwd2x"]
    a.step_ratios = step_ratios()
    rows = [project(s * 1e9, n, a) for s in a.sizes_b for n in a.nodes]
    assumptions = {k: v for k, v in vars(a).items() if k not in ("out", "sizes_b", "nodes")}
    assumptions["calibration"] = ("zo_step_over_fwd2x from benchmarks/results/step_zo_act.json (time to accuracy: "
                                  "step_ratios, each method's own step_<method>.json); the analytic "
                                  "gather volume P·bytes per step is the one measured by tests/test_partition.py")
    scaling = REPO / a.scaling
    tta = []
    if scaling.exists():
        for (method, mode), steps in sorted(measured_steps(json.loads(scaling.read_text()), a.reach_by).items()):
            if 1 in steps and len(steps) >= 2:   # the 1-node run and at least one more count
                tta += [time_to_accuracy(s * 1e9, n, method, mode, steps, a) for s in a.sizes_b for n in a.nodes]
    Path(a.out).write_text(json.dumps({"assumptions": assumptions, "model": __doc__, "rows": rows,
                                       "time_to_accuracy": tta}, indent=1) + "\n")
    print(f"{'P':>5} {'nodes':>5} {'ZO node s':>10} {'ZO world s':>10} {'FO s (no ovl)':>13} {'FO s (ovl)':>10} "
          f"{'x-node B/GPU ZO node':>20} {'FO':>10} {'GiB/GPU ZO node':>15} {'FO Adam':>8}")
    for r in rows:
        x, m = r["inter_node_bytes_per_gpu_step"], r["mem_gib_per_gpu"]
        print(f"{r['params_b']:4.0f}B {r['nodes']:5d} {r['zo_node_step_s']:10.3f} {r['zo_world_step_s']:10.3f} "
              f"{r['fo_step_s_no_overlap']:13.3f} {r['fo_step_s_overlap']:10.3f} {x['zo_node']:20.0f} "
              f"{x['fo'] / 1e9:9.1f}G {m['zo_node']:15.2f} {m['fo_adam']:8.2f}")

    if tta:
        print(f"\n{'method':7} {'mode':10} {'P':>4} {'nodes':>5} {'s':>5} {'steps':>7} {'step s':>7} {'time s':>8}")
        for r in tta:
            print(f"{r['method']:7} {r['mode']:10} {r['params_b']:3.0f}B {r['nodes']:5d} {r['serial_fraction']:5.2f} "
                  f"{r['steps']:7.0f} {r['step_s']:7.3f} {r['time_s']:8.0f}")


if __name__ == "__main__":
    main()
