"""genext.models.gan: DCGAN against a layer list built here from the PyTorch examples' layer table
(key-for-key strict loading, equal outputs), weights_init's statistics; the conditional ResNet GAN:
shapes at 1x8x8, 1x16x16 and 3x32x32 with and without attention, equality with a plain-PyTorch
copy (nn.GroupNorm + SiLU, torch's SDPA) in float64 and float32, gradcheck, class conditioning and
the projection formula, the profiler showing genext's kernels ran instead of ATen's GroupNorm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from torch.nn.utils import parametrize
from torch.profiler import ProfilerActivity, profile

import genext.models.gan as gan_module
from genext.losses import r1_penalty
from genext.models import (
    ConditionalGenerator,
    DCGANDiscriminator,
    DCGANGenerator,
    ProjectionDiscriminator,
    weights_init,
)
from genext.nn import GroupNormSiLU

from conftest import rel_err


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's
    barriers make every small op wait for a busy core (tens of times slower): one thread here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- DCGAN ------------------------------------------------------------------------------------

# The examples' layer table (dcgan/main.py), index by index: (kind, in, out, kernel, stride, pad)
# for (transposed) convs without bias, ("bn", channels), ("relu",), ("lrelu",), ("tanh",),
# ("sigmoid",). Channel counts in units of ngf / ndf; "nz", "nc" and "one" are absolute.
G_TABLE = [
    ("convT", "nz", 8, 4, 1, 0),
    ("bn", 8),
    ("relu",),
    ("convT", 8, 4, 4, 2, 1),
    ("bn", 4),
    ("relu",),
    ("convT", 4, 2, 4, 2, 1),
    ("bn", 2),
    ("relu",),
    ("convT", 2, 1, 4, 2, 1),
    ("bn", 1),
    ("relu",),
    ("convT", 1, "nc", 4, 2, 1),
    ("tanh",),
]
D_TABLE = [
    ("conv", "nc", 1, 4, 2, 1),
    ("lrelu",),
    ("conv", 1, 2, 4, 2, 1),
    ("bn", 2),
    ("lrelu",),
    ("conv", 2, 4, 4, 2, 1),
    ("bn", 4),
    ("lrelu",),
    ("conv", 4, 8, 4, 2, 1),
    ("bn", 8),
    ("lrelu",),
    ("conv", 8, "one", 4, 1, 0),  # one output channel, not ndf
    ("sigmoid",),
]


def _examples_model(table, width, nz, nc):
    """A module with `.main` built from a layer table, as the examples' script lays it out."""

    def ch(v):
        return {"nz": nz, "nc": nc, "one": 1}[v] if isinstance(v, str) else v * width

    layers = []
    for row in table:
        kind = row[0]
        if kind in ("conv", "convT"):
            cls = nn.Conv2d if kind == "conv" else nn.ConvTranspose2d
            layers.append(cls(ch(row[1]), ch(row[2]), row[3], row[4], row[5], bias=False))
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(ch(row[1])))
        else:
            layers.append(
                {
                    "relu": nn.ReLU(True),
                    "lrelu": nn.LeakyReLU(0.2, inplace=True),
                    "tanh": nn.Tanh(),
                    "sigmoid": nn.Sigmoid(),
                }[kind]
            )
    holder = nn.Module()
    holder.main = nn.Sequential(*layers)
    return holder


def _perturb(model):
    """Every tensor (BN running statistics too) off its trivial initial value; spectral norm's
    power-iteration vectors (buffers _u, _v) are left unit vectors."""
    with torch.no_grad():
        buffers = [b for name, b in model.named_buffers() if not name.endswith(("_u", "_v"))]
        for t in list(model.parameters()) + buffers:
            if t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
                if t.dim() == 1:
                    t.abs_()  # running_var must stay positive


