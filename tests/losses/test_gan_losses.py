"""genext.losses' GAN losses against their formulas in float64 (values and gradients), the R1
penalty on discriminators whose input gradient is known in closed form, the lazy-R1 schedule and
scaling (one D forward and one autograd.grad per regularisation step), and the EMA of weights
against a hand-computed average (also through a DDP wrapper)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from genext.losses import (
    EMA,
    LazyR1,
    hinge_d_loss,
    hinge_g_loss,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
    r1_penalty,
)

# logits spanning the saturated ranges of softplus and the hinge kinks' both sides
REAL = torch.tensor([-30.0, -2.5, -0.3, 0.0, 0.7, 0.999, 1.5, 40.0], dtype=torch.float64)
FAKE = torch.tensor([-45.0, -1.2, -1.0001, -0.2, 0.4, 2.0, 3.3], dtype=torch.float64)


def _log_sigmoid_by_hand(t: float) -> float:
    # log(1 / (1 + exp(-t))), the stable branch for each sign
    return -math.log1p(math.exp(-t)) if t >= 0 else t - math.log1p(math.exp(t))


def test_nonsaturating_losses_match_their_formulas_in_float64():
    real, fake = REAL.clone().requires_grad_(), FAKE.clone().requires_grad_()
    d = nonsaturating_d_loss(real, fake)
    expected_d = -sum(_log_sigmoid_by_hand(t) for t in REAL.tolist()) / len(REAL) - sum(
        _log_sigmoid_by_hand(-t) for t in FAKE.tolist()
    ) / len(FAKE)
    assert d.dtype == torch.float64
    assert abs(d.item() - expected_d) < 1e-12 * max(1.0, abs(expected_d))
    d.backward()
    # d/dt softplus(-t) = -sigmoid(-t); d/dt softplus(t) = sigmoid(t); each over its batch size
    torch.testing.assert_close(real.grad, -torch.sigmoid(-REAL) / len(REAL), rtol=1e-13, atol=0)
    torch.testing.assert_close(fake.grad, torch.sigmoid(FAKE) / len(FAKE), rtol=1e-13, atol=0)
    # D is pushed to raise real logits and lower fake ones
    assert (real.grad < 0).all() and (fake.grad > 0).all()

    fake = FAKE.clone().requires_grad_()
    g = nonsaturating_g_loss(fake)
    expected_g = -sum(_log_sigmoid_by_hand(t) for t in FAKE.tolist()) / len(FAKE)
    assert abs(g.item() - expected_g) < 1e-12 * abs(expected_g)
    g.backward()
    torch.testing.assert_close(fake.grad, -torch.sigmoid(-FAKE) / len(FAKE), rtol=1e-13, atol=0)
    # non-saturating: a confidently rejected fake (logit -45) still gets a gradient near -1/B
    assert fake.grad[0].item() == pytest.approx(-1 / len(FAKE), rel=1e-12)


def test_hinge_losses_match_their_formulas_in_float64():
    real, fake = REAL.clone().requires_grad_(), FAKE.clone().requires_grad_()
    d = hinge_d_loss(real, fake)
    expected = sum(max(0.0, 1 - t) for t in REAL.tolist()) / len(REAL) + sum(
        max(0.0, 1 + t) for t in FAKE.tolist()
    ) / len(FAKE)
    assert abs(d.item() - expected) < 1e-13
    d.backward()
    # gradient -1/B where a real logit is below the margin 1, else 0; +1/B where a fake is above -1
    torch.testing.assert_close(real.grad, -(REAL < 1).double() / len(REAL), rtol=0, atol=0)
    torch.testing.assert_close(fake.grad, (FAKE > -1).double() / len(FAKE), rtol=0, atol=0)

    fake = FAKE.clone().requires_grad_()
    g = hinge_g_loss(fake)
    assert abs(g.item() + FAKE.mean().item()) < 1e-14
    g.backward()
    torch.testing.assert_close(fake.grad, torch.full_like(FAKE, -1 / len(FAKE)), rtol=0, atol=0)


def test_losses_take_any_logit_shape():
    real, fake = REAL[:6].reshape(6, 1), FAKE[:6].reshape(2, 3)
    torch.testing.assert_close(
        nonsaturating_d_loss(real, fake), nonsaturating_d_loss(real.flatten(), fake.flatten())
    )
    torch.testing.assert_close(
        hinge_d_loss(real, fake), hinge_d_loss(real.flatten(), fake.flatten())
    )


class _Linear(nn.Module):
    """D(x) = <w, x> + b, per sample: its input gradient is w, so R1 = ||w||^2."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1) + self.b


def test_r1_of_a_linear_discriminator_is_the_squared_weight_norm_and_trains_w():
    d = _Linear((2, 3, 4))
    x = torch.randn(5, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    r1 = r1_penalty(d(x), x)
    expected = d.w.detach().square().sum()
    assert abs(r1.item() - expected.item()) < 1e-12 * expected.item()
    # create_graph: the penalty backpropagates into D's weights: d||w||^2/dw = 2w
    r1.backward()
    torch.testing.assert_close(d.w.grad, 2 * d.w.detach(), rtol=1e-13, atol=0)
    assert d.b.grad is None or d.b.grad.item() == 0.0


def test_r1_of_a_quadratic_discriminator_against_the_analytic_gradient():
    # D(x) = sum(a * x^2) per sample: gradient 2 a x, so R1 = mean_b ||2 a x_b||^2
    a = torch.randn(3, 4, 4, dtype=torch.float64)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    r1 = r1_penalty((a * x.square()).flatten(1).sum(1).unsqueeze(1), x)  # (B, 1) logits
    expected = (2 * a * x.detach()).square().flatten(1).sum(1).mean()
    assert abs(r1.item() - expected.item()) < 1e-12 * expected.item()


def test_r1_against_finite_differences_of_a_small_network():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 5 * 5, 1)
    ).double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    r1 = r1_penalty(net(xr).squeeze(1), xr)
    # central differences of each sample's logit along every input coordinate
    eps = 1e-6
    flat = x.flatten(1)
    total = 0.0
    for b in range(x.shape[0]):
        g2 = 0.0
        for i in range(flat.shape[1]):
            e = torch.zeros_like(flat[b])
            e[i] = eps
            up = net((flat[b] + e).view(1, *x.shape[1:])).item()
            dn = net((flat[b] - e).view(1, *x.shape[1:])).item()
            g2 += ((up - dn) / (2 * eps)) ** 2
        total += g2
    assert abs(r1.item() - total / x.shape[0]) < 1e-6 * total / x.shape[0]


