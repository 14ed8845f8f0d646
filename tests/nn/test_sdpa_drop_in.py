"""genext.nn.functional.scaled_dot_product_attention, the drop-in for PyTorch's: the same results
as torch's SDPA where genext runs (square and rectangular, causal, GQA, prefix key-padding masks),
PyTorch's own kernel where it does not (float or arbitrary masks, dropout, ...)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import genext.nn.functional as gF
from genext import reference

from attention_helpers import ATOL, ATOL_GRAD, assert_nan_where_reference, make_qkv
from conftest import max_err


@pytest.fixture
def torch_sdpa_calls(monkeypatch):
    """Counts the drop-in's fallbacks to PyTorch's SDPA (the function it keeps a reference to)."""
    calls = []
    original = gF._torch_sdpa

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(gF, "_torch_sdpa", counting)
    return calls


@pytest.mark.parametrize("lq,lk", [(33, 33), (50, 20), (20, 50)], ids=["square", "Lq>Lk", "Lq<Lk"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_drop_in_matches_torch(device, lq, lk, is_causal, torch_sdpa_calls, avx2_routing):
    # is_causal is PyTorch's top-left mask, also when Lq != Lk
    q, k, v = make_qkv(2, 4, 4, lq, lk, 64, torch.float32, device, requires_grad=True)
    assert gF.sdpa_backend(q, k, v, is_causal=is_causal) == "genext"
    out = gF.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert not torch_sdpa_calls, "the genext kernel should have run"
    want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert max_err(out, want) <= ATOL[torch.float32]
    go = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(want, (q, k, v), go)
    ):
        assert max_err(a, b) <= ATOL_GRAD[torch.float32]


def test_sdpa_drop_in_gqa(device, torch_sdpa_calls, avx2_routing):
    q, k, v = make_qkv(2, 8, 2, 30, 30, 64, torch.float16, device)
    out = gF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.2)
    assert not torch_sdpa_calls
    ref = reference.attention_reference(q.double(), k.double(), v.double(), True, 0.2, False)
    pt = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.2)
    assert max_err(out, ref) <= 2 * max_err(pt, ref) + 1e-6
    # without enable_gqa PyTorch raises for Hq != Hk; the drop-in defers to it
    with pytest.raises(RuntimeError):
        gF.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("mask_shape", ["B11L", "11L"])
def test_sdpa_drop_in_key_padding_mask(device, mask_shape, torch_sdpa_calls):
    b, h, lq, lk, d = 3, 2, 21, 37, 40
    q, k, v = make_qkv(b, h, h, lq, lk, d, torch.float32, device, requires_grad=True)
    lens = torch.tensor([37, 0, 12]) if mask_shape == "B11L" else torch.tensor([30])
    mask = (torch.arange(lk) < lens[:, None]).to(device)  # True = attend, a prefix per batch
    mask = mask[:, None, None, :] if mask_shape == "B11L" else mask[:, None, :]
    assert gF.sdpa_backend(q, k, v, attn_mask=mask) == "genext"
    out = gF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not torch_sdpa_calls, "a prefix key-padding mask runs on the genext kernel"
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    live = [i for i in range(b) if mask_shape != "B11L" or lens[i] > 0]
    assert max_err(out[live], want[live]) <= ATOL[torch.float32]
    if mask_shape == "B11L":  # fully padded entry: zeros (PyTorch: NaN), finite gradients
        assert torch.equal(out[1], torch.zeros_like(out[1]))
    grads_ = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads_)


@pytest.mark.parametrize(
    "kind",
    [
        "float-mask",
        "bool-arbitrary",
        "bool-not-prefix",
        "bool-2d-LqLk",
        "dropout",
        "3d-inputs",
        "value-dim",
    ],
)
def test_sdpa_drop_in_falls_back(device, kind, torch_sdpa_calls):
    b, h, lq, lk, d = 2, 2, 9, 13, 32
    q, k, v = make_qkv(b, h, h, lq, lk, d, torch.float32, device)
    kwargs = {}
    if kind == "float-mask":
        kwargs["attn_mask"] = torch.randn(b, 1, lq, lk, device=device)
    elif kind == "bool-arbitrary":
        kwargs["attn_mask"] = torch.rand(b, h, lq, lk, device=device) > 0.3
    elif kind == "bool-not-prefix":
        m = torch.ones(b, 1, 1, lk, dtype=torch.bool, device=device)
        m[:, :, :, 3] = False  # a hole: not a key-padding prefix
        kwargs["attn_mask"] = m
    elif kind == "bool-2d-LqLk":  # PyTorch reads a 2-D mask as (Lq, Lk)
        kwargs["attn_mask"] = torch.rand(lq, lk, device=device) > 0.3
    elif kind == "dropout":
        kwargs["dropout_p"] = 0.5
    elif kind == "3d-inputs":
        q, k, v = q[0], k[0], v[0]
    elif kind == "value-dim":
        v = torch.randn(b, h, lk, 24, device=device)
    backend_kwargs = {k: a for k, a in kwargs.items() if k != "scale"}
    assert gF.sdpa_backend(q, k, v, **backend_kwargs) == "torch"
    out = gF.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch_sdpa_calls, "expected the PyTorch fallback"
    if kind == "dropout":
        assert out.shape == q.shape
        return
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.allclose(out, want, atol=1e-6, rtol=0, equal_nan=True)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("where", ["q", "k", "scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdpa_drop_in_gives_nan_where_torch_does(
    device, where, is_causal, dtype, torch_sdpa_calls, avx2_routing
):
    # one NaN in query row 30 or key 30 of head 1, or a NaN scale; PyTorch's SDPA gives NaN rows
    # there (with is_causal only the rows that see key 30: a masked key does not count). D 16: a
    # head dim the CPU float32 forward keeps on genext's kernel under the AVX2 machines' rule
    # (cpu_forward_prefers_torch; a machine with AMX hands it to PyTorch)
    q, k, v = (t.double() for t in make_qkv(1, 2, 2, 40, 40, 16, dtype, "cpu"))
    scale = float("nan") if where == "scale" else None
    if where != "scale":
        (q if where == "q" else k)[0, 1, 30, 7] = float("nan")
    ref = reference.attention_reference(q, k, v, is_causal, scale, bottom_right=False)
    out = gF.scaled_dot_product_attention(
        *(t.to(device, dtype) for t in (q, k, v)), is_causal=is_causal, scale=scale
    )
    assert not torch_sdpa_calls, "the genext kernel should have run"
    assert_nan_where_reference(out.cpu(), ref, 2e-5 if dtype == torch.float32 else 2e-3)
    if not is_causal:  # with a mask PyTorch's math backend adds -inf to NaN scores of hidden keys
        assert torch.equal(
            F.scaled_dot_product_attention(q, k, v, scale=scale).isnan(), ref.isnan()
        )


def test_cpu_float32_forward_without_gradients_goes_to_torch_where_it_is_faster(
    torch_sdpa_calls, avx2_routing
):
    # D 64 float32 on the CPU with no gradient needed: PyTorch's forward is the faster one
    q, k, v = make_qkv(1, 4, 2, 40, 70, 64, torch.float32, "cpu")
    assert gF.sdpa_backend(q, k, v, enable_gqa=True) == "torch"
    out = gF.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert len(torch_sdpa_calls) == 1
    want = reference.attention_reference(q.double(), k.double(), v.double(), False, None)
    assert (out.double() - want).abs().max().item() <= 1e-5
    # genext where a gradient is needed, at small head dims, in bfloat16
    qg = q.clone().requires_grad_()
    assert gF.sdpa_backend(qg, k, v, enable_gqa=True) == "genext"
    with torch.no_grad():
        assert gF.sdpa_backend(qg, k, v, enable_gqa=True) == "torch"
    assert gF.sdpa_backend(*(t[..., :16] for t in (q, k, v)), enable_gqa=True) == "genext"
    assert gF.sdpa_backend(*(t[..., :40] for t in (q, k, v)), enable_gqa=True) == "genext"
    assert gF.sdpa_backend(*(t.bfloat16() for t in (q, k, v)), enable_gqa=True) == "genext"
    # D 40 with 256 keys or more: PyTorch's again
    q, k, v = make_qkv(1, 2, 2, 20, 256, 40, torch.float32, "cpu")
    assert gF.sdpa_backend(q, k, v) == "torch"


def test_cpu_float32_gradients_routing_sees_is_causal(torch_sdpa_calls):
    # with gradients, non-causal attention over 1024+ keys at D 128 is PyTorch's (faster there),
    # causal attention at the same shape genext's: the drop-in passes is_causal to the rule
    q, k, v = make_qkv(1, 2, 1, 8, 1024, 128, torch.float32, "cpu", requires_grad=True)
    assert gF.sdpa_backend(q, k, v, enable_gqa=True) == "torch"
    assert gF.sdpa_backend(q, k, v, is_causal=True, enable_gqa=True) == "genext"
    assert gF.sdpa_backend(q, k, v, is_causal=True, enable_gqa=True, scale=-0.1) == "genext"
    for is_causal, calls in ((True, 0), (False, 1)):
        out = gF.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
        assert len(torch_sdpa_calls) == calls
        want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
        assert max_err(out, want) <= ATOL[torch.float32]


def _weighted_sum(out):
    w = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).view(out.shape)
    return (out * w).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["plain", "causal", "key-padding"])
def test_cpu_drop_in_under_torch_func_matches_torch(dtype, case, torch_sdpa_calls, avx2_routing):
    # torch.func.grad, jacrev, vmap and vmap of grad over the drop-in give what the same
    # transforms over PyTorch's SDPA give, with genext's kernel running
    q, k, v = make_qkv(2, 2, 2, 7, 9, 8, dtype, "cpu")
    kwargs = {"is_causal": case == "causal", "scale": 0.6}
    if case == "key-padding":
        mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
        mask[1, ..., 5:] = False
        kwargs["attn_mask"] = mask
    assert gF.sdpa_backend(q, k, v, **kwargs) == "genext"

    def ours(q, k, v):
        return _weighted_sum(gF.scaled_dot_product_attention(q, k, v, **kwargs))

    def theirs(q, k, v):
        return _weighted_sum(F.scaled_dot_product_attention(q, k, v, **kwargs))

    tol = ATOL_GRAD[dtype]
    got = torch.func.grad(ours, argnums=(0, 1, 2))(q, k, v)
    want = torch.func.grad(theirs, argnums=(0, 1, 2))(q, k, v)
    for name, a, r in zip(("dq", "dk", "dv"), got, want):
        assert max_err(a, r) <= tol, name
    jac = torch.func.jacrev(lambda k: gF.scaled_dot_product_attention(q, k, v, **kwargs))(k)
    ref = torch.func.jacrev(lambda k: F.scaled_dot_product_attention(q, k, v, **kwargs))(k)
    assert max_err(jac, ref) <= tol
    ks = torch.stack([k, -k, 0.5 * k])
    got = torch.func.vmap(torch.func.grad(ours, argnums=(0, 1, 2)), (None, 0, None))(q, ks, v)
    want = torch.func.vmap(torch.func.grad(theirs, argnums=(0, 1, 2)), (None, 0, None))(q, ks, v)
    for name, a, r in zip(("dq", "dk", "dv"), got, want):
        assert max_err(a, r) <= tol, name
    assert not torch_sdpa_calls, "the genext kernel should have run"


def test_cpu_drop_in_second_derivatives_under_torch_func_raise(torch_sdpa_calls):
    # a gradient of genext's gradient is a clear error (PyTorch's CPU kernel raises too), never a
    # silent zero
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8, torch.float64, "cpu")

    def f(q):
        return _weighted_sum(gF.scaled_dot_product_attention(q, k, v, is_causal=True))

    with pytest.raises(NotImplementedError, match="flash_attention: double backward"):
        torch.func.grad(lambda q: torch.func.grad(f)(q).pow(2).sum())(q)
    with pytest.raises(NotImplementedError, match="flash_attention: double backward"):
        torch.func.jacrev(torch.func.jacrev(f))(q)
    assert not torch_sdpa_calls


def test_cpu_drop_in_under_functionalize_matches_eager(torch_sdpa_calls, avx2_routing):
    # torch.func.functionalize (with a key-padding mask too) and make_fx over it run genext's
    # registered op and give eager's results
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = make_qkv(1, 2, 2, 5, 7, 8, torch.float32, "cpu")
    mask = torch.ones(1, 1, 1, 7, dtype=torch.bool)
    mask[..., 4:] = False
    for attn_mask in (None, mask):

        def f(q, k, v, attn_mask=attn_mask):
            return gF.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

        assert torch.equal(torch.func.functionalize(f)(q, k, v), f(q, k, v))
    # make_fx cannot read a mask's values (the prefix check): no mask there
    gm = make_fx(torch.func.functionalize(lambda q, k, v: f(q, k, v, None)))(q, k, v)
    assert torch.equal(gm(q, k, v), f(q, k, v, None))
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "genext.flash_attention_forward.default" in targets
    assert not torch_sdpa_calls


def test_cpu_drop_in_vmap_with_a_per_sample_mask_goes_to_torch(torch_sdpa_calls):
    # per-sample gradients with a per-sample key-padding mask: the mask is batched under vmap, so
    # there is no one prefix to check and PyTorch's SDPA runs; a mask shared by the samples keeps
    # genext's kernel
    q, k, v = (torch.randn(3, 1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([4, 2, 3])
    backends = []

    def loss(sdpa):
        def f(q, k, v, n):
            mask = (torch.arange(4) < n).view(1, 1, 1, 4)
            if sdpa is gF.scaled_dot_product_attention:
                backends.append(gF.sdpa_backend(q, k, v, attn_mask=mask))
            return sdpa(q, k, v, attn_mask=mask).sin().sum()

        return f

    per_sample = torch.func.vmap(torch.func.grad(loss(gF.scaled_dot_product_attention)))
    got = per_sample(q, k, v, lengths)
    want = torch.func.vmap(torch.func.grad(loss(F.scaled_dot_product_attention)))(q, k, v, lengths)
    assert backends == ["torch"] and torch_sdpa_calls
    assert max_err(got, want) <= ATOL_GRAD[torch.float64]
    # the same lengths as a loop of eager calls (also genext's kernel outside vmap)
    for i, n in enumerate(lengths.tolist()):
        qi = q[i].clone().requires_grad_()
        mask = (torch.arange(4) < n).view(1, 1, 1, 4)
        assert gF.sdpa_backend(qi, k[i], v[i], attn_mask=mask) == "genext"
        out = gF.scaled_dot_product_attention(qi, k[i], v[i], attn_mask=mask)
        (g,) = torch.autograd.grad(out.sin().sum(), qi)
        assert max_err(got[i], g) <= ATOL_GRAD[torch.float64]
    # one mask for every sample (not batched): genext's kernel under vmap
    backends.clear()
    torch_sdpa_calls.clear()
    shared = torch.func.vmap(
        torch.func.grad(loss(gF.scaled_dot_product_attention)), (0, 0, 0, None)
    )
    got = shared(q, k, v, torch.tensor(3))
    want = torch.func.vmap(torch.func.grad(loss(F.scaled_dot_product_attention)), (0, 0, 0, None))(
        q, k, v, torch.tensor(3)
    )
    assert backends == ["genext"] and not torch_sdpa_calls
    assert max_err(got, want) <= ATOL_GRAD[torch.float64]
