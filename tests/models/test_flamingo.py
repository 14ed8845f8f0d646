"""genext.models.FlamingoForCausalLM against a plain-PyTorch reference of the same computation
written here (explicit softmax attention for the resampler, the gated cross-attention and the
language model's causal self-attention): logits and gradients in float64 (1e-10) and float32
(1e-5), unpadded and left-padded, with and without a per-token media mask; with the gates at 0
the logits equal the bare language model's exactly; a frozen language model leaves only the new
modules with gradients; greedy generation equals the argmax of repeated full forwards; genext's
attention kernels ran."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genext.models import CLIPVisionModel, FlamingoForCausalLM, LlamaForCausalLM

from peer_parity import assert_grads_match, grads_after, op_names, perturb_, rel

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# a Llama of 4 layers with grouped-query attention (4 query heads, 2 key/value heads)
TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)
# a CLIP vision tower 24 wide (not the LM's 32): 8x8 images in 4x4 patches, 4 patches + CLS
VISION = dict(
    image_size=8,
    patch_size=4,
    num_channels=3,
    hidden_size=24,
    intermediate_size=37,
    num_hidden_layers=1,
    num_attention_heads=4,
)
VARIANTS = {
    # a resampler of 3 latents, a block before layers 1 and 3
    "resampler": dict(cross_attn_every=2, num_latents=3),
    # no resampler (the cross-attention reads the 5 vision tokens), a projection to the LM's
    # width, a block before every layer
    "no_resampler_proj": dict(cross_attn_every=1, num_latents=None, project_media=True),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the matrices are a few dozen wide and the machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(variant: str = "resampler", dtype=torch.float64, gates: bool = True, seed: int = 0):
    """The VLM with perturbed weights (the LM's rotary frequencies, constants, left alone); with
    ``gates=False`` the gates stay at their initial 0."""
    torch.manual_seed(seed)
    lm = LlamaForCausalLM.from_config(TEXT)
    vision = CLIPVisionModel(VISION)
    model = FlamingoForCausalLM(
        lm, vision, resampler_depth=2, heads=2, head_dim=8, ff_mult=2, **VARIANTS[variant]
    )
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    gate_values = {k: p.clone() for k, p in model.named_parameters() if k.endswith("_gate")}
    perturb_(model, scale=0.3, seed=seed)
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(buffers[k])
        for k, p in model.named_parameters():
            if k.endswith("_gate"):
                p.copy_(torch.full_like(p, 0.7) if gates else gate_values[k])
    return model.to(dtype).eval()


def _batch(padding: str, dtype, b: int = 2, n: int = 7, seed: int = 1, media: bool = False):
    """ids (B, L), attention mask (row 1 has 3 left pads), labels (-100 on padding), pixels
    (B, 3, 8, 8), and with ``media`` a media mask: row 0 sees the image from position 2, row 1
    (a text-only sequence in the batch) never."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    if padding == "left":
        mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    pixels = torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    media_mask = None
    if media:
        media_mask = mask.bool().clone()
        media_mask[0, :2] = False
        media_mask[1] = False
    return ids, mask, labels, pixels, media_mask


# ---- the reference ----------------------------------------------------------------------------


def _attention(q, k, v, scale, mask=None):
    """softmax(q k^T * scale) v written out: q (B, Lq, Hq, D), k/v (B, Lk, Hk, D) with Hk
    dividing Hq, mask (B, 1, Lq, Lk) bool (True = attend)."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def _ln(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _ff(ff, x):
    return F.linear(F.gelu(F.linear(_ln(ff.norm, x), ff.fc1.weight)), ff.fc2.weight)


def _heads(x, heads):
    return x.reshape(*x.shape[:-1], heads, -1)


def _ref_perceiver(res, x):
    lat = res.latents.expand(x.shape[0], -1, -1)
    for layer in res.layers:
        a = layer["attn"]
        normed = _ln(a.norm_latents, lat)
        kv_in = torch.cat([_ln(a.norm_media, x), normed], 1)
        k, v = F.linear(kv_in, a.to_kv.weight).chunk(2, -1)
        q = F.linear(normed, a.to_q.weight)
        out = _attention(_heads(q, a.heads), _heads(k, a.heads), _heads(v, a.heads), a.scale)
        lat = lat + F.linear(out.flatten(2), a.to_out.weight)
        lat = lat + _ff(layer["ff"], lat)
    return _ln(res.norm, lat)


def _ref_cross(block, x, media, media_mask):
    a = block.attn
    q = F.linear(_ln(a.norm, x), a.to_q.weight)
    k, v = F.linear(media, a.to_kv.weight).chunk(2, -1)
    out = _attention(_heads(q, a.heads), _heads(k, a.heads), _heads(v, a.heads), a.scale)
    out = out.flatten(2)
    if media_mask is not None:
        out = out * media_mask[..., None]
    x = x + torch.tanh(block.attn_gate) * F.linear(out, a.to_out.weight)
    return x + torch.tanh(block.ff_gate) * _ff(block.ff, x)


def _ref_forward(model, ids, mask, pixels, media_mask, position_ids=None):
    """The whole VLM with explicit attention: the vision tower's features, the resampler, the
    projection, and the LM's layers (their own projections, rotary and MLP) with each block's
    cross-attention before them and causal softmax attention over the real keys."""
    lm = model.language_model
    b, n = ids.shape
    media = model.vision_model(pixels).last_hidden_state
    if model.perceiver is not None:
        media = _ref_perceiver(model.perceiver, media)
    if model.media_proj is not None:
        media = F.linear(media, model.media_proj.weight, model.media_proj.bias)
    h = lm.model.embed_tokens(ids)
    pos = torch.arange(n)[None].expand(b, n) if position_ids is None else position_ids
    cos, sin = lm.model.rotary_emb(pos, h.dtype, None)
    real = mask.bool()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    # causal over the real keys; a padded query (not compared) sees itself
    attn_mask = (causal & real[:, None, :]) | torch.eye(n, dtype=torch.bool)
    attn_mask = attn_mask[:, None]

    def attend(layer, q, k, v):
        return _attention(q, k, v, lm.scale, attn_mask)

    every = model.config.cross_attn_every
    for i, layer in enumerate(lm.model.layers):
        if (i + 1) % every == 0:
            h = _ref_cross(model.gated_cross_attn[str(i)], h, media, media_mask)
        h = layer(h, cos, sin, attend)
    return lm.lm_head(lm.model.norm(h))


def _loss(logits, labels, mask):
    """Shifted cross-entropy over the real predictions whose label is not -100."""
    pred, target = logits[:, :-1], labels[:, 1:].clone()
    target[mask[:, :-1] == 0] = -100
    keep = target != -100
    return F.cross_entropy(pred[keep], target[keep])


# ---- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("media", [False, True], ids=["all_tokens", "media_mask"])
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_grads_match_reference(variant, dtype, padding, media, avx2_routing):
    model = _model(variant, dtype)
    ids, mask, labels, pixels, media_mask = _batch(padding, dtype, media=media)
    mask_arg = None if padding == "none" else mask
    tol = TOL[dtype]
    real = mask.bool()

    def ours(m):
        return m(ids, pixels, attention_mask=mask_arg, media_mask=media_mask).logits

    def ref(m):
        return _ref_forward(m, ids, mask, pixels, media_mask)

    out = ours(model)
    want = ref(model)
    assert out.dtype == dtype
    assert rel(out[real], want[real]) < tol
    if padding == "left":
        assert (out[~real] == 0).all()
    loss = model(ids, pixels, attention_mask=mask_arg, media_mask=media_mask, labels=labels).loss
    assert rel(loss, _loss(want, labels, mask)) < tol
    ours_grads = grads_after(model, lambda m: _loss(ours(m), labels, mask))
    ref_grads = grads_after(model, lambda m: _loss(ref(m), labels, mask))
    # every part trains: the LM, the vision tower, the resampler, the blocks and their gates
    for name in ("language_model.lm_head.weight", "vision_model.encoder.layers.0.mlp.fc1.weight"):
        assert name in ours_grads
    assert any(k.startswith("gated_cross_attn.") and k.endswith("attn_gate") for k in ours_grads)
    assert_grads_match(ours_grads, ref_grads, tol)


def test_vision_features_and_multiple_images():
    """Precomputed vision features give the pixels' logits; two images per sequence become
    twice the visual tokens and match the reference fed the concatenated media."""
    model = _model()
    ids, mask, _, pixels, _ = _batch("left", torch.float64)
    features = model.vision_model(pixels).last_hidden_state
    a = model(ids, pixels, attention_mask=mask).logits
    b = model(ids, vision_features=features, attention_mask=mask).logits
    assert torch.equal(a, b)
    two = torch.stack([pixels, pixels.flip(0)], 1)  # (B, 2, 3, 8, 8)
    media = model.encode_media(two)
    assert media.shape == (2, 2 * 3, 24)
    direct = torch.cat([model.encode_media(pixels), model.encode_media(pixels.flip(0))], 1)
    assert rel(media, direct) < 1e-15
    assert (
        rel(
            model(ids, two, attention_mask=mask).logits,
            model(ids, media=direct, attention_mask=mask).logits,
        )
        < 1e-15
    )


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gates_at_zero_give_the_language_model_exactly(dtype, padding):
    model = _model("resampler", dtype, gates=False)
    ids, mask, _, pixels, media_mask = _batch(padding, dtype, media=True)
    mask_arg = None if padding == "none" else mask
    out = model(ids, pixels, attention_mask=mask_arg, media_mask=media_mask).logits
    bare = model.language_model(ids, attention_mask=mask_arg).logits
    assert torch.equal(out, bare)
    got = model.generate(ids, pixels, attention_mask=mask_arg, max_new_tokens=4)
    assert torch.equal(
        got, model.language_model.generate(ids, attention_mask=mask_arg, max_new_tokens=4)
    )


@pytest.mark.parametrize("gates", [True, False], ids=["open", "closed"])
def test_frozen_language_model_trains_only_the_new_modules(gates):
    model = _model("resampler", torch.float32, gates=gates).freeze_language_model()
    ids, mask, labels, pixels, _ = _batch("left", torch.float32)
    grads = grads_after(model, lambda m: m(ids, pixels, attention_mask=mask, labels=labels).loss)
    new = ("gated_cross_attn.", "perceiver.", "media_proj.")
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k, _ in model.named_parameters() if k.startswith(new)}
    assert set(grads) == trainable
    assert len(model.trainable_parameters()) == len(trainable)
    # the gates always learn; with them at 0 nothing behind them does yet (tanh(0) = 0)
    gate_grads = [g for k, g in grads.items() if k.endswith("_gate")]
    assert gate_grads and all(bool(g.abs().sum() > 0) for g in gate_grads)
    behind = grads["gated_cross_attn.1.attn.to_q.weight"]
    assert bool(behind.abs().sum() > 0) == gates


@pytest.mark.parametrize("media", [False, True], ids=["all_tokens", "media_mask"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_equals_repeated_forwards(variant, media):
    """Greedy tokens equal the argmax of full forwards over the growing sequences (each at the
    positions generation gives it: 0, 1, ... from its first real token)."""
    model = _model(variant)
    ids, mask, _, pixels, media_mask = _batch("left", torch.float64, media=media)
    steps = 5
    got = model.generate(
        ids, pixels, attention_mask=mask, media_mask=media_mask, max_new_tokens=steps
    )
    seq, m, mm = ids, mask, media_mask
    for _ in range(steps):
        pos = (m.cumsum(1) - 1).clamp(min=0)
        logits = model(seq, pixels, attention_mask=m, position_ids=pos, media_mask=mm).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        m = F.pad(m, (0, 1), value=1)
        if mm is not None:
            mm = torch.cat([mm, mm[:, -1:]], 1)
    assert torch.equal(got, seq), (got, seq)
    assert len(set(got[:, -steps:].flatten().tolist())) > 1


def test_genext_attention_ran(avx2_routing):
    model = _model("resampler", torch.float32)
    ids, mask, labels, pixels, media_mask = _batch("left", torch.float32, media=True)
    ran = op_names(
        lambda: model(
            ids, pixels, attention_mask=mask, media_mask=media_mask, labels=labels
        ).loss.backward()
    )
    assert {"genext::flash_attention_forward", "genext::flash_attention_backward"} <= ran
    assert not any("scaled_dot_product" in n for n in ran), sorted(ran)
    ran = op_names(lambda: model.generate(ids, pixels, attention_mask=mask, max_new_tokens=3))
    assert {"genext::flash_attention_forward", "genext::attention_with_kvcache"} <= ran
    assert not any("scaled_dot_product" in n for n in ran), sorted(ran)


def test_errors():
    lm = LlamaForCausalLM.from_config(TEXT)
    vision = CLIPVisionModel(VISION)
    with pytest.raises(ValueError, match="cross_attn_every"):
        FlamingoForCausalLM(lm, vision, cross_attn_every=0)
    with pytest.raises(ValueError, match="cross_attn_every"):
        FlamingoForCausalLM(lm, vision, cross_attn_every=5)
    with pytest.raises(ValueError, match="vision_dim"):
        FlamingoForCausalLM(lm, None)
    model = FlamingoForCausalLM(lm, vision, cross_attn_every=2, num_latents=2, heads=2, head_dim=8)
    ids, mask, _, pixels, _ = _batch("none", torch.float32)
    with pytest.raises(ValueError, match="exactly one of pixel_values and vision_features"):
        model(ids)
    with pytest.raises(ValueError, match="media must be"):
        model(ids, pixels[:1])
    with pytest.raises(ValueError, match="vision_dim 24"):
        model(ids, vision_features=torch.randn(2, 5, 32))
    with pytest.raises(RuntimeError, match="generate"):
        model.forward_decode(ids[:, :1], ids[:, :1], [])


@pytest.mark.cuda
def test_cuda_float32_against_float64_reference():
    """On the GPU (genext's CUDA kernels, float32): logits within 1e-5 of the float64 reference
    on the CPU, and the same greedy tokens as the float64 model on the CPU."""
    model = _model("resampler", torch.float64)
    ids, mask, _, pixels, media_mask = _batch("left", torch.float64, media=True)
    exact = _ref_forward(model, ids, mask, pixels, media_mask).detach()
    want = model.generate(ids, pixels, attention_mask=mask, media_mask=media_mask, max_new_tokens=5)
    gpu = model.to("cuda", torch.float32)
    cuda = [t.cuda() for t in (ids, mask, pixels.float(), media_mask)]
    got = gpu(cuda[0], cuda[2], attention_mask=cuda[1], media_mask=cuda[3]).logits
    real = mask.bool()
    assert rel(got.detach().cpu()[real], exact[real]) < 1e-5
    tokens = gpu.generate(
        cuda[0], cuda[2], attention_mask=cuda[1], media_mask=cuda[3], max_new_tokens=5
    )
    assert torch.equal(tokens.cpu(), want)
