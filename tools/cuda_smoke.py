"""A few small CUDA calls of every genext op, checked against the float64 reference.

Small on purpose: tools/gpu_check.sh runs it under compute-sanitizer (memcheck, racecheck), where
every kernel is many times slower. Exits non-zero on a wrong result.
"""

from __future__ import annotations

import sys

import torch

import genext
from genext import reference

CASES = [  # (shape, groups, channels_last, dtype): one per kernel path
    ((1, 64, 96, 96), 32, False, torch.float16),  # few groups: split-group path
    ((1, 64, 96, 96), 32, True, torch.bfloat16),  # split path, channels-last
    ((4, 64, 9, 7), 8, False, torch.float32),  # small odd groups
    ((16, 96, 8, 8), 32, False, torch.float16),  # many small groups: one block per group
    ((2, 40, 33), 5, True, torch.float32),  # rank 3, channels-last, C/G = 8
    ((1, 6, 5, 7, 3), 2, False, torch.float16),  # rank 5, odd sizes
]


def gn_cases() -> int:
    bad = 0
    for shape, g, cl, dtype in CASES:
        x = (torch.randn(shape, device="cuda", dtype=torch.float64) * 2 + 1).to(dtype)
        if cl:
            x = (
                x.to(memory_format=torch.channels_last)
                if x.dim() == 4
                else x.transpose(1, 2).contiguous().transpose(1, 2)
            )
        x.requires_grad_()
        w = (torch.rand(shape[1], device="cuda") + 0.5).to(dtype).requires_grad_()
        b = (torch.rand(shape[1], device="cuda") - 0.5).to(dtype).requires_grad_()
        gy = torch.randn_like(x)
        y = genext.ops.group_norm_silu(x, g, w, b)
        grads = torch.autograd.grad(y, (x, w, b), gy)
        xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
        yr = reference.group_norm_silu(xd, g, wd, bd)
        rgrads = torch.autograd.grad(yr, (xd, wd, bd), gy.double())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for name, o, r in [("y", y, yr)] + list(zip(("dx", "dw", "db"), grads, rgrads)):
            err = ((o.double() - r).norm() / r.norm()).item()
            ok = bool(torch.isfinite(o).all()) and err < tol
            bad += not ok
            print(
                f"{'ok  ' if ok else 'FAIL'} {str(shape):<20} g={g:<3} cl={cl!s:<5} {str(dtype):<15} "
                f"{name:<3} rel err {err:.2e}"
            )
    torch.cuda.synchronize()
    return bad


FA_CASES = [  # (B, Hq, Hk, Lq, Lk, D, causal, dtype): tile edges, GQA, both causal alignments
    (2, 4, 2, 97, 77, 64, False, torch.float16),
    (1, 2, 2, 130, 130, 40, True, torch.bfloat16),
    (1, 2, 1, 33, 65, 256, True, torch.bfloat16),
    (1, 2, 2, 70, 20, 128, True, torch.float16),  # Lq > Lk: the first rows see no key
    (1, 2, 2, 17, 17, 72, False, torch.float32),
]


