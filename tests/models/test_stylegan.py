"""genext.models.stylegan against plain-PyTorch references written here for clarity, in float64:
the modulated conv as a per-sample loop of F.conv2d with explicitly modulated and demodulated
weights, a whole synthesis network built from that loop, the minibatch-stddev layer computed
group by group, the equalised-lr layers; and the properties: truncation (psi 0 gives w_avg, psi 1
leaves w), the w_avg EMA, style mixing (layers before the crossover see only the first latent),
noise modes, demodulation's unit output variance, shapes at 16x16 and 32x32 with 1 and 3 channels,
conditional G and D, gradcheck, R1 through the discriminator."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from genext.losses import LazyR1, nonsaturating_d_loss, nonsaturating_g_loss
from genext.models import StyleGAN2Discriminator, StyleGAN2Generator
from genext.models.stylegan import (
    EqualConv2d,
    EqualLinear,
    ModulatedConv2d,
    minibatch_stddev,
    mix_styles,
    modulated_conv2d,
)

D64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's
    barriers make every small op wait for a busy core (tens of times slower): one thread here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(size=16, channels=1, num_classes=0, **kw):
    """A tiny generator: 16 channels at 4x4, 8 at 8x8, 4 at 16x16, 2 at 32x32."""
    kw = {"mapping_layers": 2, "channel_base": 64, "channel_max": 16, **kw}
    return StyleGAN2Generator(8, 8, size, channels, num_classes, **kw)


def _disc(size=16, channels=1, num_classes=0, **kw):
    return StyleGAN2Discriminator(size, channels, num_classes, 64, 16, **kw)


def _with_noise_strengths(g):
    """Nonzero per-layer noise strengths (they start at 0), so the noise shows in the output."""
    with torch.no_grad():
        for layer in g.synthesis.layers():
            layer.noise_strength.fill_(0.3 + 0.1 * torch.rand(()).item())
    return g


# ---- references ---------------------------------------------------------------------------------


def ref_modulated_conv(x, weight, styles, demodulate, padding, eps=1e-8):
    """One sample at a time: scale the kernel's input channels by the sample's styles, then (when
    demodulating) divide each output channel's kernel by its L2 norm, then a plain conv."""
    outs = []
    for b in range(x.shape[0]):
        wb = weight * styles[b].view(1, -1, 1, 1)
        if demodulate:
            norms = torch.sqrt((wb**2).sum(dim=(1, 2, 3)) + eps)  # one per output channel
            wb = wb / norms.view(-1, 1, 1, 1)
        outs.append(F.conv2d(x[b : b + 1], wb, padding=padding))
    return torch.cat(outs)


def _lrelu_gain(t):
    return F.leaky_relu(t, 0.2) * math.sqrt(2)


def _affine(layer, w):
    a = layer.affine
    return w @ (a.weight * a.weight_gain).T + a.bias * a.bias_gain


def ref_synthesis(net, ws):
    """The synthesis network with const noise, from the reference conv: block by block, each layer
    taking the next w, the toRGB taking the w after the block's layers and adding its image to the
    bilinearly upsampled image so far."""
    b = ws.shape[0]
    i, x, img = 0, None, None
    for block in net.blocks:
        if x is None:
            x = block.const.unsqueeze(0).repeat(b, 1, 1, 1)
        for layer in block.convs:
            if layer.up:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            conv = layer.conv
            x = ref_modulated_conv(
                x, conv.weight * conv.weight_gain, _affine(conv, ws[:, i]), True, 1
            )
            x = x + layer.noise_strength * layer.noise_const
            x = _lrelu_gain(x + layer.bias.view(1, -1, 1, 1))
            i += 1
        rgb = block.torgb
        y = ref_modulated_conv(
            x, rgb.conv.weight * rgb.conv.weight_gain, _affine(rgb.conv, ws[:, i]), False, 0
        )
        y = y + rgb.bias.view(1, -1, 1, 1)
        if img is not None:
            y = y + F.interpolate(img, scale_factor=2.0, mode="bilinear", align_corners=False)
        img = y
    assert i == ws.shape[1] - 1  # every w used, the last by the final toRGB
    return img


