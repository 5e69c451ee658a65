"""The long studies' reports, on made-up sweep summaries (the studies take hours; their reports must not fail at
the end): benchmarks/direction_scaling.py -- runs grouped by method, nodes and mode, and the steps each took to
reach the 1-node run's final dev accuracy (what benchmarks/projection.py reads) -- and
benchmarks/method_comparison.py -- curves over seeds, the results file and the plot."""
from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from benchmarks import direction_scaling as ds  # noqa: E402
from projection import measured_steps  # noqa: E402


def _row(nodes: int, groups: int, accuracy_by_step: dict[int, float], steps: int = 300, ranks: int = 2) -> dict:
    """A run standing for `nodes` nodes, run on `ranks` ranks (the study's 2 simulated nodes, or one process)."""
    per_step = 2 * ds.BATCH * nodes   # example-forwards a step: every example at +eps and -eps
    curve = lambda f: [[t * per_step, f(a)] for t, a in sorted(accuracy_by_step.items())]  # noqa: E731
    final = accuracy_by_step[max(accuracy_by_step)]
    return {"state": "done", "name": f"n{nodes}g{groups}", "seed": 42, "learning_rate": 3e-3,
            "per_device_train_batch_size": ds.BATCH * nodes // ranks, "world_size": ranks,
            "direction_groups": groups, "steps": steps,
            "example_forwards": per_step * steps, "test_accuracy": final - 0.01, "test_majority_rate": 0.6,
            "dev_accuracy_after": final, "dev_loss_after": 1 - final, "mean_step_s": 1.0 * nodes,
            "dev_curve": curve(lambda a: a), "dev_loss_curve": curve(lambda a: 1 - a)}


def test_steps_to_the_one_node_accuracy_per_mode(monkeypatch):
    rows = [_row(1, 1, {0: 0.58, 150: 0.65, 300: 0.70}, ranks=1),   # runs of either launcher are grouped alike
            _row(4, 1, {0: 0.58, 150: 0.69, 300: 0.72}),            # data x 4: never quite there by step 150
            _row(4, 4, {0: 0.58, 100: 0.70, 200: 0.74, 300: 0.75})]  # directions x 4: there at step 100
    monkeypatch.setattr(ds, "_summary", lambda name: ({}, rows if name == "scaling_zo_act" else []))
    table = ds._table()
    assert sorted(table) == ["zo_act n=1 data", "zo_act n=4 data", "zo_act n=4 directions"]
    reach = {k: r["steps_to_1node_final"]["dev_accuracy"] for k, r in table.items()}
    assert reach == {"zo_act n=1 data": 300, "zo_act n=4 data": 300, "zo_act n=4 directions": 100}
    assert table["zo_act n=4 directions"]["steps_to_1node_final"]["dev_loss"] == 100
    for by in ("dev_loss", "dev_accuracy"):
        found = measured_steps({"runs": table}, by)
        assert found[("zo_act", "directions")] == {1: 300, 4: 100} and found[("zo_act", "data")] == {1: 300, 4: 300}


def _cluster_run(root, name: str, nodes: int, groups: int, accuracy: dict[int, float]) -> None:
    """A run folder as slurm/sweep.sh leaves it: config.yaml, metrics.jsonl, results.json (8 GPUs a node)."""
    import json

    import yaml

    out = root / name
    out.mkdir(parents=True)
    cfg = yaml.safe_load((REPO / "configs/rotten_tomatoes_zo_act.yaml").read_text())
    cfg.update(direction_groups=groups, per_device_train_batch_size=8, learning_rate=3e-3, seed=7)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"event": "eval", "step": t, "eval_accuracy": a,
                                                           "eval_loss": 1 - a}) + "\n" for t, a in accuracy.items()))
    final = accuracy[max(accuracy)]
    (out / "results.json").write_text(json.dumps({
        "steps": max(accuracy), "world_size": 8 * nodes, "dev_accuracy_after": final,
        "dev_loss_after": 1 - final, "test_accuracy": final, "test_majority_rate": 0.6, "mean_step_s": 1.0}))


