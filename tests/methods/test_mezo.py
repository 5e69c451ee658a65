"""MeZO perturbs the gathered weights around each module's forward and never writes θ: a forward under the
perturbation equals the plain module with θ + εZ written in (tied weights included), and θ is untouched after."""
import torch
from torch import nn

from dszo.config import TrainConfig, method_config_class
from dszo.directions import gaussian, tensor_key
from dszo.methods import get_method
from methods.local_runtime import LocalRuntime


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False), nn.Linear(6, 3)
        self.b.weight = self.a.weight   # one parameter, two modules

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _mezo(model):
    """MeZO (SGD) attached to `model` and set up in one process."""
    cfg = TrainConfig(optim="sgd")
    cfg.method = method_config_class("mezo")()
    m = get_method("mezo")(cfg, run_seed=3)
    m.attach(model)
    m.setup(LocalRuntime(model), [])
    return m


def test_forward_under_perturbation_equals_written_weights_and_theta_is_untouched():
    torch.manual_seed(0)
    model, x = Tied(), torch.randn(4, 6)
    m = _mezo(model)
    assert set(m.trainable()) == {"a.weight", "c.weight", "c.bias"}   # the tied weight once
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    for sign in (+1.0, -1.0):
        m.perturbation.set(seed=11, eps=1e-2, sign=sign)
        with torch.no_grad():
            got = model(x)
        m.perturbation.off()
        assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters())   # θ never written
        reference = Tied()
        with torch.no_grad():
            for n, p in reference.named_parameters():
                z = gaussian(11, tensor_key(n), 0, p.numel()).view_as(p)
                p.copy_(torch.add(theta[n], z, alpha=sign * 1e-2))
            assert torch.equal(got, reference(x))   # the same operations on the same values


class ReadsAWeightDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6, bias=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.a.weight)   # self.a never runs: its hooks never see the weight


class _Runtime(LocalRuntime):
    def loss_sums(self, batch, doubled):
        with torch.no_grad():
            return float(self.model(batch).pow(2).sum()), 0.0, batch.shape[0]


def test_a_weight_used_outside_its_module_is_refused_not_left_unperturbed():
    import pytest

    from dszo.config import ConfigError

    model = ReadsAWeightDirectly()
    cfg = TrainConfig(optim="sgd")
    cfg.method = method_config_class("mezo")()
    m = get_method("mezo")(cfg, run_seed=3)
    m.attach(model)
    runtime = _Runtime(model)
    m.setup(runtime, [])
    with pytest.raises(ConfigError, match="not used there .*a.weight.*leave them out of method.trainable"):
        m.losses(0, 5, torch.randn(2, 6), runtime)


class ReturnsItsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return self.table[: x.shape[0]]   # a view of the (perturbed) weight, alive after this module's forward


class TwoTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.p, self.q = ReturnsItsWeight(), ReturnsItsWeight()

    def forward(self, x):
        return self.p(x) + self.q(x)   # p's output is read after q's forward has run


def test_perturbed_buffers_are_reused_between_modules_but_never_one_that_an_output_still_views():
    torch.manual_seed(1)
    model, x = TwoTables(), torch.randn(3, 6)
    m = _mezo(model)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = sum(torch.add(theta[n], gaussian(5, tensor_key(n), 0, 24).view(4, 6), alpha=1e-2)[:3] for n in theta)
    for _ in range(2):   # the second forward finds the first's buffers
        m.perturbation.set(seed=5, eps=1e-2, sign=1.0)
        with torch.no_grad():
            got = model(x)
        m.perturbation.off()
        assert torch.equal(got, want)
    for table in (model.p, model.q):   # outputs that are not the weight: one buffer serves both, every forward
        table.forward = lambda x, t=table: t.table.sum() + x
    m.perturbation.set(seed=5, eps=1e-2, sign=1.0)
    with torch.no_grad():
        model(x)
        model(x)
    m.perturbation.off()
    assert len(m.spare[(torch.Size([4, 6]), torch.float32, torch.device("cpu"))]) == 1