@pytest.mark.parametrize("train", [False, True])
def test_dcgan_loads_the_examples_checkpoints_and_matches_them(train):
    nz, ngf, ndf, nc = 7, 3, 2, 3
    ref_g, ref_d = _examples_model(G_TABLE, ngf, nz, nc), _examples_model(D_TABLE, ndf, nz, nc)
    for m in (ref_g, ref_d):
        m.apply(weights_init)
        _perturb(m)
    g, d = DCGANGenerator(nz, ngf, nc), DCGANDiscriminator(nc, ndf)
    for ours, ref in ((g, ref_g), (d, ref_d)):
        assert list(ours.state_dict()) == list(ref.state_dict())  # same keys, same order
        for k, v in ref.state_dict().items():
            assert ours.state_dict()[k].shape == v.shape, k
        ours.load_state_dict(ref.state_dict(), strict=True)
        ref.load_state_dict(ours.state_dict(), strict=True)  # and back
        ours.train(train), ref.train(train)
    z = torch.randn(3, nz, 1, 1)
    img = g(z)
    assert img.shape == (3, nc, 64, 64)
    torch.testing.assert_close(img, ref_g.main(z), rtol=0, atol=0)
    torch.testing.assert_close(g(z.flatten(1)), img, rtol=0, atol=0)  # (B, nz) accepted too
    x = torch.rand(3, nc, 64, 64) * 2 - 1
    p = d(x)
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()
    torch.testing.assert_close(p, ref_d.main(x).view(-1, 1).squeeze(1), rtol=0, atol=0)