def test_a_clusters_runs_report_like_the_local_study(tmp_path):
    """`direction_scaling.py report --runs runs/<SWEEP>`: slurm/sweep.sh's folders, N from their names (a node
    there holds 8 GPUs, not the local study's 8 examples), each mode by its direction groups."""
    import json

    runs = tmp_path / "runs/scaling"
    _cluster_run(runs, "nodes1", 1, 1, {0: 0.58, 100: 0.64, 200: 0.70})
    _cluster_run(runs, "nodes4", 4, 1, {0: 0.58, 100: 0.66, 200: 0.71})
    _cluster_run(runs, "nodes4-directions", 4, 4, {0: 0.58, 100: 0.70, 200: 0.74})
    (runs / "logs").mkdir()                                   # not a run: skipped
    ds.report(tmp_path / "d.json", tmp_path / "d.png", runs=str(runs))
    d = json.loads((tmp_path / "d.json").read_text())
    assert sorted(d["runs"]) == ["zo_act n=1 data", "zo_act n=4 data", "zo_act n=4 directions"]
    assert d["command"].endswith(f"--runs {runs}")
    assert d["runs"]["zo_act n=4 directions"]["steps_to_1node_final"]["dev_accuracy"] == 100
    assert d["runs"]["zo_act n=4 data"]["steps_to_1node_final"]["dev_accuracy"] == 200
    assert (tmp_path / "d.png").stat().st_size > 0


def test_the_method_comparison_report_from_its_final_sweeps(monkeypatch, tmp_path):
    import json

    from benchmarks import method_comparison as mc

    def rows(m, acc):
        return [{"state": "done", "name": f"s{seed}", "seed": seed, "learning_rate": 1e-3, "test_accuracy": acc + d,
                 "dev_accuracy_after": acc, "test_majority_rate": 0.604, "example_forwards": 12800, "wall_s": 600.0,
                 "mean_step_s": 1.5, "steps": 400,
                 # seed 42 resumed before the fix that keeps a resumed run's early test evaluations: no point at 0
                 "test_curve": [[0, 0.6]][seed == 42:] + [[6400, acc - 0.02 + d], [12800, acc + d]],
                 "dev_curve": [[0, 0.58], [12800, acc]],
                 "dev_loss_curve": [[0, 1.0], [6400, 0.6], [12800, 0.7]]} for seed, d in ((42, 0.0), (43, 0.02))]

    finals = {"final_zo_act": rows("zo_act", 0.70), "final_mezo": rows("mezo", 0.65)}
    monkeypatch.setattr(mc, "_summary", lambda name: ({}, finals.get(name, [])))
    mc.report(tmp_path / "c.json", tmp_path / "c.png")
    d = json.loads((tmp_path / "c.json").read_text())["methods"]
    assert sorted(d) == ["mezo", "zo_act"] and d["zo_act"]["seeds"] == [42, 43]
    # mean, min, max over the seeds at the points both have, matched by x, not by position
    curve = d["zo_act"]["test_curve"]
    assert [x[0] for x in curve] == [6400, 12800]
    assert [x[1:] for x in curve] == [pytest.approx([0.69, 0.68, 0.70]), pytest.approx([0.71, 0.70, 0.72])]
    # early stopping by dev loss: the step-6,400 evaluation (dev loss 0.6 < 0.7 at the end) picks that test accuracy
    assert [e["test_accuracy"] for e in d["zo_act"]["early_stopped"]] == pytest.approx([0.68, 0.70])
    assert d["zo_act"]["train_s"] == [600.0, 600.0]                     # mean step x steps
    assert d["zo_act"]["train_s_one_process"] == 600.0                  # the time column: a one-process run's
    assert (tmp_path / "c.png").stat().st_size > 0


