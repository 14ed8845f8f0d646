"""genext.models.LlavaForConditionalGeneration against transformers' LlavaForConditionalGeneration
with the same (perturbed random) weights, on transformers' own tiny Llava test config: state_dict
keys (transformers 5's, and transformers 4's through the load hook), logits, loss and gradients on
unpadded and left-padded batches, the image-token count check, greedy generation token for token,
and that genext's attention kernels ran in the vision tower, the language model and the decode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genext.models import LlavaForConditionalGeneration

from peer_parity import assert_grads_match, grads_after, op_names, perturb_, rel

transformers = pytest.importorskip("transformers")

# transformers' LlavaVisionText2TextModelTester: a CLIP vision tower on 8x8 images in 2x2 patches
# (16 patches + CLS), a Llama of hidden size 32, image token 0, 16 image tokens per image
TEXT = dict(
    model_type="llama",
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    hidden_act="gelu",
    max_position_embeddings=512,
    pad_token_id=1,
)
VISION = dict(
    image_size=8,
    patch_size=2,
    num_channels=3,
    hidden_size=32,
    projection_dim=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    dropout=0.1,
    attention_dropout=0.1,
)
IMAGE_TOKEN = 0
CONFIGS = {
    # the tester's own settings: the last layer, CLS dropped
    "tester": dict(vision_feature_layer=-1, vision_feature_select_strategy="default"),
    # two layers concatenated, CLS kept (17 tokens per image), grouped-query attention, no
    # projector bias
    "layers_full": dict(
        vision_feature_layer=[-1, 0],
        vision_feature_select_strategy="full",
        multimodal_projector_bias=False,
        text_config={**TEXT, "num_key_value_heads": 2},
    ),
}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the matrices are a few dozen wide and the machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(name: str):
    fields = {"text_config": TEXT, "vision_config": VISION, **CONFIGS[name]}
    n_tokens = 17 if fields["vision_feature_select_strategy"] == "full" else 16
    return transformers.LlavaConfig(
        image_token_index=IMAGE_TOKEN,
        projector_hidden_act="gelu",
        image_seq_length=n_tokens,
        **fields,
    )


def _pair(name: str, dtype=torch.float32, seed=0):
    """transformers' model with perturbed weights (the rotary frequencies, constants from the
    config, left alone) and genext's with the same state_dict, both in eval mode (the vision
    tower's attention dropout off)."""
    config = _config(name)
    torch.manual_seed(seed)
    peer = transformers.LlavaForConditionalGeneration(config)
    buffers = {k: b.clone() for k, b in peer.named_buffers()}
    perturb_(peer, scale=0.3, seed=seed)
    with torch.no_grad():
        for k, b in peer.named_buffers():
            b.copy_(buffers[k])
    ours = LlavaForConditionalGeneration.from_config(config)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours.to(dtype).eval(), peer.to(dtype).eval(), config.image_seq_length


def _batch(n_image: int, padding: str, dtype, b: int = 2, text: int = 6, seed: int = 1):
    """ids (B, L) with one image's tokens per row after one text token, attention mask, labels
    (-100 on padding and image tokens), pixel values (B, 3, 8, 8). With left padding row 1 has 3
    pads."""
    g = torch.Generator().manual_seed(seed)
    n = text + n_image
    ids = torch.randint(2, 99, (b, n), generator=g)
    ids[:, 1 : 1 + n_image] = IMAGE_TOKEN
    mask = torch.ones(b, n, dtype=torch.long)
    if padding == "left":
        pads = 3
        ids[1] = torch.cat([torch.full((pads,), 1), ids[1, :-pads]])
        mask[1, :pads] = 0
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN), -100)
    pixels = torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    return ids, mask, labels, pixels


def _ref_loss(logits, labels, mask):
    """The shifted cross-entropy written out over the real positions whose label is not -100."""
    pred, target = logits[:, :-1], labels[:, 1:].clone()
    target[mask[:, :-1] == 0] = -100
    keep = target != -100
    return F.cross_entropy(pred[keep], target[keep])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_keys_are_transformers(name):
    config = _config(name)
    peer = transformers.LlavaForConditionalGeneration(config)
    ours = LlavaForConditionalGeneration.from_config(config)
    assert list(ours.state_dict()) == list(peer.state_dict())
    for k, v in peer.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    assert ours.language_model.model is ours.model.language_model
    assert ours.language_model.lm_head is ours.lm_head