def ref_minibatch_stddev(x, group_size, num_channels):
    """Sample n's group: the samples n' with n' = n mod (N / G); per channel part, the mean over
    channels and pixels of the group's biased standard deviation (sqrt(var + 1e-8))."""
    n, c, h, w = x.shape
    g = min(group_size, n)
    m = n // g
    part = c // num_channels
    extra = torch.zeros(n, num_channels, h, w, dtype=x.dtype)
    for i in range(n):
        members = x[[i % m + k * m for k in range(g)]]
        for f in range(num_channels):
            chunk = members[:, f * part : (f + 1) * part]
            var = ((chunk - chunk.mean(dim=0)) ** 2).mean(dim=0)
            extra[i, f] = torch.sqrt(var + 1e-8).mean()
    return torch.cat([x, extra], dim=1)


# ---- modulated convolution ----------------------------------------------------------------------


@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("k,padding", [(3, 1), (1, 0), (3, 0)])
def test_modulated_conv_matches_the_per_sample_loop(demodulate, k, padding):
    x = torch.randn(3, 5, 7, 6, dtype=D64, requires_grad=True)  # odd sizes, non-square
    weight = torch.randn(4, 5, k, k, dtype=D64, requires_grad=True)
    styles = (torch.rand(3, 5, dtype=D64) + 0.2).requires_grad_()
    out = modulated_conv2d(x, weight, styles, demodulate, padding)
    ref = ref_modulated_conv(x, weight, styles, demodulate, padding)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, weight, styles), go)
    ref_grads = torch.autograd.grad(ref, (x, weight, styles), go)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_modulated_conv_gradcheck():
    x = torch.randn(2, 3, 4, 4, dtype=D64, requires_grad=True)
    weight = torch.randn(2, 3, 3, 3, dtype=D64, requires_grad=True)
    styles = (torch.rand(2, 3, dtype=D64) + 0.5).requires_grad_()
    assert gradcheck(lambda *a: modulated_conv2d(*a, True, 1), (x, weight, styles))


def test_demodulation_gives_unit_output_variance():
    torch.manual_seed(5)
    conv = ModulatedConv2d(16, 8, 3, w_dim=6).double()
    with torch.no_grad():
        conv.affine.bias.mul_(3.0)  # styles around 3: without demodulation the variance is ~9x
    w = torch.randn(8, 6, dtype=D64)
    x = torch.randn(8, 16, 40, 40, dtype=D64)  # unit-variance iid input
    y = conv(x, w)[:, :, 1:-1, 1:-1]  # interior: every output sums over a full 3x3 window
    # 8 x 8 (sample, channel) pairs of 1444 pixels: the mean square is within a few % of 1
    second_moment = y.square().mean(dim=(2, 3))
    assert abs(second_moment.mean().item() - 1) < 0.05
    assert (second_moment - 1).abs().max().item() < 0.2
    conv.demodulate = False
    undemod = conv(x, w)[:, :, 1:-1, 1:-1].square().mean().item()
    assert abs(undemod - 1) > 0.5


# ---- equalised learning rate -------------------------------------------------------------------