def test_r1_rejects_images_without_grad_and_mismatched_logits():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="requires? grad"):
        r1_penalty(x.sum(1), x)
    xr = x.clone().requires_grad_()
    with pytest.raises(ValueError, match="one logit per sample"):
        r1_penalty(xr, xr)


class _Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.args = inner, 0, []

    def forward(self, x, *args):
        self.calls += 1
        self.args.append(args)
        assert x.requires_grad
        return self.inner(x)


def test_lazy_r1_runs_every_k_steps_and_scales_by_k(monkeypatch):
    grads = []
    real_grad = torch.autograd.grad

    def counting_grad(*a, **k):
        grads.append(k.get("create_graph"))
        return real_grad(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    d = _Counting(_Linear((3, 4)))
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    lazy = LazyR1(gamma=3.0, interval=4)
    w2 = d.inner.w.detach().square().sum().item()
    results = [lazy(step, d, x, "label") for step in range(9)]
    for step, r in enumerate(results):
        if step % 4 == 0:
            # gamma / 2 * k * ||w||^2
            assert r is not None and abs(r.item() - 3.0 / 2 * 4 * w2) < 1e-12 * w2 * 6
        else:
            assert r is None
    # steps 0, 4, 8: one D forward each (with the extra argument) and one gradient each
    assert d.calls == 3 and d.args == [("label",)] * 3
    assert grads == [True, True, True]
    assert not x.requires_grad  # the caller's tensor is left alone
    # the scaled penalty trains D: gradient gamma / 2 * k * 2w
    results[0].backward()
    torch.testing.assert_close(d.inner.w.grad, 3.0 * 4 * d.inner.w.detach(), rtol=1e-13, atol=0)


def test_lazy_r1_interval_one_is_plain_r1_and_bad_arguments_raise():
    d = _Linear((5,))
    x = torch.randn(3, 5, dtype=torch.float64)
    r = LazyR1(gamma=2.0, interval=1)(7, d, x)
    assert abs(r.item() - d.w.detach().square().sum().item()) < 1e-12
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="interval"):
            LazyR1(interval=bad)
    with pytest.raises(ValueError, match="gamma"):
        LazyR1(gamma=-1.0)


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.bn = nn.BatchNorm1d(2).double()

    def forward(self, x):
        return self.bn(self.lin(x))


def _ema_by_hand(model_steps, decay):
    """The EMA written out: start from the first weights, then ema <- decay ema + (1-decay) p."""
    ema = {k: v.clone() for k, v in model_steps[0].items()}
    for state in model_steps[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * state[k] for k in ema}
    return ema


def _train_steps(model, ema, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    inner = getattr(model, "module", model)  # the keys without DDP's "module." prefix
    states = [{k: p.detach().clone() for k, p in inner.named_parameters()}]
    for _ in range(steps):
        opt.zero_grad()
        model.train()
        model(torch.randn(8, 3, dtype=torch.float64)).square().sum().backward()
        opt.step()
        ema.update()
        states.append({k: p.detach().clone() for k, p in inner.named_parameters()})
    return states


def test_ema_follows_the_hand_computed_average_and_copies_buffers():
    model = _Small()
    ema = EMA(model, decay=0.9)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training
    states = _train_steps(model, ema, 4)
    expected = _ema_by_hand(states, 0.9)
    for k, p in ema.module.named_parameters():
        torch.testing.assert_close(p, expected[k], rtol=1e-14, atol=1e-15)
        assert not torch.equal(p, dict(model.named_parameters())[k])  # an average, not a copy
    for k, b in ema.module.named_buffers():
        assert torch.equal(b, dict(model.named_buffers())[k])  # BN statistics copied
    assert int(ema.module.bn.num_batches_tracked) == 4
    # state_dict: the model's keys, loads into a fresh model; load_state_dict round-trips
    fresh = _Small()
    fresh.load_state_dict(ema.state_dict(), strict=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(fresh.eval()(x), ema(x), rtol=0, atol=0)
    other = EMA(_Small(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other(x), ema(x), rtol=0, atol=0)


def test_ema_decay_edges_and_bad_decay():
    model = _Small()
    frozen, copying = EMA(model, decay=1.0), EMA(model, decay=0.0)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    _train_steps(model, copying, 2)
    frozen.update()
    for k, p in frozen.module.named_parameters():
        assert torch.equal(p, start[k])
    for k, p in copying.module.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[k])
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ema_unwraps_ddp():
    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = _Small()
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = EMA(ddp, decay=0.75)
        assert set(ema.state_dict()) == set(model.state_dict())  # no "module." prefix
        states = _train_steps(ddp, ema, 3)
        expected = _ema_by_hand(states, 0.75)
        for k, p in ema.module.named_parameters():
            torch.testing.assert_close(p, expected[k], rtol=1e-14, atol=1e-15)
    finally:
        dist.destroy_process_group()
