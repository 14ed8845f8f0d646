"""The flash-attention CUDA kernels (csrc/flash_attention: the mma.sync forward, the dK/dV and dQ
backward, the fp32 kernels) under the CPU emulation (tests/cuda_emu/README.md), whose model of
ldmatrix and mma.sync (emu/cuda_emu.h) runs the tensor-core fragment layouts lane by lane. Built
for the head-dim tiles 64, 128 and 160 (emu_build.FA_TILES): output, lse and gradients against
the float64 reference with the op tests' rule (16-bit: at most twice the error of the same
attention computed step by step in that dtype), across tile tails, GQA and MQA, causal with
Lq > Lk and Lq < Lk, key padding and varlen; every input and output ends at a guard page. Both
backward paths: dQ in its own kernel, and dQ summed with atomics in the dK/dV kernel (whose
additions, one block after another here, meet in no particular order on a GPU). An emulation, not
a GPU run."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emu_build  # noqa: E402
from guard import guarded  # noqa: E402

from genext import reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attention_helpers import make_qkv  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from test_flash_attention import check_against_reference, grads, lse_error  # noqa: E402

# a build of about 30 s: the full profile (CI) runs these, the quick one the emulation's self-test
pytestmark = pytest.mark.slow

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def emu():
    return emu_build.load_or_skip("flash_attention")


def _run(emu, q, k, v, go, causal, scale, atomic_dq, seqused_k=None):
    """Out, lse, dq, dk, dv of the emulated kernels on (B, H, L, D) q, k, v, go."""
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    blhd = [guarded(t.transpose(1, 2)) for t in (q, k, v)]
    used = None if seqused_k is None else guarded(seqused_k)
    out, lse = emu.flash_attention_forward(*blhd, None, None, used, lq, lk, scale, causal, True)
    dq, dk, dv = emu.flash_attention_backward(
        guarded(go.transpose(1, 2)),
        *blhd,
        guarded(out),
        guarded(lse),
        None,
        None,
        used,
        lq,
        lk,
        scale,
        causal,
        True,
        atomic_dq,
    )
    return out.transpose(1, 2), lse, *(g.transpose(1, 2) for g in (dq, dk, dv))


def _check(got, q, k, v, go, causal, scale, seqused_k=None):
    dtype = q.dtype

    def ref_fn(q, k, v):
        return reference.attention_reference(
            q, k, v, causal, scale, bottom_right=True, seqused_k=seqused_k, return_lse=True
        )

    assert all(torch.isfinite(t).all() for t in got[:1] + got[2:]), "an element was not written"
    ref = grads(ref_fn, q.double(), k.double(), v.double(), go.double())
    pt = grads(ref_fn, q, k, v, go) if dtype != torch.float32 else [None] * 5
    check_against_reference(got[0], pt[0], ref[0], dtype, "out")
    ours_lse, ref_lse = lse_error(got[1], ref[1])
    pt_lse = None if pt[1] is None else pt[1][torch.isfinite(ref[1])]
    check_against_reference(ours_lse, pt_lse, ref_lse, dtype, "lse")
    for name, o, p, r in zip(("dq", "dk", "dv"), got[2:], pt[2:], ref[2:]):
        check_against_reference(o, p, r, dtype, name)


# (B, Hq, Hk, Lq, Lk, D, causal, scale): each case says why it is there. causal is bottom-right.
CASES = [
    (2, 4, 4, 17, 17, 40, False, None),  # L not a tile multiple; D = 40: tile 64, partial k-steps
    (1, 2, 2, 1, 1, 72, False, None),  # L = 1; D = 72 on the 128 tile
    (1, 3, 3, 1, 97, 64, True, None),  # one query against 97 keys (bottom-right: sees them all)
    (1, 4, 2, 97, 97, 128, True, None),  # GQA, causal, L prime
    (1, 4, 1, 97, 77, 72, False, 0.3),  # MQA cross-attention, 77 keys, a custom scale
    (1, 2, 2, 97, 33, 40, True, None),  # causal with Lq > Lk: the first 64 queries see no key
    (1, 2, 1, 17, 97, 160, True, None),  # causal with Lq < Lk; D = 160: split dK/dV launches
    (1, 1, 1, 257, 257, 64, True, None),  # several query and key tiles, tails of each
    (1, 2, 2, 150, 70, 128, False, None),  # two forward m-blocks, 32-key tiles with a tail
    (1, 2, 1, 70, 130, 152, False, None),  # D = 152 on the 160 tile
]
IDS = [f"B{c[0]}-H{c[1]}x{c[2]}-L{c[3]}x{c[4]}-D{c[5]}{'-causal' if c[6] else ''}" for c in CASES]


@pytest.mark.parametrize("atomic_dq", [False, True], ids=["dq-kernel", "dq-atomic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference(emu, case, dtype, atomic_dq):
    if atomic_dq and dtype == torch.float32:
        pytest.skip("the fp32 kernels have one backward")
    b, hq, hk, lq, lk, d, causal, scale = case
    torch.manual_seed(lq * 1000 + d)
    q, k, v = make_qkv(b, hq, hk, lq, lk, d, dtype, "cpu")
    go = torch.randn(b, hq, lq, d, dtype=torch.float64).to(dtype)
    got = _run(emu, q, k, v, go, causal, scale, atomic_dq)
    _check(got, q, k, v, go, causal, scale)
    if causal and lq > lk:  # queries i < Lq - Lk see no key: zero output and zero dq
        assert torch.equal(got[0][:, :, : lq - lk], torch.zeros_like(got[0][:, :, : lq - lk]))
        assert torch.equal(got[2][:, :, : lq - lk], torch.zeros_like(got[2][:, :, : lq - lk]))


@pytest.mark.parametrize("atomic_dq", [False, True], ids=["dq-kernel", "dq-atomic"])
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding(emu, causal, atomic_dq):
    # per-batch key lengths, one of them 0 (that entry's rows see nothing) and one past a tile
    b, h, lq, lk, d = 3, 2, 19, 90, 64
    q, k, v = make_qkv(b, h, h, lq, lk, d, torch.bfloat16, "cpu")
    go = torch.randn(b, h, lq, d).to(torch.bfloat16)
    used = torch.tensor([90, 0, 65], dtype=torch.int32)
    got = _run(emu, q, k, v, go, causal, None, atomic_dq, seqused_k=used)
    _check(got, q, k, v, go, causal, None, seqused_k=used)
    assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))
    assert torch.equal(got[3][2, :, 65:], torch.zeros_like(got[3][2, :, 65:]))


@pytest.mark.parametrize("atomic_dq", [False, True], ids=["dq-kernel", "dq-atomic"])
def test_varlen(emu, atomic_dq):
    # packed sequences: an empty query sequence, one without keys, rows past the last sequence;
    # GQA and causal; each sequence against the emulated kernels run on it alone
    lq, lk = [5, 0, 17, 1, 70], [7, 3, 0, 20, 66]
    hq, hk, d = 4, 2, 40
    cq, ck = [0, *itertools.accumulate(lq)], [0, *itertools.accumulate(lk)]
    cu_q, cu_k = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)
    tq, tk = sum(lq) + 3, sum(lk) + 2
    q = torch.randn(1, tq, hq, d).to(torch.bfloat16)
    k = torch.randn(1, tk, hk, d).to(torch.bfloat16)
    v = torch.randn(1, tk, hk, d).to(torch.bfloat16)
    go = torch.randn(1, tq, hq, d).to(torch.bfloat16)
    scale = d**-0.5
    g = [guarded(t) for t in (q, k, v)]
    out, lse = emu.flash_attention_forward(
        *g, guarded(cu_q), guarded(cu_k), None, max(lq), max(lk), scale, True, True
    )
    dq, dk, dv = emu.flash_attention_backward(
        guarded(go),
        *g,
        guarded(out),
        guarded(lse),
        guarded(cu_q),
        guarded(cu_k),
        None,
        max(lq),
        max(lk),
        scale,
        True,
        True,
        atomic_dq,
    )
    assert torch.equal(out[0, sum(lq) :], torch.zeros_like(out[0, sum(lq) :]))
    assert torch.equal(dk[0, sum(lk) :], torch.zeros_like(dk[0, sum(lk) :]))
    assert torch.equal(dq[0, sum(lq) :], torch.zeros_like(dq[0, sum(lq) :]))
    for s in range(len(lq)):
        rq, rk = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])
        if lq[s] == 0:  # keys nobody queries: zero gradients
            assert torch.equal(dk[0, rk], torch.zeros_like(dk[0, rk]))
            continue
        if lk[s] == 0:  # queries without keys: zero output and dq, lse -inf
            assert torch.equal(out[0, rq], torch.zeros_like(out[0, rq]))
            assert torch.equal(dq[0, rq], torch.zeros_like(dq[0, rq]))
            assert (lse[0, :, rq] == -math.inf).all()
            continue
        qs, ks, vs, gs = (t[:, r].transpose(1, 2) for t, r in ((q, rq), (k, rk), (v, rk), (go, rq)))
        got = (out[:, rq].transpose(1, 2), lse[:, :, rq], dq[:, rq].transpose(1, 2))
        got += (dk[:, rk].transpose(1, 2), dv[:, rk].transpose(1, 2))
        _check(got, qs, ks, vs, gs, True, scale)