def test_equal_linear_and_conv_against_plain_layers():
    torch.manual_seed(2)
    lin = EqualLinear(300, 5, bias_init=0.7, lr_multiplier=0.01, activation="lrelu").double()
    # stored weight N(0, 1 / lr^2): the runtime scale lr / sqrt(in) gives He's init
    assert abs(lin.weight.std().item() * 0.01 - 1) < 0.05
    x = torch.randn(4, 300, dtype=D64)
    eff_w = lin.weight * 0.01 / math.sqrt(300)
    torch.testing.assert_close(lin.bias * 0.01, torch.full((5,), 0.7, dtype=D64))
    ref = _lrelu_gain(F.linear(x, eff_w, lin.bias * 0.01))
    torch.testing.assert_close(lin(x), ref, rtol=1e-13, atol=1e-13)
    # the stored weight's gradient is the effective weight's times lr / sqrt(in)
    (g_stored,) = torch.autograd.grad(lin(x).sum(), lin.weight)
    w_eff = eff_w.detach().requires_grad_()
    (g_eff,) = torch.autograd.grad(_lrelu_gain(F.linear(x, w_eff, lin.bias * 0.01)).sum(), w_eff)
    torch.testing.assert_close(g_stored, g_eff * 0.01 / math.sqrt(300), rtol=1e-12, atol=0)

    conv = EqualConv2d(3, 4, 3, activation="lrelu", down=True).double()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 3, 8, 8, dtype=D64)
    ref = F.conv2d(x, conv.weight / math.sqrt(27), padding=1)
    ref = _lrelu_gain(F.avg_pool2d(ref, 2) + conv.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(conv(x), ref, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="activation"):
        EqualLinear(2, 2, activation="relu")


# ---- mapping, truncation, w_avg ------------------------------------------------------------------


def test_mapping_pixel_norm_truncation_and_w_avg():
    g = _gen().double()
    mapping = g.mapping
    z = torch.randn(5, 8, dtype=D64)
    mapping.eval()
    ws = mapping(z)
    assert ws.shape == (5, g.num_ws, 8)
    assert torch.equal(ws[:, 0], ws[:, -1])  # one w broadcast to every layer
    # pixel norm of z: scale-free up to its eps (1e-8 next to a mean square near 1)
    torch.testing.assert_close(mapping(3.5 * z), ws, rtol=1e-7, atol=1e-7)
    with torch.no_grad():
        mapping.w_avg.normal_()
    w_avg = mapping.w_avg.clone()
    # psi = 0: exactly w_avg everywhere; psi = 1: w untouched (bit for bit)
    assert torch.equal(mapping(z, truncation_psi=0.0), w_avg.expand(5, g.num_ws, 8))
    assert torch.equal(mapping(z, truncation_psi=1.0), ws)
    # psi = 0.5 on the first 2 layers only
    half = mapping(z, truncation_psi=0.5, truncation_cutoff=2)
    torch.testing.assert_close(half[:, :2], w_avg + 0.5 * (ws[:, :2] - w_avg), rtol=1e-14, atol=0)
    assert torch.equal(half[:, 2:], ws[:, 2:])
    assert torch.equal(mapping.w_avg, w_avg)  # eval mode: no tracking
    # training mode: w_avg <- beta w_avg + (1 - beta) mean(w)
    mapping.train()
    mapping(z)
    expected = 0.995 * w_avg + 0.005 * ws[:, 0].mean(dim=0)
    torch.testing.assert_close(mapping.w_avg, expected, rtol=1e-13, atol=1e-15)
    before = mapping.w_avg.clone()
    mapping(z, update_w_avg=False)
    assert torch.equal(mapping.w_avg, before)


def test_truncation_through_the_generator():
    g = _gen().double().eval()
    with torch.no_grad():
        g.mapping.w_avg.normal_()
    z = torch.randn(3, 8, dtype=D64)
    avg_img = g.synthesis(g.mapping.w_avg.expand(1, g.num_ws, 8), noise_mode="const")
    out = g(z, truncation_psi=0.0, noise_mode="const")  # every sample becomes the average image
    torch.testing.assert_close(out, avg_img.expand_as(out), rtol=1e-12, atol=1e-12)


# ---- synthesis, noise, style mixing ----------------------------------------------------------


@pytest.mark.parametrize("size,channels", [(16, 1), (32, 3)])
def test_synthesis_matches_the_reference_network(size, channels):
    g = _with_noise_strengths(_gen(size, channels)).double()
    ws = torch.randn(2, g.num_ws, 8, dtype=D64)  # a different w per layer
    out = g.synthesis(ws, noise_mode="const")
    torch.testing.assert_close(out, ref_synthesis(g.synthesis, ws), rtol=1e-12, atol=1e-12)


def test_noise_modes():
    g = _with_noise_strengths(_gen()).eval()
    z = torch.randn(2, 8)
    const = g(z, noise_mode="const")
    assert torch.equal(const, g(z, noise_mode="const"))  # deterministic
    r1, r2 = g(z, noise_mode="random"), g(z, noise_mode="random")
    assert not torch.allclose(r1, r2, atol=1e-4) and not torch.allclose(r1, const, atol=1e-4)
    none = g(z, noise_mode="none")
    assert torch.equal(none, g(z, noise_mode="none")) and not torch.allclose(none, const, atol=1e-4)
    with torch.no_grad():
        for layer in g.synthesis.layers():
            layer.noise_strength.zero_()
    torch.testing.assert_close(g(z, noise_mode="const"), none, rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise_mode"):
        g(z, noise_mode="fixed")
    # the strengths learn: random noise gives them gradients
    g.train()
    g(z).sum().backward()
    assert all(layer.noise_strength.grad != 0 for layer in g.synthesis.layers())


def _layer_outputs(g, ws):
    outs = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: outs.append(o))
        for layer in g.synthesis.layers()
    ]
    img = g.synthesis(ws, noise_mode="const")
    for h in hooks:
        h.remove()
    return outs, img