def test_weights_init_statistics():
    torch.manual_seed(3)
    g = DCGANGenerator(nz=50, ngf=32, nc=3)
    g.apply(weights_init)
    convs = torch.cat(
        [m.weight.flatten() for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    )
    bn_w = torch.cat([m.weight for m in g.modules() if isinstance(m, nn.BatchNorm2d)])
    bn_b = torch.cat([m.bias for m in g.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(convs.mean().item()) < 1e-3 and abs(convs.std().item() / 0.02 - 1) < 0.02
    # 480 BatchNorm weights: the std estimate is within 20% of 0.02 with overwhelming probability
    assert abs(bn_w.mean().item() - 1) < 0.01 and abs(bn_w.std().item() / 0.02 - 1) < 0.2
    assert torch.equal(bn_b, torch.zeros_like(bn_b))


def test_weights_init_leaves_other_families_alone_and_reaches_spectral_norm():
    """It inits PyTorch's conv layers only: the StyleGAN layers keep their unit-variance stored
    weights, and a spectrally normalised conv gets its stored weight initialised."""
    from genext.models.stylegan import EqualConv2d

    eq = EqualConv2d(8, 8, 3)
    before = eq.weight.detach().clone()
    eq.apply(weights_init)
    assert torch.equal(eq.weight, before)
    sn = torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(64, 64, 3))
    sn.apply(weights_init)
    std = sn.parametrizations.weight.original.std().item()
    assert abs(std / 0.02 - 1) < 0.05


def test_dcgan_discriminator_logits_are_the_probability_before_the_sigmoid():
    d = DCGANDiscriminator(nc=1, ndf=8)
    d_logits = DCGANDiscriminator(nc=1, ndf=8, logits=True)
    d_logits.load_state_dict(d.state_dict(), strict=True)
    x = torch.randn(3, 1, 64, 64)
    logits = d_logits(x)
    assert logits.shape == (3,) and (logits.abs() > 0).all()
    torch.testing.assert_close(torch.sigmoid(logits), d(x), rtol=1e-6, atol=0)


# ---- conditional ResNet GAN -------------------------------------------------------------------

SIZES = [(1, 8), (1, 16), (3, 32)]  # (channels, size): digits 8x8, digits upsampled, RGB


def _tiny(c, s, attention, dtype=torch.float32, spectral_norm=True):
    """Tiny models; attention at the generator's middle resolution and the D's first block."""
    g = ConditionalGenerator(
        5, z_dim=6, base_channels=4, image_size=s, out_channels=c,
        attention_resolution=(max(4, s // 2) if attention else None),
    )  # fmt: skip
    d = ProjectionDiscriminator(
        5, base_channels=4, image_size=s, in_channels=c,
        attention_resolution=(s // 2 if attention else None), spectral_norm=spectral_norm,
    )  # fmt: skip
    return g.to(dtype), d.to(dtype)


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("c,s", SIZES)
def test_conditional_gan_shapes(c, s, attention):
    g, d = _tiny(c, s, attention)
    z, y = torch.randn(3, 6), torch.tensor([0, 4, 2])
    img = g(z, y)
    assert img.shape == (3, c, s, s)
    assert torch.isfinite(img).all() and img.abs().max() <= 1
    logits = d(img, y)
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    has_attn = any(isinstance(m, gan_module.SelfAttention2d) for m in g.modules())
    assert has_attn == attention
    # the fused norm everywhere, no plain GroupNorm module left in the generator
    assert all(isinstance(m, GroupNormSiLU) for m in g.modules() if isinstance(m, nn.GroupNorm))


def _plain_copy(model):
    """The same model on plain PyTorch: every GroupNormSiLU replaced by nn.GroupNorm (+ nn.SiLU)
    with its weights (the attention is swapped separately, by patching the module's SDPA)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GroupNormSiLU):
                gn = nn.GroupNorm(child.num_groups, child.num_channels, child.eps)
                gn = gn.to(child.weight.dtype)
                gn.load_state_dict(child.state_dict())
                new = nn.Sequential(gn, nn.SiLU()) if child.activation == "silu" else gn
                setattr(parent, name, new)
    return model


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"]
)
@pytest.mark.parametrize("c,s", [(1, 8), (3, 32)])
def test_conditional_gan_matches_plain_pytorch(c, s, dtype, tol, monkeypatch):
    g, d = _tiny(c, s, attention=True, dtype=dtype)
    for m in (g, d):
        _perturb(m)
        m.eval()  # spectral norm: fixed power-iteration vectors
    plain_g, plain_d = _plain_copy(g), _plain_copy(d)
    assert not any(isinstance(m, GroupNormSiLU) for m in plain_g.modules())
    z, y = torch.randn(2, 6, dtype=dtype), torch.tensor([3, 1])
    x = torch.rand(2, c, s, s, dtype=dtype) * 2 - 1

    out_g, out_d = g(z, y), d(x, y)
    (out_g.square().sum() + out_d.sum()).backward()
    with monkeypatch.context() as mp:
        mp.setattr(gan_module, "scaled_dot_product_attention", F.scaled_dot_product_attention)
        ref_g, ref_d = plain_g(z, y), plain_d(x, y)
        (ref_g.square().sum() + ref_d.sum()).backward()
    assert rel_err(out_g, ref_g) < tol and rel_err(out_d, ref_d) < tol
    for ours, ref in ((g, plain_g), (d, plain_d)):
        ref_grads = dict(ref.named_parameters())
        for name, p in ours.named_parameters():
            # a GroupNormSiLU's "x.weight" sits at "x.0.weight" in the plain copy (+ SiLU)
            head, _, leaf = name.rpartition(".")
            q = ref_grads[name] if name in ref_grads else ref_grads[f"{head}.0.{leaf}"]
            assert rel_err(p.grad, q.grad) < tol, name


def test_conditional_gan_gradcheck_float64():
    g, d = _tiny(1, 8, attention=True, dtype=torch.float64)
    g.eval(), d.eval()
    y = torch.tensor([2, 0])
    z = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda z: g(z, y), (z,), eps=1e-6, atol=1e-7)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: d(x, y), (x,), eps=1e-6, atol=1e-7)


def test_generator_is_conditioned_on_the_label():
    g, _ = _tiny(1, 16, attention=False)
    z = torch.randn(1, 6).expand(5, 6)
    imgs = g(z, torch.arange(5))
    # one latent, five labels: five different images
    diffs = (imgs[:, None] - imgs[None]).flatten(2).abs().amax(-1)
    assert (diffs + torch.eye(5) > 1e-3).all()
    imgs.sum().backward()
    # only the embedding rows of the labels used get a gradient
    g2, _ = _tiny(1, 16, attention=False)
    g2(torch.randn(3, 6), torch.tensor([1, 1, 3])).sum().backward()
    used = g2.embed.weight.grad.abs().sum(1) > 0
    assert used.tolist() == [False, True, False, True, False]


def test_projection_discriminator_formula():
    _, d = _tiny(3, 32, attention=False, dtype=torch.float64)
    d.eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 4])
    phi = d.features(x)
    assert phi.shape == (4, d.embed.weight.shape[1])
    assert (phi >= 0).all()  # a sum of ReLU'd features
    # D(x, y) = w . phi + b + <E[y], phi>, E and w the spectrally normalised weights
    expected = phi @ d.linear.weight[0] + d.linear.bias[0] + (d.embed.weight[y] * phi).sum(1)
    torch.testing.assert_close(d(x, y), expected, rtol=1e-12, atol=1e-12)
    # the label enters only through the projection
    y2 = torch.tensor([3, 3, 0, 1])
    diff = d(x, y) - d(x, y2)
    torch.testing.assert_close(
        diff, ((d.embed.weight[y] - d.embed.weight[y2]) * phi).sum(1), rtol=1e-12, atol=1e-12
    )


def test_spectral_norm_is_on_every_weight_and_optional():
    _, d = _tiny(1, 16, attention=True)
    layers = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len(layers) >= 8 and all(parametrize.is_parametrized(m, "weight") for m in layers)
    # after training-mode forwards (power iterations), the normalised weights have norm about 1
    for _ in range(30):
        d(torch.randn(2, 1, 16, 16), torch.tensor([0, 1]))
    conv = d.blocks[0].conv1
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2).item()
    assert abs(sigma - 1) < 0.05
    _, plain = _tiny(1, 16, attention=True, spectral_norm=False)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())


def _ran(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_profiler_genext_kernels_run_in_the_conditional_gan(avx2_routing):
    g, d = _tiny(1, 16, attention=True)
    z, y = torch.randn(2, 6), torch.tensor([0, 3])
    names = _ran(lambda: d(g(z, y), y).sum().backward())
    assert "genext::group_norm_silu" in names and "genext::group_norm_silu_backward" in names
    assert (
        "genext::flash_attention_forward" in names and "genext::flash_attention_backward" in names
    )
    assert not {"aten::native_group_norm", "aten::group_norm", "aten::silu"} & names
    assert not any("scaled_dot_product" in n for n in names)
    # without attention, no attention op at all
    g2, d2 = _tiny(1, 16, attention=False)
    names = _ran(lambda: d2(g2(z, y), y))
    assert "genext::group_norm_silu" in names and "aten::native_group_norm" not in names
    assert "genext::flash_attention_forward" not in names


def test_r1_on_the_projection_discriminator():
    # without attention D is twice differentiable (spectral norm included); genext's attention
    # has no double backward, which the R1 backward reports clearly
    _, d = _tiny(1, 8, attention=False, dtype=torch.float64)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    r1 = r1_penalty(d(x, y), x)
    r1.backward()
    assert r1.item() > 0 and d.linear.parametrizations.weight.original.grad.abs().sum() > 0
    _, d_attn = _tiny(1, 8, attention=True, dtype=torch.float64)
    x = x.detach().requires_grad_()
    with pytest.raises(NotImplementedError, match="double backward"):
        r1_penalty(d_attn(x, y), x).backward()


def test_bad_arguments():
    for bad in (12, 4, 0, 16.0):
        with pytest.raises(ValueError, match="image_size"):
            ConditionalGenerator(3, image_size=bad)
        with pytest.raises(ValueError, match="image_size"):
            ProjectionDiscriminator(3, image_size=bad)
    with pytest.raises(ValueError, match="attention_resolution"):
        ConditionalGenerator(3, image_size=16, attention_resolution=32)
    with pytest.raises(ValueError, match="attention_resolution"):
        ProjectionDiscriminator(3, image_size=16, attention_resolution=16)
