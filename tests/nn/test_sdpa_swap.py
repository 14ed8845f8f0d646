"""genext's SDPA drop-in installed in place of torch.nn.functional.scaled_dot_product_attention,
for a block (``genext.sdpa()``) or for the whole program: calls it hands back to PyTorch (dropout,
float masks) reach PyTorch's own function instead of recursing, and the block restores the
previous function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import genext
import genext.nn.functional as gF

from attention_helpers import make_qkv

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


def _genext_forwards(fn) -> int:
    """How many times genext's flash-attention forward op ran inside fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "genext::flash_attention_forward")


def _float_mask(b: int, lq: int, lk: int) -> torch.Tensor:
    return torch.randn(b, 1, lq, lk, dtype=torch.float64)


def test_block_swaps_and_restores():
    assert F.scaled_dot_product_attention is TORCH_SDPA
    with genext.sdpa():
        assert F.scaled_dot_product_attention is gF.scaled_dot_product_attention
        with genext.sdpa():  # nested: still genext's, and the outer block's value comes back
            assert F.scaled_dot_product_attention is gF.scaled_dot_product_attention
        assert F.scaled_dot_product_attention is gF.scaled_dot_product_attention
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_block_restores_after_an_exception():
    with pytest.raises(RuntimeError, match="inside"), genext.sdpa():
        raise RuntimeError("inside")
    assert F.scaled_dot_product_attention is TORCH_SDPA


@pytest.mark.parametrize("swap", ["block", "global"])
def test_swapped_sdpa_hands_dropout_and_float_masks_to_torch(swap, monkeypatch):
    q, k, v = make_qkv(2, 2, 2, 9, 7, 16, torch.float64, "cpu")
    mask = _float_mask(2, 9, 7)
    torch.manual_seed(0)
    want_mask = TORCH_SDPA(q, k, v, attn_mask=mask)
    torch.manual_seed(1)
    want_drop = TORCH_SDPA(q, k, v, dropout_p=0.3)

    def run():
        torch.manual_seed(0)
        got_mask = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.manual_seed(1)
        got_drop = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        return got_mask, got_drop

    if swap == "global":
        monkeypatch.setattr(F, "scaled_dot_product_attention", gF.scaled_dot_product_attention)
        got_mask, got_drop = run()  # a RecursionError before the drop-in kept PyTorch's function
    else:
        with genext.sdpa():
            got_mask, got_drop = run()
    # the same function with the same RNG state: identical, dropout pattern included
    assert torch.equal(got_mask, want_mask)
    assert torch.equal(got_drop, want_drop)


def test_block_runs_genext_where_it_can():
    q, k, v = make_qkv(1, 2, 2, 33, 33, 16, torch.float64, "cpu")
    want = TORCH_SDPA(q, k, v, is_causal=True)

    def call():
        call.out = F.scaled_dot_product_attention(q, k, v, is_causal=True)

    assert _genext_forwards(call) == 0  # PyTorch's function outside the block
    with genext.sdpa():
        assert _genext_forwards(call) == 1
    torch.testing.assert_close(call.out, want, rtol=1e-10, atol=1e-10)


def test_block_reaches_a_diffusers_attention_processor():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16)
    attn = attn.double().eval()
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    with torch.no_grad():
        want = attn(x)
        with genext.sdpa():
            ran = _genext_forwards(lambda: setattr(attn, "_got", attn(x)))
    assert ran == 1, "diffusers' AttnProcessor2_0 should reach genext's kernel inside the block"
    torch.testing.assert_close(attn._got, want, rtol=1e-10, atol=1e-10)