def _attention_ref(q, k, v, causal, scale):
    """float64 attention on (B, H, L, D); bottom-right causal; rows with no key give 0."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        lq, lk = q.shape[2], k.shape[2]
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (lk - lq), float("-inf"))
    return torch.nan_to_num(torch.softmax(s, -1), nan=0.0) @ v


def fa_cases() -> int:
    bad = 0
    for b, hq, hk, lq, lk, d, causal, dtype in FA_CASES:
        q = torch.randn(b, hq, lq, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(b, hk, lk, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(b, hk, lk, d, device="cuda", dtype=dtype, requires_grad=True)
        go = torch.randn(b, hq, lq, d, device="cuda", dtype=dtype)
        out = genext.ops.flash_attention(q, k, v, causal=causal)
        grads = torch.autograd.grad(out, (q, k, v), go)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = _attention_ref(qd, kd, vd, causal, d**-0.5)
        rgrads = torch.autograd.grad(ref, (qd, kd, vd), go.double())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for name, o, r in [("out", out, ref)] + list(zip(("dq", "dk", "dv"), grads, rgrads)):
            den = r.norm().item()
            err = (o.double() - r).norm().item() / (den if den > 0 else 1.0)
            ok = bool(torch.isfinite(o).all()) and err < tol
            bad += not ok
            print(
                f"{'ok  ' if ok else 'FAIL'} attention B{b} H{hq}/{hk} L{lq}/{lk} D{d} "
                f"causal={causal!s:<5} {str(dtype):<15} {name:<3} rel err {err:.2e}"
            )
    torch.cuda.synchronize()
    return bad


KV_CASES = [  # (B, Hq, Hk, Lq, D, capacity, block_size or None, dtype)
    (3, 8, 2, 1, 128, 300, None, torch.bfloat16),
    (3, 8, 2, 4, 64, 320, 16, torch.float16),
    (2, 4, 4, 16, 80, 200, None, torch.float32),
]


def kv_cases() -> int:
    """attention_with_kvcache with append: lengths 0, 1 and near capacity; paged and contiguous."""
    bad = 0
    for b, hq, hk, lq, d, cap, bs, dtype in KV_CASES:
        lens = torch.tensor([0, 1, cap - lq][:b], dtype=torch.int32, device="cuda")
        q = torch.randn(b, lq, hq, d, device="cuda", dtype=dtype)
        kn = torch.randn(b, lq, hk, d, device="cuda", dtype=dtype)
        vn = torch.randn(b, lq, hk, d, device="cuda", dtype=dtype)
        if bs is None:
            kc = torch.randn(b, cap, hk, d, device="cuda", dtype=dtype)
            vc = torch.randn(b, cap, hk, d, device="cuda", dtype=dtype)
            table = None
        else:
            per = cap // bs
            kc = torch.randn(b * per, bs, hk, d, device="cuda", dtype=dtype)
            vc = torch.randn(b * per, bs, hk, d, device="cuda", dtype=dtype)
            table = torch.randperm(b * per, device="cuda").view(b, per).int()
        k0 = kc.clone()
        out = genext.ops.attention_with_kvcache(
            q, kc, vc, lens, kn, vn, causal=True, block_table=table
        )
        worst = 0.0
        for s in range(b):
            n = int(lens[s]) + lq
            pos = torch.arange(n, device="cuda")
            if table is None:
                ks, vs = kc[s, :n], vc[s, :n]
            else:
                blk = table[s, pos // bs].long()
                ks, vs = kc[blk, pos % bs], vc[blk, pos % bs]
            # the appended rows hold k_new / v_new exactly
            ok_app = torch.equal(ks[n - lq :], kn[s]) and torch.equal(vs[n - lq :], vn[s])
            bad += not ok_app
            rep = hq // hk
            kd = ks.double().repeat_interleave(rep, 1).transpose(0, 1)  # (Hq, n, D)
            vd = vs.double().repeat_interleave(rep, 1).transpose(0, 1)
            qd = q[s].double().transpose(0, 1)  # (Hq, Lq, D)
            sc = qd @ kd.transpose(1, 2) * d**-0.5
            i = torch.arange(lq, device="cuda")[:, None]
            j = torch.arange(n, device="cuda")[None, :]
            sc = sc.masked_fill(j > n - lq + i, float("-inf"))
            ref = (torch.softmax(sc, -1) @ vd).transpose(0, 1)
            err = ((out[s].double() - ref).norm() / ref.norm()).item()
            worst = max(worst, err)
        # nothing outside the appended rows changed
        changed = (kc != k0).any(dim=(-1, -2)).sum().item()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        ok = bool(torch.isfinite(out).all()) and worst < tol and changed <= b * lq
        bad += not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} kvcache B{b} H{hq}/{hk} Lq{lq} D{d} cap{cap} "
            f"paged={bs} {str(dtype):<15} rel err {worst:.2e} rows changed {changed}"
        )
    torch.cuda.synchronize()
    return bad


def attention_edge_cases() -> int:
    """Rejections before any launch and NaN propagation: a paged cache with block size 0 raises a
    ValueError (no kernel may divide by it); a NaN in one query row or one key gives NaN exactly in
    the rows that see it, for flash_attention (16-bit and fp32 kernels) and attention_with_kvcache
    (its splits merged), as the float64 reference does."""
    bad = 0
    c = torch.zeros(4, 0, 2, 16, device="cuda", dtype=torch.float16)
    q = torch.randn(2, 1, 4, 16, device="cuda", dtype=torch.float16)
    lens = torch.zeros(2, dtype=torch.int32, device="cuda")
    table = torch.zeros(2, 3, dtype=torch.int32, device="cuda")
    for check in (True, False):
        try:
            genext.ops.attention_with_kvcache(q, c, c, lens, block_table=table, check_values=check)
            ok = False
        except ValueError as e:
            ok = "block size" in str(e)
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} kvcache block size 0 rejected (check_values={check})")
    torch.cuda.synchronize()

    nan = float("nan")
    for dtype in (torch.float16, torch.float32):
        for causal in (False, True):
            q, k, v = (torch.randn(1, 2, 130, 64, dtype=torch.float64) for _ in range(3))
            q[0, 0, 5, 3] = nan  # one query row
            k[0, 1, 100, 7] = nan  # one key: with causal, rows 100 and later of head 1
            q, k, v = (t.to(dtype).double() for t in (q, k, v))
            ref = reference.attention_reference(q, k, v, causal)
            out = genext.ops.flash_attention(
                *(t.cuda().to(dtype) for t in (q, k, v)), causal=causal
            )
            ok = torch.equal(out.isnan().cpu(), ref.isnan())
            bad += not ok
            print(f"{'ok  ' if ok else 'FAIL'} attention NaN rows {str(dtype):<15} causal={causal}")
        # kvcache: B 2, 700 cached keys (several splits), a NaN key in sequence 1 only
        q = torch.randn(2, 1, 8, 64, dtype=torch.float64)
        kc, vc = (torch.randn(2, 700, 2, 64, dtype=torch.float64) for _ in range(2))
        kc[1, 650, 1, 5] = nan  # sequence 1, kv head 1: query heads 4..7
        q[0, 0, 2, 0] = nan  # sequence 0, query head 2
        q, kc, vc = (t.to(dtype).double() for t in (q, kc, vc))
        lens = torch.tensor([700, 690], dtype=torch.int32)
        ref = reference.attention_with_kvcache(q, kc, vc, lens)
        out = genext.ops.attention_with_kvcache(
            *(t.cuda().to(dtype) for t in (q, kc, vc)), lens.cuda()
        )
        ok = torch.equal(out.isnan().cpu(), ref.isnan())
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} kvcache NaN rows {str(dtype):<15}")
    torch.cuda.synchronize()
    return bad


def sampler_cases() -> int:
    """sampler_step on CUDA against its eager specification: bit-identical in fp32."""
    from genext.ops._sampler_step import StepKind, sampler_step
    from genext.reference import sampler_step as eager_step

    bad = 0
    g = torch.Generator().manual_seed(0)
    for mode, shape, guided, n_hist, noisy, dtype in [
        (StepKind.DDIM, (2, 4, 64, 64), True, 0, True, torch.float32),
        (
            StepKind.DPM,
            (2, 4, 33, 17),
            False,
            2,
            True,
            torch.float32,
        ),  # not a multiple of 4: scalar path
        (StepKind.DDPM, (3, 4, 16, 16), False, 0, True, torch.bfloat16),
        (StepKind.FLOW, (2, 16, 32, 32), True, 0, False, torch.float16),
    ]:

        def r(*s, dtype=dtype):
            return torch.randn(*s, generator=g).to("cuda", dtype)

        x = r(*shape)
        m = r(2 * shape[0], *shape[1:]) if guided else r(*shape)
        hist = [r(*shape) for _ in range(n_hist)]
        nz = r(*shape) if noisy else None
        coef = [0.9, 0.4, 1.0, 0.95, 0.3, 0.2, 0.0, 0.1, 1.7, 0.8, 0.4, 0.6]
        kw = dict(history=hist, noise=nz, guidance_scale=7.5 if guided else None)
        got = sampler_step(mode, x, m, coef, **kw)
        want = eager_step(mode, x, m, coef, **kw)
        ok = all(torch.equal(a, b) for a, b in zip(got, want))
        bad += not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} sampler {mode.name} {shape} guided={guided} hist={n_hist} "
            f"{str(dtype):<15} bit-identical to eager: {ok}"
        )
    torch.cuda.synchronize()
    return bad


def sampler_gn_limit_cases() -> int:
    """The sampler step's and group_norm_silu's limits on CUDA: outputs sharing memory with inputs
    are rejected before any launch (the buffers stay untouched), the in-place step still matches
    the eager specification, and a NaN or inf in group_norm_silu's input gives NaN exactly where
    the float64 reference does (its own group) and correct values elsewhere."""
    from genext.ops._sampler_step import StepKind, sampler_step
    from genext.reference import sampler_step as eager_step

    bad = 0
    g = torch.Generator().manual_seed(1)
    shape = (2, 4, 16, 16)

    def r(*s):
        return torch.randn(*s, generator=g).to("cuda")

    x, m, h1, nz = r(*shape), r(*shape), r(*shape), r(*shape)
    buf = r(2 * x.numel() + 1)
    n = x.numel()
    coef = [0.9, 0.4, 1.0, 0.95, 0.3, 0.2, 0.0, 0.1, 1.7, 0.8, 0.4, 0.6]
    fresh = torch.empty_like(x)
    for name, sample, out, x0 in [
        ("x0_out=sample", x, None, x),
        ("out=noise", x, nz, None),
        ("out=history[0]", x, h1, None),
        ("out=x0_out", x, fresh, fresh),
        ("out shifted over sample", buf[:n].view(shape), buf[1 : n + 1].view(shape), None),
    ]:
        keep = [t.clone() for t in (sample, m, h1, nz, buf)]
        torch.cuda.synchronize()
        try:
            sampler_step(StepKind.DPM, sample, m, coef, history=[h1], noise=nz, out=out, x0_out=x0)
            torch.cuda.synchronize()
            ok, why = False, "no error"
        except RuntimeError as e:
            torch.cuda.synchronize()
            untouched = all(torch.equal(a, b) for a, b in zip(keep, (sample, m, h1, nz, buf)))
            ok = "share memory" in str(e) and untouched
            why = f"raised, buffers untouched: {untouched}"
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} sampler sharing {name:<24} {why}")
    want = eager_step(StepKind.DPM, x, m, coef, history=[h1], noise=nz)
    y = x.clone()
    sampler_step(StepKind.DPM, y, m, coef, history=[h1], noise=nz, out=y)
    ok = torch.equal(y, want[0])
    bad += not ok
    print(
        f"{'ok  ' if ok else 'FAIL'} sampler in place (out = sample) bit-identical to eager: {ok}"
    )

    for shape, groups, cl, dtype in [
        ((2, 64, 24, 24), 32, False, torch.float16),
        ((1, 64, 96, 96), 32, True, torch.bfloat16),  # split-group path
        ((3, 40, 33), 5, False, torch.float32),
    ]:
        x = (torch.randn(shape, device="cuda", dtype=torch.float64) * 2 + 1).to(dtype)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        x[0, 1, 2] = float("nan")  # group 0 of sample 0
        x[-1, -1, -1] = float("inf")  # the last group of the last sample
        w = (torch.rand(shape[1], device="cuda") + 0.5).to(dtype)
        b = (torch.rand(shape[1], device="cuda") - 0.5).to(dtype)
        y = genext.ops.group_norm_silu(x, groups, w, b)
        ref = reference.group_norm_silu(x.double(), groups, w.double(), b.double())
        same_nan = torch.equal(torch.isnan(y), torch.isnan(ref))
        fin = torch.isfinite(ref)
        err = ((y[fin].double() - ref[fin]).norm() / ref[fin].norm()).item()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        ok = same_nan and bool(torch.isfinite(y[fin]).all()) and err < tol
        bad += not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} group_norm_silu NaN/inf input {str(shape):<16} "
            f"cl={cl!s:<5} {str(dtype):<15} NaN where the reference has NaN: {same_nan}, "
            f"rel err elsewhere {err:.2e}"
        )
    torch.cuda.synchronize()
    return bad


def vq_cases() -> int:
    """vq_nearest against the float64 argmin (near ties excepted) and vq_ema_update's sums."""
    bad = 0
    for n, k, d, dtype, cosine in [
        (300, 70, 40, torch.float32, False),
        (129, 33, 13, torch.bfloat16, False),
        (200, 64, 64, torch.float16, True),
    ]:
        z = torch.randn(n, d, device="cuda").to(dtype)
        cb = torch.randn(k, d, device="cuda").to(dtype)
        idx, dist = genext.ops.vq_nearest(z, cb, "cosine" if cosine else "l2")
        zd, cd = z.double(), cb.double()
        if cosine:
            score = -(
                torch.nn.functional.normalize(zd, dim=1)
                @ torch.nn.functional.normalize(cd, dim=1).T
            )
        else:
            score = ((zd[:, None] - cd[None]) ** 2).sum(-1)
        chosen = score.gather(1, idx.view(-1, 1)).squeeze(1)
        ok = bool((chosen <= score.min(1).values + 1e-4).all())
        counts, sums = genext.ops.vq_ema_update(idx, z, k, deterministic=not cosine)
        ref = torch.zeros(k, d, dtype=torch.float64, device="cuda").index_add_(0, idx, zd)
        ok &= torch.allclose(sums.double(), ref, atol=1e-3)
        ok &= torch.equal(counts.double(), torch.bincount(idx, minlength=k).double())
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} vq N{n} K{k} D{d} {str(dtype):<15} cosine={cosine}")
    torch.cuda.synchronize()
    return bad


