"""genext.losses.ClipLoss / SigLipLoss against open_clip's losses and a float64 reference written
from the formulas: values and gradients (features, logit_scale, logit_bias) in local mode, the
genext ops doing all the work (no matrix product in the module), bad inputs, torch.compile, and
torch.distributed runs (2 and 3 gloo processes) for every mode: each rank's loss and gradients
against a single process on the concatenated batch and against open_clip on the same ranks."""

from __future__ import annotations

import importlib.util
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import genext
from genext import reference
from genext.losses import ClipLoss, SigLipLoss

from conftest import max_err, rel_err

# ---- references --------------------------------------------------------------------------------


def _load_open_clip_loss():
    """open_clip's loss.py, loaded on its own: importing the open_clip package pulls timm and
    torchvision (seconds per process), the loss module needs only torch. None when missing."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    if not os.path.exists(path):
        return None
    loss_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


_OC = _load_open_clip_loss()
needs_open_clip = pytest.mark.skipif(
    _OC is None, reason="open_clip_torch not installed (pip install open_clip_torch)"
)


def _logits(i, t, s, b):
    logits = s * i @ t.T
    return logits + b if b is not None else logits


def _ref_clip_terms(i, t, s, b):
    """Per-row cross-entropies (image->text, text->image) of the full square problem."""
    logits = _logits(i, t, s, b)
    labels = torch.arange(i.shape[0])
    return (
        F.cross_entropy(logits, labels, reduction="none"),
        F.cross_entropy(logits.T, labels, reduction="none"),
    )


# the float64 references: the losses with the whole N x N logits (open_clip's formulas)
_ref_clip = reference.clip_loss
_ref_siglip = reference.siglip_loss


def _inputs(n, d, dtype=torch.float32, scale=20.0, bias=-5.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    i = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    # correlated pairs, so the positives matter and the losses are not all log(N)
    t = F.normalize(i + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    s = torch.tensor(scale, dtype=torch.float64)
    b = torch.tensor(bias, dtype=torch.float64)
    return [x.to(dtype) for x in (i, t, s, b)]


def _value_and_grads(fn, tensors, with_bias):
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    i, t, s, b = leaves
    loss = fn(i, t, s, b if with_bias else None)
    used = leaves if with_bias else leaves[:3]
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, used)]


# ---- local mode --------------------------------------------------------------------------------

NS = [1, 7, 64]  # 1: a single pair (the CE is 0, SigLIP has no negatives); 7: odd
DS = [5, 32]  # 5: not a multiple of 8


def _check_local(ours_fn, oc_fn, ref_fn, n, d, with_bias, scale, bias, device="cpu"):
    x32 = [v.to(device) for v in _inputs(n, d, scale=scale, bias=bias, seed=n * 100 + d)]
    x64 = [x.double() for x in x32]
    loss, grads = _value_and_grads(ours_fn, x32, with_bias)
    ref_loss, ref_grads = _value_and_grads(ref_fn, x64, with_bias)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    # fp32 features, fp32 accumulation after the products: near 1e-5 relative to float64
    tol = 1e-5
    assert abs(loss.double() - ref_loss).item() <= tol * max(1.0, ref_loss.abs().item())
    for g, r in zip(grads, ref_grads):
        # or a few fp32 ulps absolute: CLIP's bias gradient is exactly 0, fp32 leaves ~1e-7
        assert rel_err(g, r) <= tol or max_err(g, r) <= 1e-6, (g, r)
    if oc_fn is not None:  # open_clip on the same fp32 inputs: the same to fp32 rounding
        oc_loss, oc_grads = _value_and_grads(oc_fn, x32, with_bias)
        # the op subtracts the positive logit from a log-sum-exp (or softplus) of the same size,
        # so its absolute error is a few fp32 ulps of the logits: eps * scale
        torch.testing.assert_close(loss, oc_loss.float(), rtol=2e-5, atol=1.2e-7 * max(1.0, scale))
        for g, r in zip(grads, oc_grads):
            torch.testing.assert_close(g, r, rtol=2e-4, atol=2e-6 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("scale", [14.3, 100.0])  # open_clip's init and its clamp
def test_clip_local(n, d, with_bias, scale):
    oc = _OC.ClipLoss() if _OC is not None else None
    _check_local(ClipLoss(), oc, _ref_clip, n, d, with_bias, scale, bias=-3.0)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("scale", [10.0, 100.0])  # SigLIP's init (with bias -10) and large
def test_siglip_local(n, d, with_bias, scale):
    oc = _OC.SigLipLoss() if _OC is not None else None
    _check_local(SigLipLoss(), oc, _ref_siglip, n, d, with_bias, scale, bias=-10.0)


@pytest.mark.cuda
@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
def test_local_cuda(loss_cls):
    """The same checks on the GPU, N across several tiles."""
    oc = getattr(_OC, loss_cls.__name__)() if _OC is not None else None
    ref = _ref_clip if loss_cls is ClipLoss else _ref_siglip
    _check_local(loss_cls(), oc, ref, 1000, 64, True, 30.0, -5.0, device="cuda")


@needs_open_clip
@pytest.mark.parametrize(
    "scale",
    [
        15.0,
        # logits above 20, where a thresholded softplus would drop the exp(-x) term
        50.0,
    ],
)
def test_local_open_clip_exact_in_float64(scale):
    """float64 inputs: genext and open_clip agree to rounding (1e-12), so any difference in the
    fp32 tests is precision, not semantics."""
    x = [v.double() for v in _inputs(33, 12, scale=scale, bias=-4.0, seed=7)]
    for ours, theirs in ((ClipLoss(), _OC.ClipLoss()), (SigLipLoss(), _OC.SigLipLoss())):
        loss, grads = _value_and_grads(ours, x, True)
        oc_loss, oc_grads = _value_and_grads(theirs, x, True)
        torch.testing.assert_close(loss, oc_loss, rtol=1e-12, atol=1e-12)
        for g, r in zip(grads, oc_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
def test_bf16_features_no_worse_than_open_clip(loss_cls, device):
    """bf16 features at logit scale 100: within twice the error of the eager loss in bf16 (open_clip
    or the reference) against float64, and finite."""
    ref = _ref_clip if loss_cls is ClipLoss else _ref_siglip
    eager = ref if _OC is None else getattr(_OC, loss_cls.__name__)()
    xb = [
        v.to(device) for v in _inputs(64, 32, dtype=torch.bfloat16, scale=100.0, bias=-10.0, seed=3)
    ]
    x64 = [x.double() for x in xb]  # the same (bf16-rounded) inputs, exactly
    loss, grads = _value_and_grads(loss_cls(), xb, True)
    e_loss, e_grads = _value_and_grads(eager, xb, True)
    r_loss, r_grads = _value_and_grads(ref, x64, True)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    floor = 2.0**-7  # one bf16 ulp, relative: where the eager result happens to round well
    assert rel_err(loss, r_loss) <= 2 * rel_err(e_loss, r_loss) + floor
    for g, e, r in zip(grads, e_grads, r_grads):
        assert rel_err(g, r) <= 2 * rel_err(e, r) + floor


def test_output_dict_and_python_scalars():
    i, t, s, b = _inputs(9, 6)
    for mod in (ClipLoss(), SigLipLoss()):
        out = mod(i, t, s, b, output_dict=True)
        assert list(out) == ["contrastive_loss"]
        torch.testing.assert_close(out["contrastive_loss"], mod(i, t, s, b))
        # open_clip accepts a python number for the scale and bias: so do we
        torch.testing.assert_close(mod(i, t, s.item(), b.item()), mod(i, t, s, b))


def test_modules_call_the_genext_ops(monkeypatch):
    """Every local computation is one call of the genext op, and the module itself runs no
    matrix product: no N x N logits outside the ops in forward or backward."""
    calls = []

    def spy_on(name):
        real = getattr(genext.ops, name)

        def spy(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(genext.ops, name, spy)

    spy_on("clip_loss")
    spy_on("siglip_loss")

    class NoMatmul(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func.overloadpacket not in (
                torch.ops.aten.mm,
                torch.ops.aten.addmm,
                torch.ops.aten.bmm,
                torch.ops.aten.matmul,
            ), func
            return func(*args, **(kwargs or {}))

    i, t, s, b = (x.requires_grad_() for x in _inputs(300, 16))
    with NoMatmul():
        ClipLoss()(i, t, s, b).backward()
        SigLipLoss()(i, t, s, b).backward()
    assert calls == ["clip_loss", "siglip_loss"]


def test_bad_inputs():
    i, t, s, b = _inputs(6, 4)
    with pytest.raises(ValueError, match="same number of rows"):
        ClipLoss()(i, t[:5], s)
    with pytest.raises(ValueError, match="same number of rows"):
        SigLipLoss()(i, t[:5], s, b)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        ClipLoss()(i[0], t[0], s)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(NotImplementedError, match="horovod"):
        ClipLoss(use_horovod=True)
    assert SigLipLoss().dist_impl == "bidir"  # open_clip's default


def test_torch_compile_clip_local():
    mod = ClipLoss()
    compiled = torch.compile(mod, fullgraph=True)
    x = _inputs(37, 24, scale=30.0)
    loss, grads = _value_and_grads(compiled, x, True)
    e_loss, e_grads = _value_and_grads(mod, x, True)
    torch.testing.assert_close(loss, e_loss, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, e_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


# ---- torch.distributed -------------------------------------------------------------------------

CLIP_MODES = [(local, gwg) for local in (False, True) for gwg in (False, True)]
SIGLIP_MODES = list(SigLipLoss.DIST_IMPLS)
N_PER_RANK, D_DIST = 5, 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(loss_fn, x, rank, n):
    """Rank `rank`'s share of the concatenated batch x as fresh leaves; loss and gradients."""
    i, t, s, b = x
    leaves = [
        i[rank * n : (rank + 1) * n].clone().requires_grad_(),
        t[rank * n : (rank + 1) * n].clone().requires_grad_(),
        s.clone().requires_grad_(),
        b.clone().requires_grad_(),
    ]
    loss = loss_fn(*leaves)
    loss.backward()
    return {"loss": loss.detach(), "grads": [v.grad for v in leaves]}