def test_a_diverged_final_run_is_run_again_at_a_third_of_its_rate(monkeypatch, tmp_path):
    import json

    import yaml

    from benchmarks import method_comparison as mc

    def row(lr, loss_after, acc, seed=42, state="done"):
        return {"state": state, "name": f"lr{lr}", "seed": seed, "learning_rate": lr, "test_accuracy": acc,
                "dev_accuracy_after": acc, "dev_loss_after": loss_after, "test_majority_rate": 0.604,
                "example_forwards": 12800, "wall_s": 600.0, "mean_step_s": 1.5, "steps": 400,
                "test_curve": [[3200, 0.70], [12800, acc]], "dev_curve": [[3200, 0.66], [12800, acc]],
                # no dev_loss_before, as in a resumed run's row: the curve's step-0 point stands in
                "dev_loss_curve": [[0, 1.0], [3200, 0.66], [12800, loss_after]]}

    finals = {"final_mezo": ({"points": [{"method.directions": "rademacher", "learning_rate": 1e-4}]},
                             [row(1e-4, 1.94, 0.49)]),                      # ends above the untrained dev loss
              "final_lozo": ({"points": [{"learning_rate": 1e-4}]},       # stopped by non-finite losses
                             [{"state": "diverged", "name": "x", "seed": 42, "learning_rate": 1e-4}]),
              # only the first seed decides: a second seed that diverged later does not re-settle the method
              "final_agzo": ({"points": [{"learning_rate": 1e-4}]}, [row(1e-4, 0.6, 0.7), row(1e-4, 2.0, 0.5, 43)]),
              "final_zo_act": ({"points": [{"learning_rate": 3e-3}]}, [row(3e-3, 0.66, 0.74)])}
    monkeypatch.setattr(mc, "_summary", lambda name: finals.get(name, ({}, [])))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps/final_zo_act_stable.yaml").write_text("points: [{learning_rate: 1.0e-3}]\n")   # stale
    mc.settle()
    assert sorted(p.name for p in (tmp_path / "sweeps").iterdir()) == ["final_lozo_stable.yaml",
                                                                       "final_mezo_stable.yaml"]
    spec = yaml.safe_load((tmp_path / "sweeps/final_mezo_stable.yaml").read_text())
    assert spec["points"] == [{"method.directions": "rademacher", "learning_rate": 3.3e-05}]
    assert spec["output_dir"] == "runs/sweeps/final_mezo_stable" and spec["seeds"] == mc.SEEDS
    assert mc.tuned_setting("mezo") == spec["points"][0]      # what the scaling study then runs

    finals["final_mezo_stable"] = ({}, [row(3.3e-5, 0.62, 0.72)])
    mc.report(tmp_path / "c.json", tmp_path / "c.png")
    d = json.loads((tmp_path / "c.json").read_text())["methods"]
    assert d["mezo"]["test_accuracy"] == [0.72] and d["mezo"]["setting"] == {"learning_rate": 3.3e-05}
    assert d["mezo"]["diverged_first"][0]["early_stopped"]["test_accuracy"] == 0.70
    assert d["zo_act"]["diverged_first"] == [] and "lozo" not in d       # no finished run of lozo to report yet


def test_pinned_units_go_into_the_overrides_not_the_points_names(monkeypatch, tmp_path):
    """A probe spec that pins ZO-Act's basis scale: the settings it hands on keep their other method keys but not
    the pin (a point's name is its keys: the finished runs must keep theirs), and the final specs pin it again."""
    import yaml

    from benchmarks import method_comparison as mc

    spec = {"grid": {"learning_rate": [1e-3, 3e-3]},
            "overrides": {"method.basis_scale": "orthonormal", "method.target_modules": ["all-linear"]}}
    rows = [{"state": "done", "name": f"lr{lr}", "seed": 42, "learning_rate": lr, "dev_loss_after": loss, "dev_accuracy_after": 0.6}
            for lr, loss in ((1e-3, 0.7), (3e-3, 0.6))]
    keys, _, loss = mc.best_setting(spec, rows)
    assert keys == {"method.target_modules": ["all-linear"], "learning_rate": 3e-3} and loss == 0.6
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweeps").mkdir()
    for m in ("zo_act", "mezo"):
        mc._write_final(f"final_{m}", m, {"learning_rate": 1e-4}, "test")
    overrides = {m: yaml.safe_load((tmp_path / f"sweeps/final_{m}.yaml").read_text())["overrides"]
                 for m in ("zo_act", "mezo")}
    assert overrides["zo_act"]["method.basis_scale"] == "orthonormal" and "method.basis_scale" not in overrides["mezo"]
