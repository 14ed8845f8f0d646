"""genext.models.CLIPModel and its towers against transformers' CLIP and open_clip's CLIP with the
same (perturbed random) weights: outputs, gradients, loss, hidden states, the padded text batch,
both EOS pooling modes, loading, conversion from open_clip, zero-shot classification, and that
genext's attention kernel is the one that ran.

Padded text: transformers' outputs at padded positions come from pad rows that attend to the real
tokens before them; genext leaves them out of the attention (varlen on the real tokens), so at pads
the two differ and neither means anything. Hidden states are compared at the real positions only;
pooling always picks a real token, and a loss on the real positions has the same gradients in both.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from genext.losses import ClipLoss
from genext.models import (
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from genext.models import clip as clip_module
from genext.nn.functional import sdpa_backend

from peer_parity import assert_grads_match, grads_after, op_names, perturb_, rel

transformers = pytest.importorskip("transformers")

# transformers' own tiny test config (tests/models/clip/test_modeling_clip.py: CLIPTextModelTester,
# CLIPVisionModelTester, CLIPModelTester.get_config with projection_dim=64)
TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    projection_dim=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    dropout=0.1,
    attention_dropout=0.1,
    max_position_embeddings=512,
    initializer_range=0.02,
)
VISION = dict(
    image_size=30,
    patch_size=2,
    num_channels=3,
    hidden_size=32,
    projection_dim=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    dropout=0.1,
    attention_dropout=0.1,
    initializer_range=0.02,
)
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# transformers' legacy eos_token_id 2 pools at the largest id; otherwise at the first EOS
EOS = {"argmax": 2, "first_eos": 5}


def _config(eos: str = "first_eos", act: str = "quick_gelu"):
    text = dict(TEXT, eos_token_id=EOS[eos], bos_token_id=0, hidden_act=act)
    return transformers.CLIPConfig(
        text_config=text, vision_config=dict(VISION, hidden_act=act), projection_dim=64
    )


def _pair(eos: str = "first_eos", act: str = "quick_gelu", dtype=torch.float32):
    torch.manual_seed(0)
    config = _config(eos, act)
    peer = perturb_(transformers.CLIPModel(config).to(dtype)).eval()
    ours = CLIPModel(config).to(dtype).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


def _text(eos: str, batch: int = 4, length: int = 7, seed: int = 1):
    """ids and a mask with right padding (lengths 7, 4, 6 of 7) and one left-padded row, with
    the pooled token inside every row's real tokens. First-EOS mode: EOS (id 5) at the pooled
    position and again right after it, the largest id elsewhere (argmax would pick another
    position, the last EOS a later one); argmax mode: the largest id (98) before the end."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 90, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 6:] = 0
    mask[3, :2] = 0  # left padding
    pooled = [3, 2, 4, 5]
    for row, pos in enumerate(pooled):
        if eos == "argmax":
            ids[row, pos] = 98
        else:
            ids[row, pos] = ids[row, pos + 1] = 5
    return ids, mask, pooled


def _pixels(dtype, batch: int = 4, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 30, 30, generator=g).to(dtype)


