"""genext.nn.VectorQuantizer: lookup against a float64 brute force, straight-through and loss
gradients, the EMA update against a float64 computation, Laplace smoothing, dead-code restart,
usage statistics, torch.distributed (2 gloo processes), vector-quantize-pytorch interop,
state_dict and torch.compile."""

from __future__ import annotations

import copy
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from genext import reference
from genext.nn import VectorQuantizer

# ---- float64 helpers ---------------------------------------------------------------------------


def brute_force(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"):
    """float64 distances (N, K) and argmin (ties to the smallest index, as torch.argmin)."""
    z, e = z.reshape(-1, codebook.shape[-1]).double(), codebook.double()
    scores = reference.vq_scores(z, e, metric)  # squared distances, or negated similarities
    d = 1 + scores if metric == "cosine" else scores.sqrt()
    return d, d.argmin(1)


def unambiguous(d: torch.Tensor, rel: float = 1e-5) -> torch.Tensor:
    """Rows whose two smallest float64 distances differ by more than fp32 rounding could explain."""
    if d.shape[1] < 2:
        return torch.ones(d.shape[0], dtype=torch.bool)
    two = d.topk(2, dim=1, largest=False).values
    return (two[:, 1] - two[:, 0]) > rel * (1 + two[:, 1].abs())


def manual_ema(vq: VectorQuantizer, z: torch.Tensor):
    """One training step's codebook statistics, in float64, from vq's current state."""
    cosine = vq.metric == "cosine"
    flat = z.reshape(-1, vq.dim).double()
    if cosine:
        flat = F.normalize(flat, dim=-1)
    _, idx = brute_force(flat, vq.embed, vq.metric)
    K, decay, eps = vq.codebook_size, vq.decay, vq.epsilon
    counts = torch.bincount(idx, minlength=K).double()
    sums = torch.zeros(K, vq.dim, dtype=torch.float64).index_add_(0, idx, flat)
    cs = decay * vq.cluster_size.double() + (1 - decay) * counts
    avg = decay * vq.embed_avg.double() + (1 - decay) * sums
    n = cs.sum()
    smoothed = (cs + eps) / (n + K * eps) * n
    embed = avg / smoothed[:, None]
    if cosine:
        embed = F.normalize(embed, dim=-1)
    return idx, counts, cs, avg, embed


def make_vq(dim=12, k=37, **kw) -> VectorQuantizer:
    return VectorQuantizer(dim, k, **kw)


# ---- lookup ------------------------------------------------------------------------------------

# (leading shape, D, K): each case says why it is there.
LOOKUP_CASES = [
    ((64,), 16, 32),  # plain (N, D)
    ((3, 17), 13, 97),  # leading shape flattened; D = 13 not a multiple of 8, K = 97 prime
    ((2, 5, 7), 8, 1),  # K = 1: every index 0
    ((1025,), 3, 7),  # N one past a power of two
    ((0,), 8, 5),  # empty input
]


@pytest.mark.parametrize("lead,D,K", LOOKUP_CASES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_indices_equal_float64_argmin(device, lead, D, K, metric):
    # float64 on the CPU: every index must equal the brute force. float32 on CUDA: every row
    # whose two best float64 distances are not within fp32 rounding of each other.
    dtype = torch.float64 if device == "cpu" else torch.float32
    vq = make_vq(D, K, metric=metric, dtype=dtype, device=device).eval()
    z = (torch.randn(*lead, D, dtype=torch.float64) * 1.5 + 0.3).to(device, dtype)
    q, idx, loss = vq(z)
    d, ref = brute_force(z.cpu(), vq.embed.cpu(), metric)
    assert idx.dtype == torch.int64 and idx.shape == lead and q.shape == z.shape
    rows = torch.ones_like(ref, dtype=torch.bool) if dtype == torch.float64 else unambiguous(d)
    assert torch.equal(idx.cpu().reshape(-1)[rows], ref[rows])
    # the output is exactly the chosen (normalised, for cosine) codebook rows
    assert torch.equal(q, vq.codebook[idx])
    assert torch.equal(q, vq.indices_to_codes(idx))
    assert torch.isfinite(loss) and loss.dim() == 0


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_indices_float32_against_float64(device, metric):
    vq = make_vq(24, 256, metric=metric, device=device).eval()
    z = torch.randn(2048, 24, device=device)
    _, idx, _ = vq(z)
    d, ref = brute_force(z.cpu(), vq.embed.cpu(), metric)
    clear = unambiguous(d)
    assert clear.float().mean() > 0.99  # the comparison covers nearly every row
    assert torch.equal(idx.cpu()[clear], ref[clear])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input(dtype):
    # 16-bit z: the lookup runs on the codebook cast to z's dtype (the nearest of the codes as
    # they are output); the output has z's dtype; the EMA statistics stay float32.
    vq = make_vq(16, 40)
    z = torch.randn(3, 50, 16).to(dtype)
    cast = vq.embed.to(dtype)
    d, ref = brute_force(z, cast)
    q, idx, loss = vq(z)
    assert q.dtype == dtype and loss.dtype == dtype
    clear = unambiguous(d, rel=1e-3).reshape(3, 50)
    assert torch.equal(idx[clear], ref.reshape(3, 50)[clear])
    assert torch.equal(q, cast[idx])
    assert vq.embed.dtype == vq.cluster_size.dtype == torch.float32
    assert torch.equal(vq.last_counts, torch.bincount(idx.reshape(-1), minlength=40).float())
    assert torch.isfinite(vq.embed).all()


def test_duplicate_codes_tie_to_smallest_index():
    vq = make_vq(6, 8, dtype=torch.float64).eval()
    with torch.no_grad():
        vq.embed[5] = vq.embed[2]  # an exact duplicate: rows nearest to it must pick 2
        vq.embed[7] = vq.embed[2]
    z = vq.embed[[2, 2, 5, 7]] + 1e-3 * torch.randn(4, 6, dtype=torch.float64)
    _, idx, _ = vq(z)
    assert idx.tolist() == [2, 2, 2, 2]


def test_image_fmap_matches_channels_last():
    vq = make_vq(6, 16, accept_image_fmap=True, dtype=torch.float64).eval()
    flat = make_vq(6, 16, dtype=torch.float64).eval()
    flat.load_state_dict(vq.state_dict())
    x = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    q, idx, loss = vq(x)
    q2, idx2, loss2 = flat(x.permute(0, 2, 3, 1))
    assert idx.shape == (2, 5, 3) and q.shape == x.shape
    assert torch.equal(idx, idx2) and torch.equal(q, q2.permute(0, 3, 1, 2))
    assert torch.equal(vq.indices_to_codes(idx), q)
    torch.testing.assert_close(loss, loss2, rtol=0, atol=0)


def test_bad_inputs_raise():
    vq = make_vq(8, 4)
    with pytest.raises(ValueError, match=r"z must be \(\.\.\., 8\)"):
        vq(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating-point"):
        vq(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(8, 4, metric="dot")
    with pytest.raises(ValueError, match="codebook_size"):
        VectorQuantizer(8, 0)
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        VectorQuantizer(8, 4, accept_image_fmap=True)(torch.randn(2, 3, 4, 8))


# ---- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_straight_through_gradient(device, metric):
    dtype = torch.float64 if device == "cpu" else torch.float32
    vq = make_vq(10, 16, metric=metric, dtype=dtype, device=device)
    z = torch.randn(4, 9, 10, dtype=dtype, device=device, requires_grad=True)
    q, _, _ = vq(z)
    g = torch.randn_like(q)
    (gz,) = torch.autograd.grad(q, z, g)
    if metric == "l2":
        assert torch.equal(gz, g)  # d quantized / d z is the identity
    else:  # identity after the row normalisation: the normalisation's vector-Jacobian product
        (ref,) = torch.autograd.grad(F.normalize(z, dim=-1), z, g)
        torch.testing.assert_close(gz, ref)
    assert vq.embed.grad is None


def test_commitment_loss_gradient():
    w = 0.7
    vq = make_vq(5, 11, commitment_weight=w, dtype=torch.float64).eval()
    z = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    q, _, loss = vq(z)
    (gz,) = torch.autograd.grad(loss, z)
    manual = 2 * w * (z - q).detach() / z.numel()
    torch.testing.assert_close(loss, w * ((z - q) ** 2).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(gz, manual, rtol=1e-12, atol=1e-15)
    # numerically too (eval mode: the codebook does not move between evaluations)
    assert torch.autograd.gradcheck(lambda t: vq(t)[2], (z,), eps=1e-6, atol=1e-8)


def test_codebook_loss_gradient_without_ema():
    w = 0.25
    vq = make_vq(6, 9, use_ema=False, commitment_weight=w, dtype=torch.float64)
    assert isinstance(vq.embed, torch.nn.Parameter)
    z = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    q, idx, loss = vq(z)
    loss.backward()
    diff = (vq.embed[idx] - z).detach()
    # codebook loss mse(q, sg(z)): each code gets the sum over its rows of 2 (e - z) / numel
    manual_e = torch.zeros_like(vq.embed).index_add_(0, idx, 2 * diff / z.numel())
    torch.testing.assert_close(vq.embed.grad, manual_e, rtol=1e-12, atol=1e-15)
    # z sees only the commitment term (the output was not used)
    torch.testing.assert_close(z.grad, -2 * w * diff / z.numel(), rtol=1e-12, atol=1e-15)
    # the decoder's gradient reaches z only, never the codebook
    vq.zero_grad()
    q, _, _ = vq(z)
    q.sum().backward()
    assert vq.embed.grad is None or not vq.embed.grad.any()


def test_codebook_loss_gradient_numerical():
    vq = make_vq(4, 6, use_ema=False, commitment_weight=0.0, dtype=torch.float64).eval()
    z = torch.randn(15, 4, dtype=torch.float64)

    def loss_of(e):
        return torch.func.functional_call(vq, {"embed": e}, (z,))[2]

    e = vq.embed.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(loss_of, (e,), eps=1e-6, atol=1e-8)


# ---- EMA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ema_update_matches_float64(device, metric):
    vq = make_vq(12, 37, decay=0.8, metric=metric, device=device)
    for step in range(3):
        z = torch.randn(300, 12, device=device) * 2 + step
        idx_ref, counts, cs, avg, embed = manual_ema(copy.deepcopy(vq).cpu(), z.cpu())
        with torch.no_grad():
            embed_before = vq.codebook.clone()
            q, idx, _ = vq(z)
        assert torch.equal(idx.cpu(), idx_ref)
        assert torch.equal(q, embed_before[idx])  # output from the codebook before the update
        torch.testing.assert_close(vq.last_counts.cpu().double(), counts, rtol=0, atol=0)
        torch.testing.assert_close(vq.cluster_size.cpu().double(), cs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(vq.embed_avg.cpu().double(), avg, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vq.embed.cpu().double(), embed, rtol=1e-5, atol=1e-5)


def test_eval_and_no_ema_do_not_update_codebook():
    vq = make_vq(8, 16).eval()
    before = copy.deepcopy(vq.state_dict())
    vq(torch.randn(50, 8))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k
    learned = make_vq(8, 16, use_ema=False).train()
    e = learned.embed.detach().clone()
    learned(torch.randn(50, 8))
    assert torch.equal(learned.embed, e)  # only the optimizer moves a learnable codebook
    assert not torch.equal(learned.cluster_size, torch.ones(16))  # usage is still tracked


def test_laplace_smoothing():
    # decay 0: the statistics are this batch's. Unused codes have count 0 and sum 0: the smoothing
    # keeps their division finite (0 / (eps n / (n + K eps)) = 0) and the smoothed sizes sum to n.
    K, eps = 10, 1e-2
    vq = make_vq(3, K, decay=0.0, epsilon=eps, dtype=torch.float64)
    with torch.no_grad():
        vq.embed[5:] += 1e3  # codes 5..9 are never chosen
    z = torch.randn(64, 3, dtype=torch.float64)
    _, idx, _ = vq(z)
    counts = torch.bincount(idx, minlength=K).double()
    sums = torch.zeros(K, 3, dtype=torch.float64).index_add_(0, idx, z)
    n = counts.sum()
    smoothed = (counts + eps) / (n + K * eps) * n
    torch.testing.assert_close(smoothed.sum(), n)
    assert torch.isfinite(vq.embed).all()
    assert torch.equal(vq.embed[5:], torch.zeros(5, 3, dtype=torch.float64))
    torch.testing.assert_close(vq.embed, sums / smoothed[:, None], rtol=1e-13, atol=0)
    # used codes sit slightly inside their cluster's mean (shrunk by the smoothing), not on it
    used = counts > 0
    mean = sums[used] / counts[used, None]
    assert not torch.allclose(vq.embed[used], mean, rtol=1e-9, atol=0)
    torch.testing.assert_close(vq.embed[used], mean, rtol=1e-2, atol=1e-3)


def _dead_setup(K=12, N=40, **kw):
    vq = make_vq(4, K, decay=0.5, dead_code_threshold=1.0, dtype=torch.float64, **kw)
    dead = torch.tensor([3, 7, 8])
    with torch.no_grad():
        vq.cluster_size.fill_(10.0)
        vq.cluster_size[dead] = 0.1  # 0.5 * 0.1 + 0.5 * 0 < 1 after the update: dead
        vq.embed[dead] += 1e3  # and never chosen
        vq.embed_avg.copy_(vq.embed * vq.cluster_size[:, None])
    z = torch.randn(N, 4, dtype=torch.float64)
    return vq, dead, z


def test_dead_code_restart_replaces_exactly_the_dead_codes():
    vq, dead, z = _dead_setup()
    ref = copy.deepcopy(vq)
    ref.dead_code_threshold = 0.0
    ref(z)
    vq(z)
    alive = torch.ones(vq.codebook_size, dtype=torch.bool)
    alive[dead] = False
    # live codes: the plain EMA update
    assert torch.equal(vq.embed[alive], ref.embed[alive])
    assert torch.equal(vq.cluster_size[alive], ref.cluster_size[alive])
    # dead codes: distinct rows of this batch, reset statistics
    new = vq.embed[dead]
    match = (new[:, None, :] == z[None, :, :]).all(-1)  # (dead, N)
    assert (match.sum(1) >= 1).all()
    rows = match.float().argmax(1)
    assert rows.unique().numel() == dead.numel()
    assert torch.equal(vq.cluster_size[dead], torch.full((3,), 1.0, dtype=torch.float64))
    assert torch.equal(vq.embed_avg[dead], new * 1.0)


def test_dead_code_restart_more_dead_than_rows_and_cosine():
    vq, dead, z = _dead_setup(N=2)
    vq(z)
    restarted = vq.cluster_size[dead] == 1.0
    assert restarted.sum() == 2  # two rows: two of the three dead codes now, one later
    assert ((vq.embed[dead][restarted][:, None] == z[None]).all(-1).any(1)).all()
    # cosine: a restarted code is the normalised batch row
    vq, dead, z = _dead_setup(metric="cosine", reset_cluster_size=2.0)
    with torch.no_grad():
        vq.embed.copy_(F.normalize(torch.randn_like(vq.embed), dim=-1))
        vq.embed[dead] = vq.embed[0].clone()  # duplicates of code 0: ties go to 0, never chosen
    vq(z)
    zn = F.normalize(z, dim=-1)
    assert ((vq.embed[dead][:, None] - zn[None]).abs().amax(-1) < 1e-15).any(1).all()
    assert torch.equal(vq.cluster_size[dead], torch.full((3,), 2.0, dtype=torch.float64))


# ---- usage statistics --------------------------------------------------------------------------


def test_perplexity_and_usage():
    vq = make_vq(4, 8)
    idx = torch.tensor([[0, 0], [1, 1]])
    torch.testing.assert_close(vq.perplexity(idx), torch.tensor(2.0))
    torch.testing.assert_close(vq.usage(idx), torch.tensor(0.25))
    torch.testing.assert_close(vq.perplexity(torch.arange(8).repeat(3)), torch.tensor(8.0))
    torch.testing.assert_close(vq.perplexity(torch.tensor([3, 3, 3])), torch.tensor(1.0))
    p = torch.tensor([3, 1]) / 4.0  # [0, 0, 0, 1]: exp of the entropy of (3/4, 1/4)
    ref = torch.exp(-(p * p.log()).sum())
    torch.testing.assert_close(vq.perplexity(torch.tensor([0, 0, 0, 5])), ref)
    torch.testing.assert_close(vq.perplexity(torch.empty(0, dtype=torch.int64)), torch.tensor(1.0))
    # default: the last training batch
    _, i, _ = vq(torch.randn(100, 4))
    torch.testing.assert_close(vq.last_counts, torch.bincount(i, minlength=8).float())
    torch.testing.assert_close(vq.perplexity(), vq.perplexity(i))
    torch.testing.assert_close(vq.usage(), vq.usage(i))


# ---- torch.distributed -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, state, parts, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        vq = VectorQuantizer(8, 16, decay=0.8)
        vq.load_state_dict(state)
        vq(parts[rank])
        first = {k: v.clone() for k, v in vq.state_dict().items()}
        # a second step with restarts (rank-local random draws): the ranks must still agree
        torch.manual_seed(1000 + rank)
        vq.dead_code_threshold = vq.reset_cluster_size = 3.0
        vq(parts[rank] * 0.5)
        torch.save(
            {"first": first, "second": vq.state_dict(), "perplexity": vq.perplexity()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_ema_equals_concatenated_batch():
    torch.manual_seed(0)
    single = VectorQuantizer(8, 16, decay=0.8)
    state = copy.deepcopy(single.state_dict())
    batch = torch.randn(60, 8)
    parts = list(torch.split(batch, [37, 23]))  # unequal shares
    single(batch)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_dist_worker, args=(2, _free_port(), state, parts, out_dir), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2))
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["first"][k], v, rtol=1e-6, atol=1e-6)
        assert torch.equal(r0["first"][k], r1["first"][k]), k
    torch.testing.assert_close(r0["perplexity"], r1["perplexity"], rtol=0, atol=0)
    restarted = r0["second"]["cluster_size"] == 3.0
    assert restarted.any()
    for k in r0["second"]:
        assert torch.equal(r0["second"][k], r1["second"][k]), k
    # the restarted codes are rows of rank 0's share (halved in the second step)
    new = r0["second"]["embed"][restarted]
    assert ((new[:, None] == parts[0][None] * 0.5).all(-1).any(1)).all()


# ---- vector-quantize-pytorch interop -----------------------------------------------------------


def _peer(**kw):
    vqp = pytest.importorskip(
        "vector_quantize_pytorch",
        reason="vector-quantize-pytorch not installed (interop tests; pip install it)",
    )
    torch.manual_seed(0)
    peer = vqp.VectorQuantize(**kw)
    with torch.no_grad():  # its default init is tiny kaiming-uniform codes: use data-like ones
        cb = peer._codebook
        cb.embed.copy_(torch.randn_like(cb.embed))
        if kw.get("use_cosine_sim"):
            cb.embed.copy_(F.normalize(cb.embed, dim=-1))
        cb.embed_avg.copy_(cb.embed)
        cb.cluster_size.uniform_(0.5, 2.0)
        cb.embed_avg.mul_(cb.cluster_size[..., None])
    return peer


@pytest.mark.parametrize("cosine", [False, True])
def test_interop_eval_same_indices_and_output(cosine):
    peer = _peer(
        dim=16, codebook_size=64, decay=0.9, commitment_weight=0.3, use_cosine_sim=cosine
    ).eval()
    ours = VectorQuantizer.from_vector_quantize_pytorch(peer)
    assert ours.metric == ("cosine" if cosine else "l2") and not ours.training
    assert ours.decay == 0.9 and ours.commitment_weight == 0.3
    x = torch.randn(4, 50, 16)
    q_p, i_p, _ = peer(x)
    q, i, _ = ours(x)
    d, _ = brute_force(F.normalize(x, dim=-1) if cosine else x, ours.embed, ours.metric)
    clear = unambiguous(d).reshape(4, 50)
    assert clear.float().mean() > 0.99
    assert torch.equal(i[clear], i_p[clear])
    assert torch.equal(q[clear], q_p[clear])
    # load_state_dict of the peer's state into a module built by hand
    by_hand = VectorQuantizer(
        16, 64, decay=0.9, commitment_weight=0.3, metric="cosine" if cosine else "l2"
    ).eval()
    by_hand.load_state_dict(peer.state_dict())
    assert torch.equal(by_hand(x)[1], i)
    assert torch.equal(by_hand.indices_to_codes(i), peer.get_codes_from_indices(i))


def test_interop_image_fmap():
    peer = _peer(dim=8, codebook_size=32, accept_image_fmap=True).eval()
    ours = VectorQuantizer.from_vector_quantize_pytorch(peer)
    x = torch.randn(2, 8, 6, 5)
    q_p, i_p, _ = peer(x)
    q, i, _ = ours(x)
    assert torch.equal(i, i_p) and torch.equal(q, q_p)


@pytest.mark.parametrize("dead", [0.0, 0.8])
def test_interop_train_step_same_ema_update(dead):
    peer = _peer(
        dim=16, codebook_size=64, decay=0.9, commitment_weight=0.3, threshold_ema_dead_code=dead
    ).train()
    ours = VectorQuantizer.from_vector_quantize_pytorch(peer)
    assert ours.training and ours.dead_code_threshold == dead
    for step in range(3):
        x = torch.randn(8, 40, 16) + 0.1 * step
        x_p = x.clone().requires_grad_()
        x_o = x.clone().requires_grad_()
        q_p, i_p, loss_p = peer(x_p)
        q, i, loss = ours(x_o)
        assert torch.equal(i, i_p)
        torch.testing.assert_close(q, q_p, rtol=1e-6, atol=1e-6)  # the peer's STE rounds
        torch.testing.assert_close(loss, loss_p, rtol=1e-6, atol=0)
        cb = peer._codebook
        # restarts draw different random rows: compare the codes neither side restarted
        same = (ours.cluster_size != ours.reset_cluster_size) | (dead == 0)
        same &= cb.cluster_size[0] != cb.reset_cluster_size
        assert same.float().mean() > 0.5
        torch.testing.assert_close(
            ours.cluster_size[same], cb.cluster_size[0][same], rtol=1e-6, atol=1e-6
        )
        torch.testing.assert_close(
            ours.embed_avg[same], cb.embed_avg[0][same], rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(ours.embed[same], cb.embed[0][same], rtol=1e-5, atol=1e-6)
        if dead:
            with torch.no_grad():  # resynchronise the restarted codes for the next step
                ours.load_state_dict(peer.state_dict())


def test_interop_unsupported_configuration_raises():
    peer = _peer(dim=16, codebook_size=8, heads=2, separate_codebook_per_head=True)
    with pytest.raises(ValueError, match="heads > 1"):
        VectorQuantizer.from_vector_quantize_pytorch(peer)
    peer = _peer(dim=16, codebook_size=8, codebook_dim=4)
    with pytest.raises(ValueError, match="projections"):
        VectorQuantizer.from_vector_quantize_pytorch(peer)


# ---- state_dict, torch.compile -----------------------------------------------------------------


@pytest.mark.parametrize("use_ema", [True, False])
def test_state_dict_round_trip(use_ema):
    vq = make_vq(6, 10, use_ema=use_ema, dead_code_threshold=0.5)
    for _ in range(3):
        vq(torch.randn(30, 6))
    sd = vq.state_dict()
    expected = {"embed", "cluster_size"} | ({"embed_avg"} if use_ema else set())
    assert set(sd) == expected
    other = make_vq(6, 10, use_ema=use_ema, dead_code_threshold=0.5)
    other.load_state_dict(sd)
    for k in sd:
        assert torch.equal(other.state_dict()[k], sd[k]), k
    vq.eval(), other.eval()
    z = torch.randn(20, 6)
    for a, b in zip(vq(z), other(z)):
        assert torch.equal(a, b)


def test_torch_compile_eval_fullgraph():
    vq = make_vq(16, 64).eval()
    z = torch.randn(3, 33, 16)
    compiled = torch.compile(vq, fullgraph=True)
    q, i, loss = compiled(z)
    q_e, i_e, loss_e = vq(z)
    assert torch.equal(i, i_e) and torch.equal(q, q_e)
    torch.testing.assert_close(loss, loss_e)


def test_torch_compile_train_ema_fullgraph():
    # the EMA step compiles into the graph too (buffers updated in place); dead-code restarts do
    # not (the number of dead codes is data-dependent) and distributed runs add collectives
    vq = make_vq(16, 64)
    eager = copy.deepcopy(vq)
    compiled = torch.compile(vq, fullgraph=True)
    for step in range(2):
        z = torch.randn(200, 16) + step
        before = vq.embed.clone()
        q, i, loss = compiled(z)
        q_e, i_e, loss_e = eager(z)
        # the compiled EMA arithmetic may round differently (fused), so the codebooks drift apart
        # by ~1e-7 after the first step
        assert torch.equal(i, i_e) and torch.equal(q, before[i])
        torch.testing.assert_close(q, q_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, loss_e, rtol=1e-5, atol=1e-7)
        for k, v in eager.state_dict().items():
            torch.testing.assert_close(vq.state_dict()[k], v, rtol=1e-5, atol=1e-6)


# ---- hostile arguments and non-finite input ----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"epsilon": -1.0}, ValueError, "epsilon"),
        ({"epsilon": 0.0}, ValueError, "epsilon"),
        ({"epsilon": float("nan")}, ValueError, "epsilon"),
        ({"decay": float("nan")}, ValueError, "decay"),
        ({"decay": 1.5}, ValueError, "decay"),
        ({"commitment_weight": -0.5}, ValueError, "commitment_weight"),
        ({"commitment_weight": float("inf")}, ValueError, "commitment_weight"),
        ({"dead_code_threshold": float("nan")}, ValueError, "dead_code_threshold"),
        ({"reset_cluster_size": -1.0}, ValueError, "reset_cluster_size"),
        ({"dim": 0}, ValueError, "dim must be positive"),
        ({"dim": 2.5}, TypeError, "dim must be an int"),
        ({"codebook_size": True}, TypeError, "codebook_size must be an int"),
        ({"dtype": torch.int64}, TypeError, "dtype must be a floating-point"),
    ],
)
def test_constructor_validates_arguments(kwargs, exc, match):
    args = {"dim": 8, "codebook_size": 4, **kwargs}
    with pytest.raises(exc, match=f"VectorQuantizer: {match}"):
        VectorQuantizer(**args)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nonfinite_rows_give_a_learned_codebook_no_gradient(device, metric):
    # without EMA the codebook learns from its loss: a NaN or inf row must not reach its gradient
    # (the next optimiser step would write NaN into the code), and the finite rows' gradient is
    # the one they give alone
    vq = VectorQuantizer(6, 9, metric=metric, use_ema=False, commitment_weight=0.0).to(device)
    z = torch.randn(40, 6, device=device)
    vq(z[:38])[2].backward()
    alone = vq.embed.grad.clone()
    vq.embed.grad = None
    bad = z.clone()
    bad[38, 1], bad[39, 0] = float("nan"), float("inf")
    loss = vq(bad)[2]
    loss.backward()
    assert torch.isfinite(vq.embed.grad).all()
    torch.testing.assert_close(vq.embed.grad * 40 / 38, alone, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nonfinite_rows_left_out_of_ema(device, metric):
    # one NaN and one inf row in a training batch: the codebook update is that of the finite
    # rows alone, and the module counts the two rows it left out
    vq = make_vq(6, 9, metric=metric, device=device)
    z = torch.randn(50, 6, dtype=torch.float64)
    finite = z.clone()
    z[7, 2] = float("nan")
    z[30, 0] = float("inf")
    keep = torch.ones(50, dtype=torch.bool)
    keep[[7, 30]] = False
    want = manual_ema(vq.cpu(), finite[keep])
    vq.to(device)(z.to(device, torch.float32))
    _, counts, cs, avg, embed = want
    assert vq.nonfinite_rows.item() == 2
    assert torch.isfinite(vq.embed).all() and torch.isfinite(vq.embed_avg).all()
    torch.testing.assert_close(vq.last_counts.double().cpu(), counts)
    torch.testing.assert_close(vq.cluster_size.double().cpu(), cs)
    torch.testing.assert_close(vq.embed.double().cpu(), embed, rtol=1e-5, atol=1e-6)
    vq(torch.full((3, 6), float("nan"), device=device))
    assert vq.nonfinite_rows.item() == 5 and torch.isfinite(vq.embed).all()


def test_nonfinite_rows_never_restart_dead_codes():
    vq = make_vq(4, 16, dead_code_threshold=2.0, decay=0.0)  # nearly every code dies at once
    z = torch.full((20, 4), float("nan"))
    z[:2] = torch.randn(2, 4)
    vq(z)
    assert torch.isfinite(vq.embed).all() and torch.isfinite(vq.embed_avg).all()
    assert vq.nonfinite_rows.item() == 18