@pytest.mark.parametrize("crossover", [1, 3, 5])
def test_style_mixing_layers_before_the_crossover_see_only_the_first_latent(crossover):
    g = _with_noise_strengths(_gen()).double().eval()
    z1 = torch.randn(2, 8, dtype=D64)
    z2 = torch.randn(2, 8, dtype=D64, requires_grad=True)
    mixed = mix_styles(g.mapping(z1), g.mapping(z2), crossover)
    outs, img = _layer_outputs(g, mixed)
    plain, _ = _layer_outputs(g, g.mapping(z1))
    assert len(outs) == g.num_ws - 1  # one w per layer, plus the final toRGB's
    for i, (o, p) in enumerate(zip(outs, plain)):
        (grad,) = torch.autograd.grad(o.sum(), z2, retain_graph=True, allow_unused=True)
        if i < crossover:
            assert torch.equal(o, p) and (grad is None or not grad.any()), i
        else:
            assert grad is not None and grad.abs().sum() > 0, i
    # perturbing the second latent changes the image (its layers come after the crossover)
    other = mix_styles(g.mapping(z1), g.mapping(z2 + 1.0), crossover)
    assert not torch.allclose(g.synthesis(other, noise_mode="const"), img)


def test_training_forward_mixes_with_the_given_probability():
    g = _gen(style_mixing_prob=1.0).double().train()
    z = torch.randn(3, 8, dtype=D64)
    torch.manual_seed(11)
    out = g(z, noise_mode="const")
    # replay the generator's draws: crossover in [1, num_ws), the coin, the second latent
    torch.manual_seed(11)
    crossover = int(torch.randint(1, g.num_ws, ()).item())
    torch.rand(())
    z2 = torch.randn_like(z)
    expected = g.synthesis(mix_styles(g.mapping(z), g.mapping(z2), crossover), "const")
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, g.synthesis(g.mapping(z), "const"))
    g.style_mixing_prob = 0.0
    torch.testing.assert_close(
        g(z, noise_mode="const"), g.synthesis(g.mapping(z), "const"), rtol=0, atol=0
    )
    g.style_mixing_prob = 1.0
    g.eval()  # never mixes outside training
    torch.testing.assert_close(
        g(z, noise_mode="const"), g.synthesis(g.mapping(z), "const"), rtol=0, atol=0
    )


# ---- shapes, conditioning, discriminator --------------------------------------------------------


@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("size,channels", [(16, 1), (16, 3), (32, 1), (32, 3)])
def test_shapes(size, channels, num_classes):
    g, d = _gen(size, channels, num_classes), _disc(size, channels, num_classes)
    c = torch.tensor([0, 2, 1, 2]) if num_classes else None
    img = g(torch.randn(4, 8), c)
    assert img.shape == (4, channels, size, size) and torch.isfinite(img).all()
    assert g.num_ws == 2 * int(math.log2(size)) - 2
    logits = d(img, c)
    assert logits.shape == (4,) and torch.isfinite(logits).all()