def _dist_worker(rank, world, port, x, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    oc = _load_open_clip_loss()
    n = x[0].shape[0] // world
    out = {}
    try:
        for local, gwg in CLIP_MODES:
            kw = dict(local_loss=local, gather_with_grad=gwg, rank=rank, world_size=world)
            out["clip", local, gwg] = _run_rank(ClipLoss(**kw), x, rank, n)
            if oc is not None:
                out["oc_clip", local, gwg] = _run_rank(oc.ClipLoss(**kw), x, rank, n)
        for impl in SIGLIP_MODES:
            kw = dict(rank=rank, world_size=world, dist_impl=impl)
            out["siglip", impl] = _run_rank(SigLipLoss(**kw), x, rank, n)
            if oc is not None:
                out["oc_siglip", impl] = _run_rank(oc.SigLipLoss(**kw), x, rank, n)
    finally:
        dist.destroy_process_group()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


# spawned gloo processes take seconds to start: the quick profile leaves the distributed losses out
@pytest.fixture(scope="module", params=[pytest.param(w, marks=pytest.mark.slow) for w in (2, 3)])
def dist_run(request):
    """Every mode on `world` gloo processes (float64, so semantic slips cannot hide in rounding):
    (world, the concatenated inputs, per-rank results). 3 ranks reach SigLIP's bidirectional
    exchange rounds; 2 ranks only its final one-way step."""
    world = request.param
    x = _inputs(world * N_PER_RANK, D_DIST, dtype=torch.float64, scale=12.0, bias=-3.0, seed=world)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_dist_worker, args=(world, _free_port(), x, out_dir), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    return world, x, ranks


def _single(loss_fn, x):
    """Loss and gradients (features, scale, bias) of one process on the whole batch."""
    leaves = [v.clone().requires_grad_() for v in x]
    loss = loss_fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves, allow_unused=True)