def test_transformers_4_checkpoint_names_load():
    """A published checkpoint's names (transformers 4): ``language_model.model.*``,
    ``language_model.lm_head.*``, ``vision_tower.vision_model.*`` (with its old
    ``position_ids`` buffer), ``multi_modal_projector.*``."""
    _, peer, _ = _pair("tester")
    renames = (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )
    old = {}
    for k, v in peer.state_dict().items():
        new = next(o + k[len(n) :] for n, o in renames if k.startswith(n))
        old[new] = v
    old["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    ours = LlavaForConditionalGeneration.from_config(peer.config)
    ours.load_state_dict(old, strict=True)
    for k, v in peer.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_loss_and_grads_match(name, dtype, padding):
    """Logits at the real positions, loss and every parameter's gradient against transformers.
    As in test_llama: genext does not compute logits at padding (0 there); transformers upcasts
    float64 logits to float32 for its loss, so in float64 the loss and its gradients are checked
    on the cross-entropy written out."""
    ours, peer, n_image = _pair(name, dtype)
    ids, mask, labels, pixels = _batch(n_image, padding, dtype)
    mask_arg = None if padding == "none" else mask
    tol = TOL[dtype]
    real = mask.bool()

    def run(m, **kw):
        return m(input_ids=ids, pixel_values=pixels, attention_mask=mask_arg, **kw)

    out, ref = run(ours, labels=labels), run(peer, labels=labels)
    assert out.logits.shape == ref.logits.shape and out.logits.dtype == dtype
    assert rel(out.logits[real], ref.logits[real]) < tol
    assert rel(out.loss, _ref_loss(ref.logits.double(), labels, mask)) < tol
    if dtype == torch.float32:
        # labels of the first real token -100 too, so transformers' prediction from a pad
        # position does not count (see test_llama)
        strict = labels.masked_fill(F.pad(mask, (1, 0))[:, :-1] == 0, -100)
        assert rel(run(ours, labels=strict).loss, run(peer, labels=strict).loss) < tol

        def loss_fn(m):
            return run(m, labels=strict).loss
    else:

        def loss_fn(m):
            return _ref_loss(run(m).logits, labels, mask)

    ours_grads, peer_grads = grads_after(ours, loss_fn), grads_after(peer, loss_fn)
    # the vision tower's first layers, the projector and the image-free embeddings all train
    assert "model.vision_tower.encoder.layers.0.mlp.fc1.weight" in ours_grads
    assert "model.multi_modal_projector.linear_1.weight" in ours_grads
    assert_grads_match(ours_grads, peer_grads, tol)


def test_image_token_count_must_match_features():
    ours, _, n_image = _pair("tester")
    ids, mask, _, pixels = _batch(n_image, "none", torch.float32)
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        ours(input_ids=ids, pixel_values=pixels[:1])
    short = ids.clone()
    short[0, 1] = 5  # one image token fewer than the image's 16 features
    with pytest.raises(ValueError, match="31 image tokens"):
        ours(input_ids=short, pixel_values=pixels)
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(input_ids=ids)


def test_refuses_other_towers_and_language_models():
    config = _config("tester").to_dict()
    with pytest.raises(ValueError, match="text_config.model_type"):
        LlavaForConditionalGeneration.from_config(
            config, text_config={**TEXT, "model_type": "gemma"}
        )
    with pytest.raises(ValueError, match="vision_config.model_type"):
        LlavaForConditionalGeneration.from_config(
            config, vision_config={**VISION, "model_type": "siglip_vision_model"}
        )
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        LlavaForConditionalGeneration.from_config(config, vision_feature_select_strategy="cls")
    with pytest.raises(ValueError, match="vision_feature_layer"):
        LlavaForConditionalGeneration.from_config(config, vision_feature_layer=5)


def _generation_batch(n_image: int, dtype):
    """Two prompts of 6 and 3 text tokens around one image each, the shorter left-padded."""
    g = torch.Generator().manual_seed(3)
    rows = [
        [5] + [IMAGE_TOKEN] * n_image + torch.randint(3, 99, (5,), generator=g).tolist(),
        [7] + [IMAGE_TOKEN] * n_image + torch.randint(3, 99, (2,), generator=g).tolist(),
    ]
    n = max(len(r) for r in rows)
    ids = torch.tensor([[1] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    return ids, mask, pixels


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_equals_transformers(name):
    ours, peer, n_image = _pair(name, torch.float64)
    ids, mask, pixels = _generation_batch(n_image, torch.float64)
    got = ours.generate(ids, pixels, attention_mask=mask, max_new_tokens=8)
    want = peer.generate(
        input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=8, do_sample=False
    )
    assert got.shape == want.shape and torch.equal(got, want), (got, want)


def test_genext_attention_ran_in_tower_lm_and_decode(avx2_routing):
    ours, _, n_image = _pair("tester")
    ids, mask, labels, pixels = _batch(n_image, "left", torch.float32)
    ran = op_names(
        lambda: ours(
            input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels
        ).loss.backward()
    )
    assert {"genext::flash_attention_forward", "genext::flash_attention_backward"} <= ran
    assert not any("scaled_dot_product" in n for n in ran), sorted(ran)
    # the vision tower alone runs genext's kernel too (non-causal, no mask)
    ran = op_names(lambda: ours.vision_tower(pixels))
    assert "genext::flash_attention_forward" in ran
    assert not any("scaled_dot_product" in n for n in ran), sorted(ran)
    gen_ids, gen_mask, gen_pixels = _generation_batch(n_image, torch.float32)
    ran = op_names(lambda: ours.generate(gen_ids, gen_pixels, attention_mask=gen_mask))
    assert {"genext::flash_attention_forward", "genext::attention_with_kvcache"} <= ran
    assert not any("scaled_dot_product" in n for n in ran), sorted(ran)


def test_loads_a_transformers_folder(tmp_path):
    """transformers' save_pretrained folder (config.json + model.safetensors) through
    from_pretrained, and genext's own save_pretrained back."""
    _, peer, n_image = _pair("layers_full")
    peer.save_pretrained(tmp_path / "peer")
    ours = LlavaForConditionalGeneration.from_pretrained(tmp_path / "peer")
    ids, mask, _, pixels = _batch(n_image, "left", torch.float32)
    want = peer(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    got = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    assert rel(got[mask.bool()], want[mask.bool()]) < 1e-5
    ours.save_pretrained(tmp_path / "ours")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours")
    assert torch.equal(again(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits, got)
    # genext's folder is transformers' layout: transformers reads it back
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    back = theirs(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    assert rel(back[mask.bool()], want[mask.bool()]) < 1e-5


def test_built_from_a_config_object():
    """``LlavaForConditionalGeneration(config)`` as transformers' (the config object or its
    dict), equal to from_config; keyword fields override."""
    config = _config("layers_full")
    for given in (config, config.to_dict()):
        model = LlavaForConditionalGeneration(given)
        assert model.config.vision_feature_select_strategy == "full"
        assert model.config.vision_feature_layer == [-1, 0]
        assert model.config.text_config["num_key_value_heads"] == 2
        keys = LlavaForConditionalGeneration.from_config(config).state_dict().keys()
        assert model.state_dict().keys() == keys
    assert LlavaForConditionalGeneration(config, image_seq_length=5).config.image_seq_length == 5
    with pytest.raises(ValueError, match="model_type must be 'llava'"):
        LlavaForConditionalGeneration({**config.to_dict(), "model_type": "clip"})


@pytest.mark.cuda
def test_cuda_float32_against_float64():
    """On the GPU (genext's CUDA kernels, float32): logits within 1e-5 of transformers' float64
    ones on the CPU, and the same greedy tokens."""
    ours, peer, n_image = _pair("tester", torch.float64)
    ids, mask, _, pixels = _batch(n_image, "left", torch.float64)
    exact = peer(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits.detach()
    ours = ours.to("cuda", torch.float32)
    got = ours(
        input_ids=ids.cuda(), pixel_values=pixels.float().cuda(), attention_mask=mask.cuda()
    ).logits
    real = mask.bool()
    assert rel(got.detach().cpu()[real], exact[real]) < 1e-5
    gen_ids, gen_mask, gen_pixels = _generation_batch(n_image, torch.float64)
    want = peer.generate(
        input_ids=gen_ids, pixel_values=gen_pixels, attention_mask=gen_mask, max_new_tokens=6
    )
    tokens = ours.generate(
        gen_ids.cuda(), gen_pixels.float().cuda(), attention_mask=gen_mask.cuda(), max_new_tokens=6
    )
    assert torch.equal(tokens.cpu(), want)
