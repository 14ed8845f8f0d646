"""The KV-cache decode kernels (csrc/kvcache_attention/kvcache_attention.cu: append, split-KV
attention, split merge) under the CPU emulation (tests/cuda_emu/README.md), through the op tests'
own checks (tests/ops/test_attention_with_kvcache.py's run_and_check: out, lse and the caches
against the float64 reference, lengths 0 to the full capacity, GQA/MQA/MHA, causal or not, append
or not, contiguous and paged caches), with key splits planned for 1 and for 132 multiprocessors;
the inputs are guarded tensors and the outputs and split workspace guarded buffers. The
emulation's cp.async copies land only at the waits that cover them. An emulation, not a GPU run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emu_build  # noqa: E402
from guard import guarded  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
import test_attention_with_kvcache as kv_tests  # noqa: E402

# a build of about 40 s: the full profile (CI) runs these, the quick one the emulation's self-test
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    return emu_build.load_or_skip("kvcache_attention")


def _emulated_op(emu, num_sms):
    """genext.ops.attention_with_kvcache's signature on the emulated kernels, every input a
    guarded copy; the caches are copied back (the append writes them)."""

    def op(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        k_new=None,
        v_new=None,
        causal=True,
        scale=None,
        block_table=None,
        return_lse=False,
    ):
        g = lambda t: None if t is None else guarded(t)  # noqa: E731
        kc, vc = guarded(k_cache), guarded(v_cache)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        out, lse = emu.attention_with_kvcache(
            g(q),
            kc,
            vc,
            g(cache_seqlens),
            g(k_new),
            g(v_new),
            g(block_table),
            scale,
            causal,
            num_sms,
        )
        k_cache.copy_(kc)
        v_cache.copy_(vc)
        return (out, lse) if return_lse else out

    return op


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize(
    "case",
    kv_tests.CASES,
    ids=[
        f"B{c[0]}-Lq{c[1]}-H{c[2]}x{c[3]}-D{c[4]}-cap{c[5]}{'-causal' if c[6] else ''}"
        f"{'-append' if c[7] else ''}{f'-paged{c[8]}' if c[8] else ''}"
        for c in kv_tests.CASES
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(emu, monkeypatch, case, dtype, sms):
    monkeypatch.setattr(kv_tests, "attention_with_kvcache", _emulated_op(emu, sms))
    kv_tests.run_and_check("cpu", dtype, *case)


# fp32 past head dim 128 takes the kernel's single-stage path (its tiles do not fit twice)
@pytest.mark.parametrize("d", [8, 96, 136, 256])
@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dims(emu, monkeypatch, d, block_size, dtype):
    monkeypatch.setattr(kv_tests, "attention_with_kvcache", _emulated_op(emu, 132))
    kv_tests.run_and_check("cpu", dtype, 3, 2, 8, 2, d, 150, True, True, block_size)
