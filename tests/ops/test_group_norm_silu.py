"""genext.ops.group_norm_silu against the float64 reference, on the CPU and (marked) on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genext import reference
from genext.nn import GroupNormSiLU
from genext.ops import group_norm_silu

from conftest import max_err, poison_allocator, rel_err

FP32_TOL = 1e-5  # relative (norm) error against float64 for float32 inputs

# (shape, groups): each case says why it is there.
SHAPES = [
    ((2, 8, 16, 16), 4),  # plain 4-D, small
    ((2, 12, 17), 3),  # rank 3, odd length 17, C/G = 4
    ((1, 6, 5, 7, 3), 2),  # rank 5 (video), odd sizes everywhere
    ((3, 10, 1, 1), 5),  # S = 1: each group holds C/G = 2 values
    ((2, 36, 9, 11), 36),  # G = C (InstanceNorm-like), 36 not a multiple of 8
    ((1, 7, 97), 1),  # G = 1 (LayerNorm over C and S), C = 7, L = 97 prime
    ((2, 64, 33, 31), 32),  # SD-like 32 groups, rows not a multiple of vector width
    ((1, 16, 1025), 4),  # L = 1025: one past a power of two, exercises loop tails
]


def make_input(shape, dtype, device, channels_last=False, offset=3.0, scale=2.0):
    """Random data with a non-zero mean (never zeros) in the requested layout."""
    x = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(device=device, dtype=dtype)
    if channels_last:
        if x.dim() == 4:
            x = x.to(memory_format=torch.channels_last)
        elif x.dim() == 5:
            x = x.to(memory_format=torch.channels_last_3d)
        else:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)  # (N, L, C) storage
    return x


def make_affine(c, dtype, device):
    w = (torch.randn(c, dtype=torch.float64) * 0.5 + 1.0).to(device=device, dtype=dtype)
    b = (torch.randn(c, dtype=torch.float64) * 0.5).to(device=device, dtype=dtype)
    return w, b


def dtypes_for(device):
    base = [torch.float32, torch.float16, torch.bfloat16]
    return base + [torch.float64] if device == "cpu" else base


# ---- forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", ["silu", None])
def test_forward_matches_reference(device, shape, groups, dtype, channels_last, affine, activation):
    if dtype not in dtypes_for(device):
        pytest.skip("float64 kernels are CPU-only")
    x = make_input(shape, dtype, device, channels_last)
    w, b = make_affine(shape[1], dtype, device) if affine else (None, None)
    poison_allocator(x)
    y = group_norm_silu(x, groups, w, b, eps=1e-5, activation=activation)

    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    if channels_last and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt), "output must keep the input's memory format"
    ref = reference.group_norm_silu(
        x.double(),
        groups,
        None if w is None else w.double(),
        None if b is None else b.double(),
        1e-5,
        activation,
    )
    assert torch.isfinite(y).all(), "an element was not written (NaN poison) or overflowed"
    if dtype in (torch.float32, torch.float64):
        assert rel_err(y, ref) < (FP32_TOL if dtype == torch.float32 else 1e-12)
    else:
        # no worse than twice PyTorch's own error in this dtype (against the same reference)
        pt = reference.group_norm_silu_eager(x, groups, w, b, 1e-5, activation)
        assert max_err(y, ref) <= 2 * max_err(pt, ref) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_float32_params_with_16bit_input(device, dtype):
    # mixed precision: float32 weight/bias (as under autocast) with 16-bit activations
    x = make_input((2, 32, 12, 12), dtype, device)
    w, b = make_affine(32, torch.float32, device)
    y = group_norm_silu(x, 8, w, b)
    ref = reference.group_norm_silu(x.double(), 8, w.double(), b.double())
    pt = F.silu(F.group_norm(x.float(), 8, w, b)).to(dtype)  # PyTorch's best in this dtype
    assert y.dtype == dtype
    assert max_err(y, ref) <= 2 * max_err(pt, ref) + 1e-6


def test_large_mean_does_not_cancel(device):
    # variance from shifted sums: data at 1e4 +- 1 must not lose the variance to cancellation
    x = make_input((2, 16, 64, 64), torch.float32, device, offset=1e4, scale=1.0)
    y = group_norm_silu(x, 4)
    ref = reference.group_norm_silu(x.double(), 4)
    # the input itself is rounded at 1e4 (ulp ~1e-3), which bounds what any float32 kernel can do
    assert rel_err(y, ref) < 2e-3
    _, mean, rstd = torch.ops.genext.group_norm_silu(x, 4, None, None, 1e-5, True)
    xg = x.double().reshape(2, 4, -1)
    assert rel_err(rstd, 1 / torch.sqrt(xg.var(2, unbiased=False) + 1e-5)) < 1e-5
    assert rel_err(mean, xg.mean(2)) < 1e-7


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,groups", [((1, 8, 30000), 1), ((2, 64, 40, 40), 32)])
def test_outlier_first_element_does_not_cancel(device, shape, groups, channels_last):
    # statistics shifted by a group's first value must survive that value being an outlier:
    # data at 100 +- 1 with the first element of every group set to 0
    x = make_input(shape, torch.float32, device, offset=100.0, scale=1.0)
    x.view(shape[0], groups, -1)[:, :, 0] = 0.0
    if channels_last:
        x = (
            x.transpose(1, 2).contiguous().transpose(1, 2)
            if x.dim() == 3
            else x.to(memory_format=torch.channels_last)
        )
    y, mean, rstd = torch.ops.genext.group_norm_silu(x, groups, None, None, 1e-5, True)
    xg = x.double().reshape(shape[0], groups, -1)
    assert rel_err(rstd, (xg.var(2, unbiased=False) + 1e-5).rsqrt()) < FP32_TOL
    assert rel_err(y, reference.group_norm_silu(x.double(), groups)) < FP32_TOL


def test_statistics_outputs(device):
    x = make_input((3, 12, 7, 5), torch.float32, device)
    y, mean, rstd = torch.ops.genext.group_norm_silu(x, 6, None, None, 1e-3, False)
    xg = x.double().reshape(3, 6, -1)
    assert mean.shape == (3, 6) and mean.dtype == torch.float32 and rstd.dtype == torch.float32
    assert rel_err(mean, xg.mean(2)) < 1e-6
    assert rel_err(rstd, (xg.var(2, unbiased=False) + 1e-3).rsqrt()) < 1e-6


@pytest.mark.parametrize(
    "make_view",
    [
        lambda x: x[:, :, ::2],  # strided spatial dim
        lambda x: x.permute(0, 1, 3, 2),  # transposed H/W: neither layout
        lambda x: x[:, 2:10],  # channel slice of a bigger tensor
    ],
    ids=["stride2", "permuted", "channel-slice"],
)
def test_non_contiguous_inputs(device, make_view):
    base = make_input((2, 12, 10, 6), torch.float32, device)
    x = make_view(base)
    y = group_norm_silu(x, 4)
    ref = reference.group_norm_silu(x.double(), 4)
    assert rel_err(y, ref) < FP32_TOL


@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 4), (2, 0, 3)])
def test_empty_inputs(device, shape):
    # empty batch, empty spatial dim, zero channels: empty results and no kernel launch
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.ones(shape[1], device=device, requires_grad=True)
    b = torch.zeros(shape[1], device=device, requires_grad=True)
    y = group_norm_silu(x, 2 if shape[1] else 1, w, b)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# ---- backward -----------------------------------------------------------------------------------


def _grads(fn, x, w, b, gy):
    x = x.detach().clone().requires_grad_()
    params = (
        []
        if w is None
        else [w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()]
    )
    y = fn(x, *params) if params else fn(x)
    gx, *gp = torch.autograd.grad(y, [x] + params, gy)
    return [gx] + gp


@pytest.mark.parametrize("shape,groups", [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[4], SHAPES[7]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", ["silu", None])
def test_backward_matches_reference(
    device, shape, groups, dtype, channels_last, affine, activation
):
    x = make_input(shape, dtype, device, channels_last)
    w, b = make_affine(shape[1], dtype, device) if affine else (None, None)
    gy = make_input(shape, dtype, device, channels_last, offset=0.5, scale=1.0)
    poison_allocator(x)
    ours = _grads(lambda x, *p: group_norm_silu(x, groups, *p, activation=activation), x, w, b, gy)
    ref = _grads(
        lambda x, *p: reference.group_norm_silu(x, groups, *p, activation=activation),
        x.double(),
        None if w is None else w.double(),
        None if b is None else b.double(),
        gy.double(),
    )
    assert ours[0].shape == x.shape and all(g.dtype == dtype for g in ours)
    if dtype == torch.float32:
        for o, r in zip(ours, ref):
            assert rel_err(o, r) < FP32_TOL
    else:
        pt = _grads(
            lambda x, *p: reference.group_norm_silu_eager(x, groups, *p, activation=activation),
            x,
            w,
            b,
            gy,
        )
        for o, p, r in zip(ours, pt, ref):
            assert max_err(o, r) <= 2 * max_err(p, r) + 1e-6


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", ["silu", None])
def test_gradcheck_float64_cpu(channels_last, affine, activation):
    x = make_input((2, 6, 3, 5), torch.float64, "cpu", channels_last).requires_grad_()
    inputs = [x]
    if affine:
        w, b = make_affine(6, torch.float64, "cpu")
        inputs += [w.requires_grad_(), b.requires_grad_()]
    fn = lambda x, *p: group_norm_silu(x, 3, *p, activation=activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


# ---- torch.library / torch.compile ----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
def test_opcheck(device, layout):
    # "permuted": neither layout, so the kernels copy x and return contiguous outputs; the fake
    # kernel must report the same strides
    x = make_input((2, 8, 5, 6), torch.float32, device, layout == "channels_last")
    if layout == "permuted":
        x = x.permute(0, 1, 3, 2)
    x.requires_grad_()
    w, b = make_affine(8, torch.float32, device)
    w.requires_grad_(), b.requires_grad_()
    torch.library.opcheck(torch.ops.genext.group_norm_silu.default, (x, 4, w, b, 1e-5, True))
    torch.library.opcheck(torch.ops.genext.group_norm_silu.default, (x, 4, None, None, 1e-5, False))
    with torch.no_grad():
        _, mean, rstd = torch.ops.genext.group_norm_silu(x, 4, w, b, 1e-5, True)
    gy = torch.randn_like(x).detach()
    torch.library.opcheck(
        torch.ops.genext.group_norm_silu_backward.default,
        (gy, x.detach(), mean, rstd, w.detach(), b.detach(), 4, True),
    )
    torch.library.opcheck(
        torch.ops.genext.group_norm_silu_backward.default,
        (gy, x.detach(), mean, rstd, None, None, 4, False),
    )


def test_torch_compile_strided_input(device):
    # a permuted input goes through the copy path; compiled and eager strides must agree
    x = make_input((2, 8, 6, 10), torch.float32, device).permute(0, 1, 3, 2)
    f = torch.compile(lambda t: group_norm_silu(t, 4) * 2, fullgraph=True)
    assert rel_err(f(x), reference.group_norm_silu(x.double(), 4) * 2) < FP32_TOL


def test_torch_compile_fullgraph(device):
    norm = GroupNormSiLU(4, 16).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).to(device)

    def block(x):
        return conv(norm(x)) + x

    compiled = torch.compile(block, fullgraph=True)
    x = make_input((2, 16, 8, 8), torch.float32, device).requires_grad_()
    y_eager = block(x)
    y_comp = compiled(x)
    assert rel_err(y_comp, y_eager) < FP32_TOL
    (g_eager,) = torch.autograd.grad(y_eager.sum(), x)
    (g_comp,) = torch.autograd.grad(y_comp.sum(), x)
    assert rel_err(g_comp, g_eager) < FP32_TOL


# ---- module ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
def test_module_is_drop_in_for_groupnorm_silu(device, affine):
    gn = torch.nn.GroupNorm(8, 32, eps=1e-6, affine=affine).to(device)
    if affine:
        with torch.no_grad():
            gn.weight.normal_(1.0, 0.3), gn.bias.normal_(0.0, 0.3)
    ours = GroupNormSiLU(8, 32, eps=1e-6, affine=affine).to(device)
    ours.load_state_dict(gn.state_dict())  # same keys as nn.GroupNorm
    assert set(ours.state_dict()) == set(gn.state_dict())
    x = make_input((2, 32, 9, 9), torch.float32, device)
    want = torch.nn.SiLU()(gn(x))
    assert rel_err(ours(x), want) < FP32_TOL
    assert rel_err(GroupNormSiLU.from_group_norm(gn)(x), want) < FP32_TOL
    plain = GroupNormSiLU.from_group_norm(gn, activation=None)
    assert rel_err(plain(x), gn(x)) < FP32_TOL


# ---- bad inputs -----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(device):
    x = make_input((2, 8, 4, 4), torch.float32, device)
    w, b = make_affine(8, torch.float32, device)
    with pytest.raises(TypeError, match="x must be float32"):
        group_norm_silu(x.long(), 4)
    with pytest.raises(ValueError, match="rank 3 to 5"):
        group_norm_silu(x[:, :, 0, 0], 4)
    with pytest.raises(ValueError, match="rank 3 to 5"):
        group_norm_silu(x.reshape(1, 2, 8, 2, 2, 4), 4)
    with pytest.raises(ValueError, match=r"channels \(8\) must be divisible by num_groups \(3\)"):
        group_norm_silu(x, 3)
    with pytest.raises(ValueError, match="num_groups must be positive"):
        group_norm_silu(x, 0)
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\)"):
        group_norm_silu(x, 4, w[:4], b)
    with pytest.raises(ValueError, match=r"bias must have shape \(C,\)"):
        group_norm_silu(x, 4, w, b[:1].expand(1, 8))
    with pytest.raises(ValueError, match="weight and bias must be given together"):
        group_norm_silu(x, 4, w, None)
    with pytest.raises(TypeError, match="weight must be float32 or x's dtype"):
        group_norm_silu(x.half(), 4, w.double(), b.double())
    with pytest.raises(ValueError, match="activation must be 'silu' or None"):
        group_norm_silu(x, 4, activation="gelu")
    _, mean, rstd = torch.ops.genext.group_norm_silu(x, 4, w, b, 1e-5, True)
    with pytest.raises(ValueError, match="grad_y must have x's shape"):
        torch.ops.genext.group_norm_silu_backward(x[:1], x, mean, rstd, w, b, 4, True)
    with pytest.raises(TypeError, match="grad_y must have x's dtype"):
        torch.ops.genext.group_norm_silu_backward(x.double(), x, mean, rstd, w, b, 4, True)
    with pytest.raises(ValueError, match="mean must hold N\\*num_groups"):
        torch.ops.genext.group_norm_silu_backward(x, x, mean[:1], rstd, w, b, 4, True)


def test_device_mismatch_raises():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU to put the tensors on two devices")
    x = torch.randn(2, 8, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        group_norm_silu(x, 4, torch.ones(8), torch.zeros(8))


@pytest.mark.cuda
def test_float64_on_cuda_is_a_clear_error():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        group_norm_silu(torch.randn(2, 8, 4, 4, device="cuda", dtype=torch.float64), 4)


# ---- CUDA-specific paths --------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape",
    [
        (
            1,
            128,
            128,
            128,
        ),  # 32 groups of 64k values: the split-group path (too few groups for the GPU)
        (1, 32, 333, 77),  # split path with a group length that no vector width divides
        (8, 320, 32, 32),  # 256 groups of 10k values: many groups, each small enough for one block
        (2, 1280, 8, 8),  # 64 groups of 2560 values
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_paths_forward_backward(shape, channels_last, dtype):
    x = make_input(shape, dtype, "cuda", channels_last)
    w, b = make_affine(shape[1], dtype, "cuda")
    gy = make_input(shape, dtype, "cuda", channels_last, offset=0.0, scale=1.0)
    poison_allocator(x)
    ours = _grads(lambda x, *p: group_norm_silu(x, 32, *p), x, w, b, gy)
    y = group_norm_silu(x, 32, w, b)
    ref_y = reference.group_norm_silu(x.double(), 32, w.double(), b.double())
    ref = _grads(
        lambda x, *p: reference.group_norm_silu(x, 32, *p),
        x.double(),
        w.double(),
        b.double(),
        gy.double(),
    )
    if dtype == torch.float32:
        assert rel_err(y, ref_y) < FP32_TOL
        for o, r in zip(ours, ref):
            assert rel_err(o, r) < FP32_TOL
    else:
        pt_y = reference.group_norm_silu_eager(x, 32, w, b)
        assert max_err(y, ref_y) <= 2 * max_err(pt_y, ref_y) + 1e-6
        pt = _grads(lambda x, *p: reference.group_norm_silu_eager(x, 32, *p), x, w, b, gy)
        for o, p, r in zip(ours, pt, ref):
            assert max_err(o, r) <= 2 * max_err(p, r) + 1e-6


@pytest.mark.cuda
def test_cuda_results_are_deterministic():
    x = make_input((1, 256, 96, 96), torch.float16, "cuda")
    w, b = make_affine(256, torch.float16, "cuda")
    gy = torch.randn_like(x)
    first = _grads(lambda x, *p: group_norm_silu(x, 32, *p), x, w, b, gy)
    again = _grads(lambda x, *p: group_norm_silu(x, 32, *p), x, w, b, gy)
    for a, c in zip(first, again):
        assert torch.equal(a, c)


@pytest.mark.cuda
def test_cuda_more_than_2_31_elements():
    # 64-bit indexing: 2^31 + 2^25 fp16 elements (4.4 GB); check the groups at both ends
    n, c, h, w = 1, 32, 65536, 1024 + 16
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GiB")
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    y = group_norm_silu(x, 32)
    for g in (0, 31):
        ref = reference.group_norm_silu(x[:, g : g + 1].double(), 1)
        pt = reference.group_norm_silu_eager(x[:, g : g + 1].float(), 1).half()
        assert max_err(y[:, g : g + 1], ref) <= 2 * max_err(pt, ref) + 1e-6


def test_double_backward_is_a_clear_error():
    x = make_input((2, 8, 4, 4), torch.float64, "cpu").requires_grad_()
    (g,) = torch.autograd.grad(group_norm_silu(x, 4).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()