def _real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eos", list(EOS))
def test_outputs_match_transformers(eos, dtype):
    ours, peer = _pair(eos, dtype=dtype)
    ids, mask, pooled = _text(eos)
    px = _pixels(dtype)
    tol = TOL[dtype]
    # the pooled position is the one the input was built for, in both models
    assert ours.text_model.eos_positions(ids).tolist() == pooled
    with torch.no_grad():
        a = ours(ids, px, mask, return_loss=True, output_hidden_states=True)
        b = peer(
            input_ids=ids,
            pixel_values=px,
            attention_mask=mask,
            return_loss=True,
            output_hidden_states=True,
        )
        for k in ("loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
            assert rel(a[k], b[k]) < tol, k
        at, bt = a.text_model_output, b.text_model_output
        assert rel(_real(at.last_hidden_state, mask), _real(bt.last_hidden_state, mask)) < tol
        assert len(at.hidden_states) == len(bt.hidden_states) == TEXT["num_hidden_layers"] + 1
        for x, y in zip(at.hidden_states, bt.hidden_states):
            assert rel(_real(x, mask), _real(y, mask)) < tol
        av, bv = a.vision_model_output, b.vision_model_output
        assert rel(av.last_hidden_state, bv.last_hidden_state) < tol
        # transformers 5 puts the projected features in the tower output's pooler_output
        assert rel(ours.visual_projection(av.pooler_output), bv.pooler_output) < tol
        assert len(av.hidden_states) == len(bv.hidden_states) == VISION["num_hidden_layers"] + 1
        for x, y in zip(av.hidden_states, bv.hidden_states):
            assert rel(x, y) < tol
        # the features, with and without a mask
        peer_text = peer.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        assert rel(ours.get_text_features(ids, mask), peer_text) < tol
        peer_text = peer.get_text_features(input_ids=ids).pooler_output
        assert rel(ours.get_text_features(ids), peer_text) < tol
        peer_image = peer.get_image_features(pixel_values=px).pooler_output
        assert rel(ours.get_image_features(px), peer_image) < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gelu_towers_match_transformers(dtype):
    ours, peer = _pair("first_eos", "gelu", dtype)
    ids, mask, _ = _text("first_eos")
    px = _pixels(dtype)
    with torch.no_grad():
        a = ours(ids, px, mask)
        b = peer(input_ids=ids, pixel_values=px, attention_mask=mask)
    assert rel(a.logits_per_text, b.logits_per_text) < TOL[dtype]


def _loss_of(ids, mask, px, w_text, w_image):
    """The contrastive loss plus weighted sums of the embeddings and of the text hidden states
    at the real positions (so every parameter, the pads excluded, gets a gradient)."""

    def loss(model):
        out = model(
            input_ids=ids,
            pixel_values=px,
            attention_mask=mask,
            return_loss=True,
            output_hidden_states=False,
        )
        hidden = out.text_model_output.last_hidden_state
        return (
            out.loss
            + (out.text_embeds * w_text).sum()
            + (out.image_embeds * w_image).sum()
            + (hidden * mask[..., None]).sum() * 0.1
        )

    return loss


# each pooling mode in one dtype (both are compared in both dtypes by the outputs test)
@pytest.mark.parametrize("dtype, eos", [(torch.float32, "argmax"), (torch.float64, "first_eos")])
def test_gradients_match_transformers(dtype, eos):
    ours, peer = _pair(eos, dtype=dtype)
    ids, mask, _ = _text(eos)
    g = torch.Generator().manual_seed(3)
    w_text, w_image = (torch.randn(4, 64, generator=g).to(dtype) for _ in range(2))
    # the pixels' gradient too, each model with its own leaf
    xo, xp = _pixels(dtype).requires_grad_(), _pixels(dtype).requires_grad_()
    ours_g = grads_after(ours, _loss_of(ids, mask, xo, w_text, w_image))
    peer_g = grads_after(peer, _loss_of(ids, mask, xp, w_text, w_image))
    assert "logit_scale" in ours_g and "vision_model.embeddings.class_embedding" in ours_g
    assert rel(xo.grad, xp.grad) < TOL[dtype]
    try:
        assert_grads_match(ours_g, peer_g, TOL[dtype])
    except AssertionError:
        if dtype != torch.float32:
            raise
        # the peer in float64, the yardstick for gradients formed by cancellation: computed
        # only when a float32 gradient is outside the bound
        loss64 = _loss_of(ids, mask, _pixels(torch.float64), w_text.double(), w_image.double())
        ref = grads_after(copy.deepcopy(peer).double(), loss64)
        assert_grads_match(ours_g, peer_g, TOL[dtype], ref)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    ours = perturb_(CLIPModel(_config())).eval()
    ids, mask, _ = _text("first_eos")
    w = torch.randn(4, 64)
    loss = _loss_of(ids, mask, _pixels(torch.float32), w, w.flip(0))
    plain = grads_after(ours, loss)
    ours.enable_gradient_checkpointing()
    assert ours.text_model.encoder.gradient_checkpointing
    assert ours.vision_model.encoder.gradient_checkpointing
    assert_grads_match(grads_after(ours, loss), plain, 1e-6)


def test_clip_loss_on_the_embeddings_equals_the_models_loss():
    """genext.losses.ClipLoss on the model's normalised embeddings with ``logit_scale.exp()`` is
    transformers' CLIP loss (and the model's)."""
    ours, peer = _pair(dtype=torch.float64)
    ids, mask, _ = _text("first_eos")
    px = _pixels(torch.float64)
    with torch.no_grad():
        out = ours(ids, px, mask, return_loss=True)
        expected = peer(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
        image = F.normalize(ours.get_image_features(px), dim=-1)
        text = F.normalize(ours.get_text_features(ids, mask), dim=-1)
        loss = ClipLoss()(image, text, ours.logit_scale.exp())
    assert rel(loss, expected.loss) < 1e-12
    assert rel(out.loss, expected.loss) < 1e-12
    # by hand: the mean of the two cross-entropies over the scaled cosine similarities
    logits = ours.logit_scale.exp() * image @ text.T
    labels = torch.arange(4)
    by_hand = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert rel(loss, by_hand) < 1e-12
    with pytest.raises(ValueError, match="as many texts as images"):
        ours(ids, px[:3], mask, return_loss=True)


def test_padding_does_not_change_the_real_tokens():
    """A sequence padded on the right gives the same features as the sequence alone (the pads
    are out of the attention), and the fallback path (PyTorch's SDPA with a causal + padding
    mask, used where genext's kernel does not serve) agrees with the varlen path."""
    ours, _ = _pair(dtype=torch.float64)
    ids, mask, _ = _text("first_eos")
    with torch.no_grad():
        full = ours.text_model(ids, mask).last_hidden_state
        alone = ours.text_model(ids[1:2, :4]).last_hidden_state
        assert rel(full[1, :4], alone[0]) < 1e-12
        # the PyTorch path, forced
        original = clip_module.sdpa_backend
        clip_module.sdpa_backend = lambda *a, **k: "torch"
        try:
            fallback = ours.text_model(ids, mask).last_hidden_state
        finally:
            clip_module.sdpa_backend = original
    assert rel(_real(fallback, mask), _real(full, mask)) < 1e-12


def _expected_backend(model, dtype) -> str:
    cfg = model.config.vision_config
    q = torch.empty(2, cfg.num_attention_heads, 7, cfg.hidden_size // cfg.num_attention_heads)
    return sdpa_backend(q.to(dtype), q.to(dtype), q.to(dtype), is_causal=True)


@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_runs_on_genext(with_mask, avx2_routing):
    ours, _ = _pair()
    ids, mask, _ = _text("first_eos")
    px = _pixels(torch.float32)
    names = op_names(
        lambda: ours(ids, px, mask if with_mask else None, return_loss=True).loss.backward()
    )
    if _expected_backend(ours, torch.float32) == "genext":
        assert "genext::flash_attention_forward" in names
        assert "genext::flash_attention_backward" in names
        assert not any("scaled_dot_product" in n for n in names), sorted(names)
        assert "genext::tiled_lse" in names  # the loss is genext.losses.ClipLoss
    else:
        assert "genext::flash_attention_forward" not in names


def test_towers_load_transformers_state_dicts():
    """The standalone towers load transformers 5's keys (``embeddings.*``), transformers 4's
    (``text_model.*`` / ``vision_model.*``, with the old ``position_ids`` buffers), and the
    projection models theirs; outputs match."""
    torch.manual_seed(0)
    config = _config()
    dtype = torch.float64
    ids, mask, _ = _text("first_eos")
    px = _pixels(dtype)
    tol = TOL[dtype]

    peer_t = perturb_(transformers.CLIPTextModel(config.text_config).to(dtype)).eval()
    ours_t = CLIPTextModel(config.text_config).to(dtype).eval()
    ours_t.load_state_dict(peer_t.state_dict(), strict=True)
    old = {f"text_model.{k}": v for k, v in peer_t.state_dict().items()}
    old["text_model.embeddings.position_ids"] = torch.arange(512)[None]
    CLIPTextModel(config.text_config).load_state_dict(old, strict=True)
    with torch.no_grad():
        a, b = ours_t(ids, mask), peer_t(input_ids=ids, attention_mask=mask)
    assert rel(a.pooler_output, b.pooler_output) < tol
    assert rel(_real(a.last_hidden_state, mask), _real(b.last_hidden_state, mask)) < tol

    peer_v = perturb_(transformers.CLIPVisionModel(config.vision_config).to(dtype)).eval()
    ours_v = CLIPVisionModel(config.vision_config).to(dtype).eval()
    ours_v.load_state_dict(peer_v.state_dict(), strict=True)
    old = {f"vision_model.{k}": v for k, v in peer_v.state_dict().items()}
    CLIPVisionModel(config.vision_config).load_state_dict(old, strict=True)
    with torch.no_grad():
        a = ours_v(px, output_hidden_states=True)
        b = peer_v(pixel_values=px, output_hidden_states=True)
    assert rel(a.pooler_output, b.pooler_output) < tol
    # LLaVA's feature layer
    assert rel(a.hidden_states[-2], b.hidden_states[-2]) < tol

    peer_tp = transformers.CLIPTextModelWithProjection(config.text_config)
    peer_tp = perturb_(peer_tp.to(dtype)).eval()
    ours_tp = CLIPTextModelWithProjection(config.text_config).to(dtype).eval()
    ours_tp.load_state_dict(peer_tp.state_dict(), strict=True)
    with torch.no_grad():
        a, b = ours_tp(ids, mask), peer_tp(input_ids=ids, attention_mask=mask)
    assert rel(a.text_embeds, b.text_embeds) < tol

    peer_vp = transformers.CLIPVisionModelWithProjection(config.vision_config)
    peer_vp = perturb_(peer_vp.to(dtype)).eval()
    ours_vp = CLIPVisionModelWithProjection(config.vision_config).to(dtype).eval()
    ours_vp.load_state_dict(peer_vp.state_dict(), strict=True)
    with torch.no_grad():
        a, b = ours_vp(px), peer_vp(pixel_values=px)
    assert rel(a.image_embeds, b.image_embeds) < tol


def test_from_pretrained_reads_a_transformers_folder(tmp_path):
    """A float32 checkpoint loaded into a float64 model (from_pretrained builds the model in
    ``torch_dtype``, then loads), compared in float64."""
    ours, peer = _pair()
    peer.save_pretrained(tmp_path)
    loaded = CLIPModel.from_pretrained(tmp_path, torch_dtype=torch.float64)
    peer = peer.double()
    ids, mask, _ = _text("first_eos")
    px = _pixels(torch.float64)
    with torch.no_grad():
        a, b = loaded(ids, px, mask), peer(input_ids=ids, pixel_values=px, attention_mask=mask)
    assert rel(a.logits_per_text, b.logits_per_text) < 1e-10
    assert loaded.config.text_config.eos_token_id == EOS["first_eos"]
    # genext's own folder round-trips
    ours.save_pretrained(tmp_path / "ours")
    again = CLIPModel.from_pretrained(tmp_path / "ours")
    assert again.config == ours.config
    assert all(
        torch.equal(x, y) for x, y in zip(again.state_dict().values(), ours.state_dict().values())
    )


def test_config_forms_and_errors():
    config = _config()
    from_dict = CLIPModel(config.to_dict())
    from_kwargs = CLIPModel(
        text_config=config.text_config, vision_config=config.vision_config, projection_dim=64
    )
    assert from_dict.config == from_kwargs.config == CLIPModel(config).config
    assert from_dict.config.text_config.vocab_size == 99
    assert from_dict.logit_scale.item() == pytest.approx(2.6592)
    with pytest.raises(ValueError, match="hidden_act: 'relu'"):
        CLIPModel(text_config=dict(TEXT, hidden_act="relu"))
    with pytest.raises(TypeError, match="config must be a dict"):
        CLIPModel(42)
    ours = CLIPModel(config)
    with pytest.raises(ValueError, match="pixel_values: image size 32x32"):
        ours.get_image_features(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="attention_mask must have"):
        ours.get_text_features(torch.zeros(2, 7, dtype=torch.long), torch.ones(2, 6))


# ---- open_clip ---------------------------------------------------------------------------------

open_clip = pytest.importorskip("open_clip")

OC_VISION = dict(layers=2, width=32, head_width=8, patch_size=4, image_size=24, mlp_ratio=1.5)
OC_TEXT = dict(context_length=9, vocab_size=50, width=24, heads=4, layers=2)


def _open_clip(quick_gelu: bool, dtype=torch.float32, vision=None, text=None, **kw):
    torch.manual_seed(0)
    model = open_clip.CLIP(16, vision or OC_VISION, text or OC_TEXT, quick_gelu=quick_gelu, **kw)
    # perturb the parameters only: the causal mask buffer must keep its zeros and -infs
    # (in the test's dtype, so that float64 weights are not float32 values)
    model = model.to(dtype)
    causal = model.attn_mask.clone() if model.attn_mask is not None else None
    perturb_(model)
    if causal is not None:
        model.attn_mask.copy_(causal)
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_from_open_clip_matches(quick_gelu, dtype):
    peer = _open_clip(quick_gelu, dtype)
    ours = CLIPModel.from_open_clip(peer)
    assert ours.dtype == dtype
    assert ours.config.vision_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert ours.config.text_config.eos_token_id == 2  # open_clip's argmax pooling
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 24, 24, generator=g).to(dtype)
    t = torch.randint(1, 40, (3, 9), generator=g)
    t[:, 5] = 49  # the end token, the largest id; a second one after it in row 0
    t[0, 7] = 49
    tol = TOL[dtype]
    with torch.no_grad():
        assert rel(ours.get_image_features(x), peer.encode_image(x)) < tol
        assert rel(ours.get_text_features(t), peer.encode_text(t)) < tol
        logits_image, logits_text = peer.get_logits(x, t)
        out = ours(t, x)
        assert rel(out.logits_per_image, logits_image) < tol
        assert rel(out.logits_per_text, logits_text) < tol


def test_from_open_clip_eos_pooling():
    text = dict(OC_TEXT, pool_type="eos", eos_id=7)
    peer = _open_clip(True, torch.float64, text=text)
    ours = CLIPModel.from_open_clip(peer)
    t = torch.randint(10, 40, (2, 9))
    t[:, 3] = 7
    t[:, 6] = 7
    with torch.no_grad():
        assert rel(ours.get_text_features(t), peer.encode_text(t)) < 1e-10


@pytest.mark.parametrize(
    "vision, text, kw, option",
    [
        (dict(OC_VISION, attentional_pool=True, attn_pooler_heads=4), None, {}, "attentional_pool"),
        (dict(OC_VISION, pool_type="avg"), None, {}, "pool_type 'avg'"),
        (dict(OC_VISION, no_ln_pre=True), None, {}, "no_ln_pre"),
        (dict(OC_VISION, ls_init_value=0.1), None, {}, "ls_init_value"),
        (dict(OC_VISION, qk_norm=True), None, {}, "block_type='custom'"),
        (None, dict(OC_TEXT, pool_type="last"), {}, "pool_type 'last'"),
        (None, dict(OC_TEXT, no_causal_mask=True), {}, "no_causal_mask"),
        (None, dict(OC_TEXT, proj_bias=True), {}, "proj_bias"),
        (None, None, dict(init_logit_bias=-10.0), "logit_bias"),
    ],
)
def test_from_open_clip_refuses_what_it_does_not_support(vision, text, kw, option):
    peer = _open_clip(True, vision=vision, text=text, **kw)
    with pytest.raises(ValueError, match=option.replace("(", r"\(").replace(")", r"\)")):
        CLIPModel.from_open_clip(peer)


# ---- zero-shot ---------------------------------------------------------------------------------


def test_zero_shot_classifier():
    """With open_clip's real tokenizer (offline) on a tiny model of CLIP's vocabulary: equal to
    open_clip's build_zero_shot_classifier on the same model, and to the mean of normalised
    template embeddings built by hand; logits and predictions from it."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    text = dict(context_length=77, vocab_size=49408, width=16, heads=2, layers=1)
    peer = _open_clip(True, torch.float64, text=text)
    ours = CLIPModel.from_open_clip(peer)
    classes = ["cat", "dog", "small red car"]
    templates = ["a photo of a {}.", "a drawing of the {}"]
    classifier = clip_module.zero_shot_classifier(ours, tokenizer, classes, templates)
    # templates as callables give the same
    callables = [lambda c: f"a photo of a {c}.", lambda c: f"a drawing of the {c}"]
    assert torch.equal(
        clip_module.zero_shot_classifier(ours, tokenizer, classes, callables), classifier
    )
    assert classifier.shape == (3, 16)
    assert torch.allclose(classifier.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    expected = build_zero_shot_classifier(peer, tokenizer, classes, templates, device="cpu").T
    assert rel(classifier, expected) < 1e-10
    # by hand: one text at a time
    with torch.no_grad():
        rows = []
        for c in classes:
            embs = [
                F.normalize(ours.get_text_features(tokenizer([s]))[0], dim=0)
                for s in (f"a photo of a {c}.", f"a drawing of the {c}")
            ]
            rows.append(F.normalize((embs[0] + embs[1]) / 2, dim=0))
        assert rel(classifier, torch.stack(rows)) < 1e-10
        x = torch.randn(5, 3, 24, 24, dtype=torch.float64)
        image = F.normalize(peer.encode_image(x), dim=-1)
        logits = clip_module.zero_shot_logits(ours, x, classifier)
        assert rel(logits, peer.logit_scale.exp() * image @ expected.T) < 1e-10
        assert torch.equal(clip_module.zero_shot_predict(ours, x, classifier), logits.argmax(-1))
    assert math.isclose(ours.logit_scale.item(), peer.logit_scale.item())


def test_zero_shot_classifier_takes_a_mapping_tokenizer():
    """A Hugging Face style tokenizer (a mapping with input_ids and attention_mask, padded)."""
    ours, _ = _pair(dtype=torch.float64)

    def tokenizer(texts):
        rows = [[10 + len(w) for w in s.split()] + [5] for s in texts]
        n = max(map(len, rows))
        ids = [r + [5] * (n - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (n - len(r)) for r in rows]
        return {"input_ids": ids, "attention_mask": mask}

    classifier = clip_module.zero_shot_classifier(
        ours, tokenizer, ["ab", "abc de"], ["{} x", "y {} zz"]
    )
    with torch.no_grad():
        one = F.normalize(ours.get_text_features(torch.tensor([[12, 11, 5]])), dim=-1)
        two = F.normalize(ours.get_text_features(torch.tensor([[11, 12, 12, 5]])), dim=-1)
    assert rel(classifier[0], F.normalize((one + two)[0] / 2, dim=0)) < 1e-10


# ---- CUDA --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_transformers(dtype, monkeypatch):
    """On the GPU: float32 equal to transformers' (TF32 off for both) and bfloat16 no worse than
    twice transformers' own error against the float64 model on the CPU, with genext's attention
    kernel in the profile."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ours64, peer64 = _pair(dtype=torch.float64)
    ids, mask, _ = _text("first_eos")
    px = _pixels(torch.float64)
    with torch.no_grad():
        ref = peer64(input_ids=ids, pixel_values=px, attention_mask=mask).logits_per_text
        ours = copy.deepcopy(ours64).to("cuda", dtype)
        peer = copy.deepcopy(peer64).to("cuda", dtype)
        idc, mc, pxc = ids.cuda(), mask.cuda(), px.to("cuda", dtype)
        names = op_names(lambda: ours(idc, pxc, mc))
        a = ours(idc, pxc, mc).logits_per_text.double().cpu()
        b = peer(input_ids=idc, pixel_values=pxc, attention_mask=mc).logits_per_text.double().cpu()
    assert "genext::flash_attention_forward" in names
    if dtype == torch.float32:
        assert rel(a, b) < 1e-5
    else:
        assert rel(a, ref) <= 2 * rel(b, ref)


def test_attention_dropout_in_training_runs_pytorchs_sdpa():
    """transformers' tiny config has attention_dropout 0.1: in training it is applied (PyTorch's
    SDPA runs, genext's kernel has no dropout); in eval mode genext's kernel runs."""
    ours, _ = _pair()
    ids, mask, _ = _text("first_eos")
    ours.train()
    names = op_names(lambda: ours.text_model(ids, mask).pooler_output.sum().backward())
    assert "genext::flash_attention_forward" not in names
    with torch.no_grad():
        a, b = ours.text_model(ids, mask).pooler_output, ours.text_model(ids, mask).pooler_output
        assert not torch.equal(a, b)
        ours.eval()
        assert torch.equal(
            ours.text_model(ids, mask).pooler_output, ours.text_model(ids, mask).pooler_output
        )


# ---- the fallback at the pads, saving in transformers' layout, config overrides ---------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fallback_and_varlen_agree_at_the_pads(dtype, monkeypatch):
    """At every position, pads included (right pads that see real tokens, left pads and a row
    of pads only, that see none), PyTorch's SDPA path and the varlen path give the same hidden
    states: the attention output at a pad is zero in both."""
    ours, _ = _pair(dtype=dtype)
    ids, mask, _ = _text("first_eos", batch=5)
    mask[4] = 0  # a row of pads only
    with torch.no_grad():
        varlen = ours.text_model(ids, mask)
        monkeypatch.setattr(clip_module, "sdpa_backend", lambda *a, **k: "torch")
        names = op_names(lambda: ours.text_model(ids, mask))
        fallback = ours.text_model(ids, mask)
    assert "genext::flash_attention_forward" not in names
    assert rel(fallback.last_hidden_state, varlen.last_hidden_state) < TOL[dtype]
    assert rel(fallback.pooler_output, varlen.pooler_output) < TOL[dtype]
    assert torch.isfinite(fallback.last_hidden_state).all()


def test_save_pretrained_is_read_by_transformers(tmp_path):
    """genext's save_pretrained writes transformers' layout (model.safetensors, a config.json
    with model_type): transformers' from_pretrained reads CLIPModel's and the towers' folders
    with the same outputs, a float64 model round-trips exactly through genext's from_pretrained
    and transformers', and a standalone tower reads a whole CLIPModel folder (its own config and
    weights), as transformers' does."""
    pytest.importorskip("safetensors")
    ours, _ = _pair(dtype=torch.float64)
    ids, mask, _ = _text("first_eos")
    px = _pixels(torch.float64)
    ours.save_pretrained(tmp_path / "clip")
    assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    peer = transformers.CLIPModel.from_pretrained(tmp_path / "clip")
    again = CLIPModel.from_pretrained(tmp_path / "clip")
    assert peer.dtype == again.dtype == torch.float64 and again.config == ours.config
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v) and torch.equal(peer.state_dict()[k], v), k
    with torch.no_grad():
        a = ours(ids, px, mask).logits_per_text
        b = peer(input_ids=ids, pixel_values=px, attention_mask=mask).logits_per_text
        assert torch.equal(again(ids, px, mask).logits_per_text, a) and rel(a, b) < 1e-12

    text = CLIPTextModel.from_pretrained(tmp_path / "clip")
    vision = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip")
    # the tower's config, projected to the CLIPModel's width (what its projections have)
    assert text.config == dict(ours.config.text_config, projection_dim=64)
    with torch.no_grad():
        want = ours.text_model(ids, mask).pooler_output
        assert torch.equal(text(ids, mask).pooler_output, want)
        assert torch.equal(vision(px).image_embeds, ours.get_image_features(px))
    for tower, peer_cls in (
        (text, transformers.CLIPTextModel),
        (vision, transformers.CLIPVisionModelWithProjection),
    ):
        folder = tmp_path / type(tower).__name__
        tower.save_pretrained(folder)
        peer_tower = peer_cls.from_pretrained(folder)
        for k, v in tower.state_dict().items():
            assert torch.equal(peer_tower.state_dict()[k], v), k
        assert type(tower).from_pretrained(folder).config == tower.config


def test_unknown_override_fields_warn():
    config = _config()
    with pytest.warns(UserWarning, match="not_a_field"):
        CLIPModel(config, not_a_field=1)
    with pytest.warns(UserWarning, match="projection_dimm"):
        CLIPTextModel(config.text_config, projection_dimm=8)
    with pytest.warns(UserWarning, match="patch"):
        CLIPVisionModel(config.vision_config, patch=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CLIPModel(config, projection_dim=16)
        CLIPTextModel(config.text_config, hidden_size=64)