def vq_contrastive_nonfinite_cases() -> int:
    """The non-finite rules on CUDA: NaN query rows get index 0 and distance NaN, NaN codebook
    rows are never picked (l2 and cosine, 16-bit and fp32); siglip_loss with logit_bias = +inf is
    +inf with the float64 loss's finite gradients."""
    bad = 0
    nan = float("nan")
    for n, k, d, dtype, metric in [
        (300, 70, 40, torch.float32, "l2"),
        (129, 33, 13, torch.bfloat16, "l2"),
        (200, 64, 64, torch.float16, "cosine"),
    ]:
        z = torch.randn(n, d, device="cuda").to(dtype)
        cb = torch.randn(k, d, device="cuda").to(dtype)
        z[[0, n // 2, n - 1], [1, 0, d - 1]] = nan
        cb[[0, k - 1], [2, 0]] = nan
        idx, dist = genext.ops.vq_nearest(z, cb, metric)
        nan_rows = torch.zeros(n, dtype=torch.bool, device="cuda")
        nan_rows[[0, n // 2, n - 1]] = True
        keep = torch.arange(1, k - 1, device="cuda")
        zd, cd = z.double(), cb[keep].double()
        if metric == "cosine":
            score = -(
                torch.nn.functional.normalize(zd, dim=1)
                @ torch.nn.functional.normalize(cd, dim=1).T
            )
        else:
            score = ((zd[:, None] - cd[None]) ** 2).sum(-1)
        good = ~nan_rows
        ok = bool((idx[nan_rows] == 0).all()) and bool(torch.isnan(dist[nan_rows]).all())
        ok &= bool(((idx[good] >= 1) & (idx[good] <= k - 2)).all())
        chosen = score[good].gather(1, (idx[good] - 1).view(-1, 1)).squeeze(1)
        ok &= bool((chosen <= score[good].min(1).values + 1e-3).all())
        ok &= bool(torch.isfinite(dist[good]).all())
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} vq NaN rows N{n} K{k} D{d} {str(dtype):<15} {metric}")
    i = torch.nn.functional.normalize(torch.randn(9, 16, device="cuda"), dim=1).requires_grad_()
    t = torch.nn.functional.normalize(torch.randn(9, 16, device="cuda"), dim=1).requires_grad_()
    s = torch.tensor(10.0, device="cuda", requires_grad=True)
    b = torch.tensor(float("inf"), device="cuda", requires_grad=True)
    loss = genext.ops.siglip_loss(i, t, s, b)
    grads = torch.autograd.grad(loss, (i, t, s, b))
    leaves = [x.detach().double().requires_grad_() for x in (i, t, s, b)]
    ref = reference.siglip_loss(*leaves)
    rgrads = torch.autograd.grad(ref, leaves)
    ok = loss.item() == ref.item() == float("inf")
    ok &= all(torch.allclose(g.double(), r, atol=1e-5) for g, r in zip(grads, rgrads))
    bad += not ok
    print(f"{'ok  ' if ok else 'FAIL'} siglip_loss logit_bias=inf: loss {loss.item()}")
    torch.cuda.synchronize()
    return bad


def contrastive_cases() -> int:
    """tiled_lse (rows and columns) against the float64 log-sum-exp, 16-bit features, sizes
    around the fused kernel's 64-row blocks and 64-feature chunks (the fused path when
    GENEXT_CONTRASTIVE_FUSED=1, else the composite)."""
    bad = 0
    for n, m, d, dtype in [(100, 150, 64, torch.bfloat16), (130, 65, 136, torch.float16)]:
        a = torch.randn(n, d, device="cuda").to(dtype)
        b = torch.randn(m, d, device="cuda").to(dtype)
        scale = torch.tensor(3.0, device="cuda")
        rows, cols = torch.ops.genext.tiled_lse.default(a, b, scale, None, True)
        logits = 3.0 * (a.double() @ b.double().T)
        for name, got, ref in (
            ("rows", rows, torch.logsumexp(logits, 1)),
            ("cols", cols, torch.logsumexp(logits, 0)),
        ):
            err = (got.double() - ref).abs().max().item()
            ok = err < 1e-3
            bad += not ok
            print(
                f"{'ok  ' if ok else 'FAIL'} tiled_lse N{n} M{m} D{d} {dtype} {name} err {err:.2e}"
            )
    torch.cuda.synchronize()
    return bad


def main(argv: list[str]) -> int:
    """Runs every op's cases, or those named: group_norm_silu, attention, kvcache,
    attention_edges, sampler, sampler_gn_limits, vq, vq_nonfinite, contrastive."""
    ops = {
        "group_norm_silu": gn_cases,
        "attention": fa_cases,
        "kvcache": kv_cases,
        "attention_edges": attention_edge_cases,
        "sampler": sampler_cases,
        "sampler_gn_limits": sampler_gn_limit_cases,
        "vq": vq_cases,
        "vq_nonfinite": vq_contrastive_nonfinite_cases,
        "contrastive": contrastive_cases,
    }
    wanted = argv or list(ops)
    bad = sum(ops[name]() for name in wanted)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