def test_conditional_generator_and_discriminator_use_the_label():
    g, d = _gen(num_classes=3).eval(), _disc(num_classes=3)
    z = torch.randn(1, 8).expand(3, 8)
    imgs = g(z, torch.arange(3), noise_mode="const")
    assert not torch.allclose(imgs[0], imgs[1]) and not torch.allclose(imgs[1], imgs[2])
    with pytest.raises(ValueError, match="labels"):
        g(z)
    x = torch.randn(4, 1, 16, 16)
    c = torch.tensor([0, 1, 2, 1])
    # projection: the logit is linear in the label embedding's weights
    base = d(x, c)
    with torch.no_grad():
        d.embed.weight.mul_(2.0)
        d.embed.bias.mul_(2.0)
    torch.testing.assert_close(d(x, c), 2 * base, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(d(x, torch.tensor([2, 2, 0, 0])), d(x, c))
    with pytest.raises(ValueError, match="labels"):
        d(x)


@pytest.mark.parametrize("n,group,channels", [(8, 4, 2), (8, 2, 1), (3, 4, 1), (6, 6, 3)])
def test_minibatch_stddev_by_hand(n, group, channels):
    x = torch.randn(n, 6, 3, 5, dtype=D64)
    out = minibatch_stddev(x, group, channels)
    assert out.shape == (n, 6 + channels, 3, 5)
    torch.testing.assert_close(out, ref_minibatch_stddev(x, group, channels), rtol=1e-13, atol=0)


def test_minibatch_stddev_bad_sizes_and_grouping_inside_the_discriminator():
    with pytest.raises(ValueError, match="group size"):
        minibatch_stddev(torch.randn(6, 4, 2, 2), 4, 1)
    with pytest.raises(ValueError, match="channels"):
        minibatch_stddev(torch.randn(4, 5, 2, 2), 4, 2)
    # batch 8, groups of 4: samples {0, 2, 4, 6} and {1, 3, 5, 7}; D's logit for sample 0
    # changes with sample 2 (its group) and not with sample 1 (the other group)
    d = _disc().double()
    x = torch.randn(8, 1, 16, 16, dtype=D64)
    base = d(x)
    for other, coupled in ((2, True), (1, False)):
        x2 = x.clone()
        x2[other] += 1.0
        out = d(x2)
        assert torch.equal(out[0], base[0]) != coupled


def test_generator_and_discriminator_gradcheck():
    g, d = _gen().double().eval(), _disc().double()
    z = torch.randn(2, 8, dtype=D64, requires_grad=True)
    assert gradcheck(lambda z: g(z, noise_mode="const"), (z,), fast_mode=True)
    x = torch.randn(4, 1, 16, 16, dtype=D64, requires_grad=True)
    assert gradcheck(d, (x,), fast_mode=True)


def test_a_training_step_with_lazy_r1():
    # the losses and lazy R1 from genext.losses run through both networks (D twice
    # differentiable: R1's backward reaches D's weights)
    g, d = _gen(num_classes=3), _disc(num_classes=3)
    z, c = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    real = torch.randn(4, 1, 16, 16)
    fake = g(z, c)
    r1 = LazyR1(gamma=1.0, interval=4)(0, d, real, c)
    r1.backward()  # R1 alone: its own backward must reach D's weights
    assert r1.item() > 0 and d.fromrgb.weight.grad.abs().sum() > 0
    # and against a finite difference of the penalty in one weight, in float64
    d64 = copy.deepcopy(d).double()
    real64 = real.double()

    def penalty():
        return LazyR1(gamma=1.0, interval=4)(0, d64, real64, c)

    d64.zero_grad()
    penalty().backward()
    w = d64.fromrgb.weight
    analytic = w.grad.flatten()[0].item()
    h = 1e-6
    values = []
    for step in (h, -2 * h, h):
        with torch.no_grad():
            w.view(-1)[0] += step
        values.append(penalty().item())
    up, down = values[0], values[1]
    assert abs(analytic - (up - down) / (2 * h)) <= 1e-5 * max(1.0, abs(analytic))
    d.zero_grad()
    loss_d = nonsaturating_d_loss(d(real, c), d(fake.detach(), c))
    loss_d.backward()
    nonsaturating_g_loss(d(fake, c)).backward()
    assert all(p.grad is not None for p in g.synthesis.parameters())


def test_w_avg_stays_float32_and_tracks_under_autocast_and_in_bfloat16():
    g = _gen().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g(torch.randn(4, 8))
    assert g.mapping.w_avg.dtype == torch.float32 and g.mapping.w_avg.abs().sum() > 0
    g = g.to(torch.bfloat16)
    assert g.mapping.w_avg.dtype == torch.float32
    # the average moves by 0.005 x the distance per step: in bf16 those steps would round away
    before = g.mapping.w_avg.clone()
    for _ in range(20):
        g.mapping(torch.randn(16, 8, dtype=torch.bfloat16) + 3)
    assert not torch.equal(g.mapping.w_avg, before)
