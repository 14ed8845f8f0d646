"""Fuzz cases of vq_nearest, vq_ema_update and the VectorQuantizer module: leading shapes with 0
and 1 sizes, every layout, duplicate codes (ties), NaN/inf in inputs and codebook, indices at and
past their limits, meta mixes."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import genext
from genext import reference

from fuzz_harness import (
    LAYOUTS,
    STRUCTURAL,
    VALID,
    VALUE,
    assert_matches,
    call,
    check_meta,
    floats,
    make,
    mutations,
    non_finite,
    reseed,
    sizes,
)

FLOATS = floats("vq_nearest")


@st.composite
def nearest_cases(draw):
    reseed(draw)
    dtype = draw(st.sampled_from(FLOATS))
    lead = draw(sizes(draw(st.integers(1, 3)), hi=6))
    d = draw(st.integers(1, 9))
    k = draw(st.integers(1, 9))
    z = draw(non_finite(make((*lead, d), dtype, draw(st.sampled_from(LAYOUTS))), p=0.2))
    codebook = draw(non_finite(make((k, d), dtype, draw(st.sampled_from(LAYOUTS))), p=0.1))
    metric = draw(st.sampled_from(("l2", "cosine")))
    verdict, why = VALID, ""
    mutation = draw(mutations("empty_codebook", "d", "dtype", "d0", "int"))
    if mutation == "empty_codebook":
        codebook = make((0, d), dtype)
        verdict, why = STRUCTURAL, "K = 0"
    elif mutation == "d":
        codebook = make((k, d + 1), dtype)
        verdict, why = STRUCTURAL, "D mismatch"
    elif mutation == "dtype":
        other = torch.float64 if dtype != torch.float64 else torch.float32
        codebook = make((k, d), other)
        verdict, why = STRUCTURAL, f"codebook {other}"
    elif mutation == "d0":
        z, codebook = make((*lead, 0), dtype), make((k, 0), dtype)
        verdict, why = STRUCTURAL, "D = 0"
    elif mutation == "int":
        z, codebook = make((*lead, d), torch.int64), make((k, d), torch.int64)
        verdict, why = STRUCTURAL, "int64"
    desc = (
        f"z {tuple(z.shape)} {z.dtype} strides {z.stride()} codebook {tuple(codebook.shape)} "
        f"{codebook.dtype} strides {codebook.stride()} {metric} {why}"
    )
    return z, codebook, metric, verdict, desc


@given(nearest_cases())
def test_nearest(case):
    z, codebook, metric, verdict, desc = case
    res = call("vq_nearest", lambda: genext.ops.vq_nearest(z, codebook, metric), verdict, desc)
    if res is not None:
        idx, dist = res
        assert idx.dtype == torch.int64 and idx.shape == z.shape[:-1], desc
        zf, cf = z.reshape(-1, z.shape[-1]).double(), codebook.double()
        ref_idx, ref_dist = reference.vq_nearest(zf, cf, metric)
        # 16-bit inputs are compared in float32 by the kernel, exactly as rounded: the float64
        # reference of the same rounded values applies
        assert_matches(dist.reshape(-1), ref_dist, dist.dtype, f"vq_nearest distances {desc}")
        idx = idx.reshape(-1)
        if idx.numel():
            assert ((idx >= 0) & (idx < codebook.shape[0])).all(), f"index out of range {desc}"
            # the op's rule: a NaN score never wins; among the rest the smallest (within rounding
            # of the kernel's fp32 arithmetic), an infinite one only when nothing finite is left;
            # a row whose every score is NaN gets index 0
            scores = reference.vq_scores(zf, cf, metric)
            key = scores.masked_fill(scores.isnan(), float("inf"))
            picked = key.gather(1, idx[:, None])[:, 0]
            best = key.min(1).values
            fin = best.isfinite()
            tol = (1e-4 if z.dtype != torch.float64 else 1e-9) * (1 + best.abs())
            assert (picked[fin] - best[fin] <= tol[fin]).all(), f"not the nearest {desc}"
            all_nan = scores.isnan().all(1)
            assert (idx[all_nan] == 0).all(), f"an all-NaN row's index is not 0 {desc}"
            rest = ~fin & ~all_nan
            assert (picked[rest] == float("inf")).all(), f"a NaN score won {desc}"
    check_meta(
        "vq_nearest",
        lambda a, b: genext.ops.vq_nearest(a, b, metric),
        (z, codebook),
        verdict,
        res,
        desc,
    )


@st.composite
def ema_cases(draw):
    reseed(draw)
    dtype = draw(st.sampled_from(FLOATS))
    lead = draw(sizes(draw(st.integers(1, 2)), hi=7))
    d = draw(st.integers(1, 6))
    k = draw(st.integers(1, 6))
    z = draw(non_finite(make((*lead, d), dtype, draw(st.sampled_from(LAYOUTS)))))
    idx_dtype = draw(st.sampled_from((torch.int64, torch.int32)))
    indices = torch.randint(0, k, lead).to(idx_dtype)
    verdict, why = VALID, ""
    mutation = draw(mutations("past", "negative", "k0", "float_idx", "shape"))
    n = indices.numel()
    if mutation == "past" and n:
        indices.view(-1)[draw(st.integers(0, n - 1))] = k
        verdict, why = VALUE, "index == num_codes"
    elif mutation == "negative" and n:
        indices.view(-1)[draw(st.integers(0, n - 1))] = -1
        verdict, why = VALUE, "index -1"
    elif mutation == "k0":
        k = draw(st.sampled_from((0, -3)))
        verdict, why = STRUCTURAL, f"num_codes {k}"
    elif mutation == "float_idx":
        indices = indices.float()
        verdict, why = STRUCTURAL, "float indices"
    elif mutation == "shape":
        indices = torch.zeros(n + 1, dtype=idx_dtype)
        verdict, why = STRUCTURAL, "indices of N+1"
    desc = (
        f"indices {tuple(indices.shape)} {indices.dtype} z {tuple(z.shape)} {z.dtype} K={k} {why}"
    )
    return indices, z, k, verdict, desc


@given(ema_cases(), st.booleans())
def test_ema_update(case, deterministic):
    indices, z, k, verdict, desc = case
    op = lambda i, x: genext.ops.vq_ema_update(i, x, k, deterministic)  # noqa: E731
    res = call("vq_ema_update", lambda: op(indices, z), verdict, desc)
    if res is not None:
        counts, sums = res
        ref_counts, ref_sums = reference.vq_ema_update(indices, z.double(), k)
        assert_matches(counts, ref_counts, torch.float64, f"counts {desc}")
        assert_matches(sums, ref_sums, z.dtype, f"sums {desc}")
    check_meta("vq_ema_update", op, (indices, z), verdict, res, desc)


@given(
    st.integers(1, 6),
    st.integers(1, 8),
    sizes(2, hi=5),
    st.sampled_from(("l2", "cosine")),
    st.booleans(),
    st.floats(0, 1),
    st.integers(0, 2**31 - 1),
)
def test_module_state_stays_finite(dim, k, lead, metric, use_ema, p_bad, seed):
    """A training step on a batch with non-finite rows never leaves a non-finite code behind
    (whether the module skips those rows or raises, it must not poison its state)."""
    torch.manual_seed(seed)
    vq = genext.nn.VectorQuantizer(dim, k, metric=metric, use_ema=use_ema).train()
    z = make((*lead, dim), torch.float32)
    if z.numel() and p_bad > 0.5:
        z.view(-1)[0] = float("nan")
    before = vq.codebook.detach().clone()
    desc = f"VectorQuantizer({dim}, {k}, {metric}, use_ema={use_ema}) z {tuple(z.shape)}"
    try:
        out, idx, loss = vq(z)
    except (ValueError, RuntimeError) as e:
        assert "VectorQuantizer" in str(e), f"{desc}: {e!r}"
    else:
        assert idx.shape == z.shape[:-1], desc
        ok = z.isfinite().all(-1)
        assert torch.equal(out[ok], before[idx[ok]]), desc
    assert vq.embed.isfinite().all(), f"{desc}: the codebook became non-finite"
    assert vq.cluster_size.isfinite().all(), f"{desc}: cluster sizes became non-finite"