def _close(a, b):
    b = torch.zeros_like(a) if b is None else b
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _check_against_open_clip(ranks, ours, theirs):
    if _OC is None:
        return
    for r in ranks:
        _close(r[ours]["loss"], r[theirs]["loss"])
        for g, e in zip(r[ours]["grads"], r[theirs]["grads"]):
            _close(g, e)


@pytest.mark.parametrize("local_loss,gather_with_grad", CLIP_MODES)
def test_distributed_clip(dist_run, local_loss, gather_with_grad):
    """Rank r's loss and feature gradients against one process on the concatenated batch:
    - local_loss off: every rank's loss is the global loss L;
      on: rank r's loss is 0.5 * (mean CE of its image rows + mean CE of its text rows), and the
      mean over ranks is L.
    - gather_with_grad on: gradients flow back through the gather and are summed over the ranks'
      losses, so rank r's features get world * dL/d(its features) (what DDP's averaging expects).
    - gather_with_grad off, local_loss off: the rank's own slot is live, so exactly dL/d(its
      features).
    - gather_with_grad off, local_loss on: the gathered copies are constants, so only the
      queries' path: world * dL_split/d(its features), where L_split uses the images only as rows
      of image->text and the texts only as rows of text->image.
    - logit_scale, logit_bias: the mean over ranks of their gradients is the single process's."""
    world, x, ranks = dist_run
    n = N_PER_RANK
    key = ("clip", local_loss, gather_with_grad)
    ref_loss, ref_grads = _single(_ref_clip, x)
    if local_loss and not gather_with_grad:

        def split(i, t, s, b):
            logits_it = _logits(i, t.detach(), s, b)
            logits_ti = _logits(t, i.detach(), s, b)
            labels = torch.arange(i.shape[0])
            return 0.5 * (F.cross_entropy(logits_it, labels) + F.cross_entropy(logits_ti, labels))

        _, feature_grads = _single(split, x)
    else:
        feature_grads = ref_grads
    factor = 1 if not (local_loss or gather_with_grad) else world
    rows, cols = _ref_clip_terms(*x)
    for r, res in enumerate(ranks):
        part = slice(r * n, (r + 1) * n)
        expected = (0.5 * (rows[part].mean() + cols[part].mean())) if local_loss else ref_loss
        _close(res[key]["loss"], expected)
        for k in range(2):
            _close(res[key]["grads"][k], factor * feature_grads[k][part])
    _close(sum(res[key]["loss"] for res in ranks) / world, ref_loss)
    for k in (2, 3):
        _close(sum(res[key]["grads"][k] for res in ranks) / world, ref_grads[k])
    _check_against_open_clip(ranks, key, ("oc_clip", local_loss, gather_with_grad))


