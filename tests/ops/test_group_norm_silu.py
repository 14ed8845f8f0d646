"""genext.ops.group_norm_silu against the float64 reference, on the CPU and (marked) on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genext import reference
from genext.nn import GroupNormSiLU
from genext.ops import group_norm_silu

from conftest import max_err, poison_allocator, rel_err, slow

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
@pytest.mark.parametrize("activation", ["silu", slow(None)])  # backward tests cover None too
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


# ---- hostile inputs, meta tensors and the fake kernels ---------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_nonfinite_input_gives_nan_where_the_reference_does(device, bad, channels_last):
    # one non-finite value poisons its own group (NaN mean or variance) and no other group
    for dtype in dtypes_for(device):
        x = make_input((2, 8, 5, 6), dtype, device, channels_last)
        x[0, 2, 3, 4] = bad  # group 1 of sample 0 (channels 2, 3)
        w, b = make_affine(8, torch.float32, device)
        poison_allocator(x)
        y = group_norm_silu(x, 4, w, b)
        ref = reference.group_norm_silu(x.double(), 4, w.double(), b.double())
        assert torch.isnan(ref[0, 2:4]).all() and torch.isfinite(ref[:, 4:]).all()
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        assert torch.equal(torch.isinf(y), torch.isinf(ref))
        finite = torch.isfinite(ref)
        tol = FP32_TOL if dtype in (torch.float32, torch.float64) else 2e-2
        assert rel_err(y[finite], ref[finite]) < tol


def test_negative_or_nan_eps_raises(device):
    # the CUDA binding took any eps: a negative one gave NaN for groups of small variance
    x = make_input((2, 8, 4, 4), torch.float32, device)
    for eps in (-1e-3, float("nan")):
        for dev in (device, "meta"):
            with pytest.raises(ValueError, match="group_norm_silu: eps must be non-negative"):
                group_norm_silu(x.to(dev), 4, eps=eps)


def test_num_groups_must_be_an_int():
    x = make_input((2, 8, 4, 4), torch.float32, "cpu")
    with pytest.raises(TypeError, match="group_norm_silu: num_groups must be an int, got float"):
        group_norm_silu(x, 4.0)
    with pytest.raises(TypeError, match="group_norm_silu: num_groups must be an int, got bool"):
        group_norm_silu(x, True)


@pytest.mark.parametrize(
    "groups,exc,pattern",
    [
        (0, ValueError, "GroupNormSiLU: num_groups must be positive"),
        (-2, ValueError, "GroupNormSiLU: num_groups must be positive"),
        (4, ValueError, "divisible"),
        (2.0, TypeError, "GroupNormSiLU: num_groups must be an int"),
    ],
)
def test_module_rejects_bad_groups_at_construction(groups, exc, pattern):
    # nn.GroupNorm divided by zero for 0 groups and accepted -2 (failing at the first forward)
    with pytest.raises(exc, match=pattern):
        GroupNormSiLU(groups, 6)


def test_module_takes_numpy_integer_groups():
    # as nn.GroupNorm does
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(GroupNormSiLU(np.int64(2), 4)(x), GroupNormSiLU(2, 4)(x))


def test_module_rejects_negative_eps_at_construction():
    with pytest.raises(ValueError, match="GroupNormSiLU: eps must be non-negative"):
        GroupNormSiLU(2, 8, eps=-1e-5)


def test_expanded_and_one_sized_inputs(device):
    # stride-0 (expanded) x and weight, and groups of one value (S = 1, C/G = 1)
    x = make_input((1, 8, 1, 5), torch.float32, device).expand(3, 8, 4, 5)
    w = make_affine(1, torch.float32, device)[0].expand(8)
    b = make_affine(8, torch.float32, device)[1]
    want = reference.group_norm_silu(x.double(), 4, w.double(), b.double())
    assert rel_err(group_norm_silu(x, 4, w, b), want) < FP32_TOL
    x1 = make_input((2, 8, 1), torch.float32, device)
    want = reference.group_norm_silu(x1.double(), 8, eps=1e-3)
    assert rel_err(group_norm_silu(x1, 8, eps=1e-3), want) < FP32_TOL


def _gn_args(device, dtype=torch.float32):
    x = make_input((2, 8, 4, 4), dtype, device)
    w, b = make_affine(8, dtype, device)
    with torch.no_grad():
        _, mean, rstd = torch.ops.genext.group_norm_silu(x, 4, w, b, 1e-5, True)
    return dict(grad_y=torch.randn_like(x), x=x, mean=mean, rstd=rstd, weight=w, bias=b)


@pytest.mark.parametrize("arg", ["x", "weight", "bias"])
def test_meta_argument_beside_cpu_raises_forward(arg):
    # the dispatcher sends a call with any meta tensor to the fake kernel, which returned
    # uninitialised outputs without checking devices
    a = _gn_args("cpu")
    a[arg] = a[arg].to("meta")
    other = "weight" if arg == "x" else arg
    want = f"{other} is on {'cpu' if arg == 'x' else 'meta'} but x is on {a['x'].device}"
    with pytest.raises(RuntimeError, match=f"group_norm_silu: {want}"):
        torch.ops.genext.group_norm_silu(a["x"], 4, a["weight"], a["bias"], 1e-5, True)


@pytest.mark.parametrize("arg", ["grad_y", "x", "mean", "rstd", "weight", "bias"])
def test_meta_argument_beside_cpu_raises_backward(arg):
    a = _gn_args("cpu")
    a[arg] = a[arg].to("meta")
    with pytest.raises(RuntimeError, match="group_norm_silu_backward: .* is on .* but x is on"):
        torch.ops.genext.group_norm_silu_backward(*a.values(), 4, True)


def test_meta_through_autograd_raises():
    # a meta weight beside a CPU x in a training step: forward must raise, not return garbage
    x = make_input((2, 8, 4, 4), torch.float32, "cpu").requires_grad_()
    w = torch.ones(8, device="meta", requires_grad=True)
    with pytest.raises(RuntimeError, match="group_norm_silu: weight is on meta but x is on cpu"):
        group_norm_silu(x, 4, w, torch.zeros(8, device="meta"))


@pytest.mark.parametrize("channels_last", [False, True])
def test_all_meta_works(channels_last):
    a = _gn_args("cpu")
    if channels_last:
        a["x"] = a["x"].to(memory_format=torch.channels_last)
        a["grad_y"] = a["grad_y"].to(memory_format=torch.channels_last)
    m = {k: v.to("meta") for k, v in a.items()}
    y, mean, rstd = torch.ops.genext.group_norm_silu(m["x"], 4, m["weight"], m["bias"], 1e-5, True)
    y_cpu = torch.ops.genext.group_norm_silu(a["x"], 4, a["weight"], a["bias"], 1e-5, True)[0]
    assert y.device.type == "meta" and y.shape == y_cpu.shape and y.stride() == y_cpu.stride()
    assert mean.shape == (2, 4) and rstd.dtype == torch.float32
    dx, dw, db = torch.ops.genext.group_norm_silu_backward(*m.values(), 4, True)
    assert dx.shape == a["x"].shape and dw.shape == (8,) and db.shape == (8,)


def _gn_bad_calls(device):
    """(callable, exception type, message pattern) for each check of the bindings."""
    a = _gn_args(device)
    x, w, b, mean, rstd, gy = a["x"], a["weight"], a["bias"], a["mean"], a["rstd"], a["grad_y"]
    F_ = torch.ops.genext.group_norm_silu
    B_ = torch.ops.genext.group_norm_silu_backward

    def fwd(x=x, g=4, w=w, b=b, eps=1e-5):
        return lambda: F_(x, g, w, b, eps, True)

    def bwd(gy=gy, x=x, mean=mean, rstd=rstd, w=w, b=b, g=4):
        return lambda: B_(gy, x, mean, rstd, w, b, g, True)

    op, bop = "group_norm_silu", "group_norm_silu_backward"
    return [
        (fwd(x=x.long()), TypeError, f"{op}: x must be float32"),
        (fwd(x=x[:, :, 0, 0]), ValueError, f"{op}: x must have shape \\(N, C, \\*\\)"),
        (fwd(g=0), ValueError, f"{op}: num_groups must be positive"),
        (fwd(g=-4), ValueError, f"{op}: num_groups must be positive"),
        (fwd(g=3), ValueError, f"{op}: channels \\(8\\) must be divisible by num_groups \\(3\\)"),
        (fwd(w=w[:4]), ValueError, f"{op}: weight must have shape \\(C,\\)"),
        (fwd(b=b[None]), ValueError, f"{op}: bias must have shape \\(C,\\)"),
        (fwd(w=w.int()), TypeError, f"{op}: weight must be float32 or x's dtype"),
        (fwd(b=None), ValueError, f"{op}: weight and bias must be given together"),
        (fwd(eps=-1.0), ValueError, f"{op}: eps must be non-negative"),
        (bwd(gy=gy[:1]), ValueError, f"{bop}: grad_y must have x's shape"),
        (bwd(gy=gy.half()), TypeError, f"{bop}: grad_y must have x's dtype"),
        (bwd(mean=mean[:1]), ValueError, f"{bop}: mean must hold N\\*num_groups"),
        (bwd(rstd=rstd[:, :1]), ValueError, f"{bop}: rstd must hold N\\*num_groups"),
        (bwd(g=3), ValueError, f"{bop}: channels \\(8\\) must be divisible"),
        (bwd(w=None), ValueError, f"{bop}: weight and bias must be given together"),
        (bwd(x=x.int()), TypeError, f"{bop}: x must be float32"),
    ]


@pytest.mark.parametrize("i", range(len(_gn_bad_calls("cpu"))))
def test_fake_kernel_checks_like_the_bindings(i, device):
    # the same bad call on the device and on meta raises the same exception type and message
    # (the fake kernel raised RuntimeError for ValueErrors of the bindings, or nothing)
    for dev in (device, "meta"):
        call, exc, pattern = _gn_bad_calls(dev)[i]
        with pytest.raises(exc, match=pattern):
            call()


def test_compile_dynamic_shapes():
    # the fake kernels' checks work on symbolic shapes, forward and backward
    norm = GroupNormSiLU(4, 8)
    f = torch.compile(lambda t: norm(t), fullgraph=True, dynamic=True)
    for shape in [(2, 8, 5, 6), (3, 8, 7, 3)]:
        x = make_input(shape, torch.float32, "cpu").requires_grad_()
        y = f(x)
        assert rel_err(y, reference.group_norm_silu(x.double(), 4, norm.weight, norm.bias)) < 1e-5
        y.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- CPU kernel paths: bfloat16 converted in the loops, thread teams -----------------------------


@pytest.mark.parametrize(
    "shape,groups", [((2, 8, 5, 7), 4), ((1, 24, 1, 41), 3), ((1, 4, 1, 1031), 2)]
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_bfloat16_is_float32_rounded_once(shape, groups, channels_last):
    """bfloat16 data is widened and narrowed inside the float32 loops (tails of 1..7 values here;
    1031 values per channel cross the backward's 256-value blocks and 1024-value float sums): the
    result must be the float32 kernel's on the same values, rounded to nearest even once."""
    x = make_input(shape, torch.bfloat16, "cpu", channels_last)
    w, b = make_affine(shape[1], torch.float32, "cpu")
    gy = make_input(shape, torch.bfloat16, "cpu", channels_last, offset=0.5, scale=1.0)
    y16 = group_norm_silu(x, groups, w, b)
    y32 = group_norm_silu(x.float(), groups, w, b)
    assert torch.equal(y16, y32.to(torch.bfloat16))
    m16, r16 = torch.ops.genext.group_norm_silu(x, groups, w, b, 1e-5, True)[1:]
    m32, r32 = torch.ops.genext.group_norm_silu(x.float(), groups, w, b, 1e-5, True)[1:]
    dx16 = torch.ops.genext.group_norm_silu_backward(gy, x, m16, r16, w, b, groups, True)[0]
    dx32 = torch.ops.genext.group_norm_silu_backward(
        gy.float(), x.float(), m32, r32, w, b, groups, True
    )[0]
    assert torch.equal(dx16, dx32.to(torch.bfloat16))


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_parameters_strided_or_float32_beside_bfloat16(channels_last):
    """The kernels read the affine parameters in place or through a converted copy: strided
    bfloat16 parameters give the contiguous ones' results bit for bit, and float32 parameters beside
    bfloat16 data get the float32 kernel's weight and bias gradients on the same values (the
    bfloat16 data widens exactly), in float32."""
    shape, groups = (2, 8, 5, 7), 4
    x = make_input(shape, torch.bfloat16, "cpu", channels_last)
    gy = make_input(shape, torch.bfloat16, "cpu", channels_last, offset=0.5, scale=1.0)
    w32, b32 = make_affine(shape[1], torch.float32, "cpu")
    w16, b16 = w32.to(torch.bfloat16), b32.to(torch.bfloat16)
    ws, bs = (torch.stack([p, torch.zeros_like(p)], 1)[:, 0] for p in (w16, b16))
    assert ws.stride(0) == 2 and torch.equal(ws, w16)

    def run(x, gy, w, b):
        # detach keeps the strides (a clone of a strided vector would be contiguous)
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        y = group_norm_silu(x, groups, w, b)
        return (y, *torch.autograd.grad(y, (x, w, b), gy))

    assert ws.detach().stride(0) == 2
    for a, b_ in zip(run(x, gy, w16, b16), run(x, gy, ws, bs)):
        assert torch.equal(a, b_)
    ours = run(x, gy, w32, b32)
    f32 = run(x.float(), gy.float(), w32, b32)
    assert ours[2].dtype == ours[3].dtype == torch.float32
    assert torch.equal(ours[2], f32[2]) and torch.equal(ours[3], f32[3])


def test_cpu_bfloat16_nan_and_inf_round_like_torch():
    x = torch.tensor([[[1.0, float("inf"), -2.0, 3.0] * 5]], dtype=torch.bfloat16)
    y = group_norm_silu(x, 1, activation=None)
    assert torch.isnan(y).all()  # an infinite value makes its group NaN
    assert (y.view(torch.int16) == torch.tensor(0x7FC0, dtype=torch.int16)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_threads_give_identical_results_and_small_inputs_use_no_team(dtype, channels_last):
    """Forward and backward are bit-for-bit the same with 1 and 2 threads; a shape worth a team
    wakes one with 2 threads, a small one never does."""
    from genext import _C

    big, small = (2, 64, 48, 48), (2, 64, 4, 4)
    old = torch.get_num_threads()
    try:
        outs = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for shape in (big, small):
                torch.manual_seed(0)
                x = make_input(shape, dtype, "cpu", channels_last).requires_grad_()
                w, b = (p.requires_grad_() for p in make_affine(shape[1], dtype, "cpu"))
                gy = make_input(shape, dtype, "cpu", channels_last, offset=0.5, scale=1.0)
                before = _C._cpu_team_launches()
                y = group_norm_silu(x, 32, w, b)
                grads = torch.autograd.grad(y, (x, w, b), gy)
                launched = _C._cpu_team_launches() - before
                if shape == small or threads == 1:
                    assert launched == 0
                elif torch.get_num_threads() == 2:
                    assert launched > 0
                outs[threads, shape] = (y, *grads)
        for shape in (big, small):
            for a, b_ in zip(outs[1, shape], outs[2, shape]):
                assert torch.equal(a, b_)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spatial", [3, 9])
def test_cpu_backward_tail_lanes_stay_finite_for_a_huge_constant_group(dtype, spatial):
    # group 0 is one huge constant: its mean * rstd overflows float, which padded tail lanes must
    # not turn into NaN gradients for the group (they hold no data)
    g = torch.Generator().manual_seed(0)
    x = torch.full((1, 2, spatial), 1e37)
    x[:, 1] = torch.randn(spatial, generator=g)
    x = x.to(dtype).requires_grad_()
    w = torch.ones(2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    gy = torch.randn(1, 2, spatial, generator=g).to(dtype)
    dx, dw, db = torch.autograd.grad(group_norm_silu(x, 2, w, b), (x, w, b), gy)
    # GroupNorm and its gradients do not change when a group is shifted by a constant: the float64
    # reference runs on the constant group moved to 0 (at 1e37 its own sums cancel catastrophically)
    shifted = x.detach().double()
    shifted[:, 0] = 0
    xr, wr, br = (t.detach().double().requires_grad_() for t in (shifted, w, b))
    ref = torch.autograd.grad(
        reference.group_norm_silu_eager(xr, 2, wr, br), (xr, wr, br), gy.double()
    )
    for ours, theirs in zip((dx, dw, db), ref):
        assert torch.isfinite(ours).all()
        assert torch.allclose(ours.double(), theirs, rtol=2e-2, atol=1e-3)


def test_cpu_silu_of_very_negative_inputs_is_zero():
    # z far below -88: silu(z) = z * sigmoid(z) is -0 to float precision, and so is its gradient
    x = torch.tensor([[[-1.0, 1.0, -1.0, 1.0]]]) * 4
    w = torch.tensor([1e37], requires_grad=True)
    y = group_norm_silu(x, 1, w, torch.zeros(1))
    assert y[0, 0, 0] == 0 and y[0, 0, 2] == 0
    (dw,) = torch.autograd.grad(y.sum(), w)
    # d/dw sum silu(w * xhat) with xhat = +-1: 2 * silu'(1e37) * 1 + 2 * silu'(-1e37) * -1 = 2
    assert torch.allclose(dw, torch.tensor([2.0]), rtol=1e-4)


# ---- the CPU loops at each vector width ---------------------------------------------------------


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_loops_of_each_width_match_reference(cpu_loop_level, shape, groups, dtype):
    # every shape's tails (lengths 1, 17, 97, 1025; 7 and 36 channels) in both layouts, with and
    # without the activation and the affine parameters; the backward at the shapes of its own
    # test (groups of two values, S = 1, leave dx to cancellation)
    backward = (shape, groups) in (SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[4], SHAPES[7])
    for channels_last in (False, True):
        for affine in (True, False):
            for activation in ("silu", None):
                args = ("cpu", shape, groups, dtype, channels_last, affine, activation)
                test_forward_matches_reference(*args)
                if backward:
                    test_backward_matches_reference(*args)
