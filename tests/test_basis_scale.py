"""ZO-Act's output_rms bases from a real 2-rank ZeRO-3 run equal the single-process reference's (tests/reference.py):
the calibration's sums of ‖W h‖² are all-reduced with the sketches, so each rank scales by the whole data's."""
import pytest
import torch

from compare import basis_bound
from conftest import launch, load_adapter, read_metrics, tiny_config
from tolerances import TINY_FORWARD_REL


@pytest.mark.multirank
@pytest.mark.slow
def test_output_rms_bases_of_a_two_rank_run_equal_the_reference(tiny_model, tiny_data, tmp_path):
    from reference import ReferenceZOAct

    cfg = tiny_config(tiny_model, tiny_data, tmp_path / "run", max_steps=1, **{"method.basis_scale": "output_rms"})
    launch(cfg, 2)
    m = cfg["method"]
    ref = ReferenceZOAct(tiny_model, cfg["data"], rank=m["rank"], seed=cfg["seed"], eps=m["zo_eps"],
                         lr=cfg["learning_rate"])
    expected = ref.compute_bases(m["num_calibration"], scale="output_rms")
    spectrum = {"gap_rel": ref.gap_rel, "trace_ratio": ref.trace_ratio}
    trained = load_adapter(tmp_path / "run")
    for name, v in expected.items():
        scale = v.double().norm(dim=0)   # each column: its unit eigenvector times sqrt(output ms / λ ms)
        # the direction within its Davis–Kahan bound; the scale's λ and output mean square each within
        # 2·forward_rel·trace_ratio and 2·forward_rel (relative), halved by the square root
        rel = basis_bound(spectrum, name) + TINY_FORWARD_REL * (1 + ref.trace_ratio[name])
        torch.testing.assert_close(trained[f"{name}.zo_V"].double(), v.double(), rtol=0,
                                   atol=float(scale.max()) * rel, msg=lambda s: f"{name}: {s}")
    assert any(float(v.norm(dim=0).sub(1).abs().max()) > 0.1 for v in expected.values())   # not orthonormal
    setup = next(r for r in read_metrics(tmp_path / "run") if r.get("event") == "setup")
    assert setup["basis_projection_to_output_rms"]["basis_scale"] == "output_rms"