@pytest.mark.parametrize("dist_impl", SIGLIP_MODES)
def test_distributed_siglip(dist_run, dist_impl):
    """Rank r's loss is the sum over its image rows against every rank's texts divided by its
    batch, so the mean over ranks is the single-process loss L; the texts travel with gradients
    (exchange, all_reduce or all_gather), so rank r's features get world * dL/d(its features);
    scale and bias gradients average to the single process's."""
    world, x, ranks = dist_run
    n = N_PER_RANK
    key = ("siglip", dist_impl)
    ref_loss, ref_grads = _single(_ref_siglip, x)
    i, t, s, b = x
    z = 2 * torch.eye(world * n, dtype=i.dtype) - 1
    per_row = -F.logsigmoid(z * _logits(i, t, s, b)).sum(1)
    for r, res in enumerate(ranks):
        part = slice(r * n, (r + 1) * n)
        _close(res[key]["loss"], per_row[part].sum() / n)
        for k in range(2):
            _close(res[key]["grads"][k], world * ref_grads[k][part])
    _close(sum(res[key]["loss"] for res in ranks) / world, ref_loss)
    for k in (2, 3):
        _close(sum(res[key]["grads"][k] for res in ranks) / world, ref_grads[k])
    _check_against_open_clip(ranks, key, ("oc_siglip", dist_impl))
