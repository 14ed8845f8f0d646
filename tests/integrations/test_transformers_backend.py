"""attn_implementation="genext" (genext.integrations.transformers) inside transformers' own models
with perturbed random weights: each model computes what it computes with "sdpa" (logits at real
positions, fp32 and fp64, no padding, left and right padding; gradients for Llama and GPT-2),
greedy generation of a left-padded batch gives the same tokens, the profiler shows genext's kernel
and no PyTorch SDPA, and what genext does not serve goes to transformers' sdpa function. The mask
function returns sdpa's masks, and a given 4-D mask alone decides the pattern (models that
post-process masks: Doge, Gemma 4; a vision tower that says is_causal=True under a bidirectional
mask: Phi4 multimodal); chunked prefill, bf16 on the CPU, torch.compile."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from genext.integrations import transformers as gt

from peer_parity import assert_grads_match, grads_after, op_names, perturb_, rel

transformers = pytest.importorskip("transformers")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]
PADDINGS = ["none", "left", "right"]
B, L, VOCAB = 3, 9, 64
GENEXT_OPS = ("genext::flash_attention_forward",)
TORCH_SDPA_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product")

# Llama with grouped-query attention (4 query heads over 2 K/V heads), head dim 8
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
# CLIP: 8x8 images in 4x4 patches (4 patches and a class token), a causal text tower
CLIP_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
)
CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=8,
    patch_size=4,
)
IMAGE_TOKEN = VOCAB - 1


@pytest.fixture(scope="module", autouse=True)
def _registered():
    assert gt.register() == "genext"


def _model(cls, config, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb_(cls(config)).to(dtype).eval()


def _llama(dtype):
    return _model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**LLAMA), dtype)


def _gpt2(dtype):
    return _model(transformers.GPT2LMHeadModel, transformers.GPT2Config(**GPT2), dtype)


def _clip(dtype):
    config = transformers.CLIPConfig(
        text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=16
    )
    return _model(transformers.CLIPModel, config, dtype)


def _llava(dtype):
    # as transformers' own llava tests: a CLIP vision tower and a Llama, the vision features of
    # the second-to-last layer without the class token (4 image tokens per image)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**CLIP_VISION),
        text_config=transformers.LlamaConfig(**LLAMA),
        image_token_id=IMAGE_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return _model(transformers.LlavaForConditionalGeneration, config, dtype)


def _keep(padding: str, length: int = L) -> torch.Tensor:
    """(B, length) int mask: entry 0 unpadded, entries 1 and 2 with 3 and 5 pad tokens."""
    keep = torch.ones(B, length, dtype=torch.long)
    for b, pads in ((1, 3), (2, 5)):
        if padding == "left":
            keep[b, :pads] = 0
        elif padding == "right":
            keep[b, length - pads :] = 0
    return keep


def _ids(keep: torch.Tensor, high: int = VOCAB - 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, high, keep.shape, generator=g) * keep


def _pixels(dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, 3, 8, 8, generator=g).to(dtype)


def _run(model, impl: str, fn):
    model.set_attn_implementation(impl)
    gt.calls.clear()
    return fn(model)


def _assert_served(padding: str) -> None:
    """Every attention call since calls.clear() ran genext's kernel (varlen for padding)."""
    assert gt.calls, "no attention call reached the genext backend"
    assert all(k.startswith("genext") for k in gt.calls), dict(gt.calls)
    if padding != "none":
        assert gt.calls["genext varlen"] > 0, dict(gt.calls)


def _lm_case(make, padding, dtype):
    model = make(dtype)
    keep = _keep(padding)
    ids = _ids(keep)

    def fwd(m):
        return m(ids, attention_mask=keep if padding != "none" else None).logits

    ref = _run(model, "sdpa", fwd)
    out = _run(model, "genext", fwd)
    _assert_served(padding)
    real = keep.bool()
    assert rel(out[real], ref[real]) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_llama_logits(padding, dtype):
    _lm_case(_llama, padding, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_gpt2_logits(padding, dtype):
    _lm_case(_gpt2, padding, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_clip(padding, dtype):
    model = _clip(dtype)
    keep = _keep(padding)
    # CLIP pools at the largest token id (its end-of-text token): put it at each entry's last
    # real position so that pooling reads a real position whatever the padding
    ids = _ids(keep, VOCAB - 2)
    last = torch.where(keep.bool(), torch.arange(L), -1).argmax(dim=1)
    ids[torch.arange(B), last] = VOCAB - 1
    pixels = _pixels(dtype)

    def fwd(m):
        o = m(input_ids=ids, pixel_values=pixels, attention_mask=keep)
        return (
            o.text_model_output.last_hidden_state,
            o.vision_model_output.last_hidden_state,
            o.logits_per_text,
        )

    ref = _run(model, "sdpa", fwd)
    out = _run(model, "genext", fwd)
    _assert_served(padding)
    real = keep.bool()
    assert rel(out[0][real], ref[0][real]) < TOL[dtype]
    assert rel(out[1], ref[1]) < TOL[dtype]
    assert rel(out[2], ref[2]) < TOL[dtype]


def _llava_inputs(padding: str, dtype):
    """Four image tokens after one text token in each entry's real part."""
    keep = _keep(padding, 11)
    ids = _ids(keep, VOCAB - 1)
    first = torch.where(keep.bool(), torch.arange(11), 11).argmin(dim=1)
    for b in range(B):
        ids[b, first[b] + 1 : first[b] + 5] = IMAGE_TOKEN
    return ids, keep, _pixels(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_llava_logits(padding, dtype):
    model = _llava(dtype)
    ids, keep, pixels = _llava_inputs(padding, dtype)

    def fwd(m):
        return m(input_ids=ids, pixel_values=pixels, attention_mask=keep).logits

    ref = _run(model, "sdpa", fwd)
    out = _run(model, "genext", fwd)
    _assert_served(padding)
    real = keep.bool()
    assert rel(out[real], ref[real]) < TOL[dtype]


def _qwen2(dtype):
    return _model(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**LLAMA), dtype)


def _mistral(dtype):
    # a window longer than the sequences: transformers' mask for it hides nothing but padding,
    # and genext runs
    config = transformers.MistralConfig(**LLAMA, sliding_window=64)
    return _model(transformers.MistralForCausalLM, config, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [_qwen2, _mistral], ids=["qwen2", "mistral"])
def test_qwen2_mistral_left_padded(make, dtype):
    _lm_case(make, "left", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_bert_bidirectional_padding(padding, dtype):
    """An encoder (BERT): a bidirectional padding mask becomes the key mask, every query row is
    kept (padded ones too, as in sdpa), so the whole output matches."""
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=16,
    )
    model = _model(transformers.BertModel, config, dtype)
    keep = _keep(padding)

    def fwd(m):
        return m(_ids(keep), attention_mask=keep).last_hidden_state

    ref = _run(model, "sdpa", fwd)
    out = _run(model, "genext", fwd)
    _assert_served(padding)
    assert rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_gradients(make, padding, dtype):
    model = make(dtype)
    keep = _keep(padding)
    ids = _ids(keep)
    real = keep.bool()
    weight = torch.randn(int(real.sum()), VOCAB, generator=torch.Generator().manual_seed(3))

    def loss(m):
        logits = m(ids, attention_mask=keep if padding != "none" else None).logits
        return (logits[real] * weight.to(dtype)).sum()

    model.set_attn_implementation("sdpa")
    ref = grads_after(model, loss)
    model.set_attn_implementation("genext")
    gt.calls.clear()
    ours = grads_after(model, loss)
    _assert_served(padding)
    assert_grads_match(ours, ref, TOL[dtype])


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_generate_left_padded(make):
    """Greedy generation of a left-padded batch: the prefill and every decode step with a
    DynamicCache (one query over the cached keys, padding in the cache) run on genext."""
    model = make(torch.float32)
    keep = _keep("left")
    ids = _ids(keep)

    def gen(m):
        return m.generate(
            ids, attention_mask=keep, max_new_tokens=6, do_sample=False, pad_token_id=0
        )

    ref = _run(model, "sdpa", gen)
    out = _run(model, "genext", gen)
    _assert_served("left")
    # two layers, one prefill and five decode steps, all over padded keys
    assert gt.calls["genext varlen"] == 2 * 6
    assert torch.equal(out, ref)


def test_generate_unpadded_decode():
    """Without padding the decode steps run the no-mask kernel with one query over all the
    cached keys (causal aligned bottom-right)."""
    model = _llama(torch.float32)
    ids = _ids(_keep("none"))

    def gen(m):
        return m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)

    ref = _run(model, "sdpa", gen)
    out = _run(model, "genext", gen)
    assert dict(gt.calls) == {"genext": 2 * 5}
    assert torch.equal(out, ref)


def _ops(fn) -> set[str]:
    names = op_names(fn)
    assert any(n in names for n in GENEXT_OPS), sorted(names)
    assert not [n for n in names if n.startswith(TORCH_SDPA_OPS)], sorted(names)
    return names


@pytest.mark.parametrize("padding", PADDINGS)
def test_profile_llama_forward_backward(padding, avx2_routing):
    model = _llama(torch.float32)
    model.set_attn_implementation("genext")
    keep = _keep(padding)
    ids = _ids(keep)
    mask = keep if padding != "none" else None
    names = _ops(lambda: model(ids, attention_mask=mask).logits.sum().backward())
    assert "genext::flash_attention_backward" in names


@pytest.mark.parametrize("padding", PADDINGS)
def test_profile_clip_and_llava(padding, avx2_routing):
    clip, llava = _clip(torch.float32), _llava(torch.float32)
    clip.set_attn_implementation("genext")
    llava.set_attn_implementation("genext")
    keep = _keep(padding)
    ids, lkeep, pixels = _llava_inputs(padding, torch.float32)
    _ops(lambda: clip(input_ids=_ids(keep), pixel_values=pixels, attention_mask=keep))
    _ops(lambda: llava(input_ids=ids, pixel_values=pixels, attention_mask=lkeep))


def test_profile_generate():
    model = _gpt2(torch.float32)
    model.set_attn_implementation("genext")
    keep = _keep("left")
    _ops(
        lambda: model.generate(
            _ids(keep), attention_mask=keep, max_new_tokens=3, do_sample=False, pad_token_id=0
        )
    )


def test_packed_sequences():
    """Sequences packed along a row (position_ids restarting at 0, no mask, no cache): transformers
    builds a 4-D block-causal mask, which genext recognises and runs as packed sequences."""
    for dtype in DTYPES:
        model = _llama(dtype)
        ids = _ids(_keep("none"))
        pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]]).expand(B, -1)

        def fwd(m, ids=ids, pos=pos):
            return m(ids, position_ids=pos, use_cache=False).logits

        ref = _run(model, "sdpa", fwd)
        out = _run(model, "genext", fwd)
        assert dict(gt.calls) == {"genext packed": 2}
        assert rel(out, ref) < TOL[dtype]
    model.set_attn_implementation("genext")
    _ops(lambda: fwd(model))


def _fallback(model, fn, reason: str) -> None:
    """`fn(model)` with "genext" equals it with "sdpa" (same seed), every attention call went to
    sdpa for `reason`, and the profile shows PyTorch's SDPA and not genext's kernel."""
    ref = _run(model, "sdpa", lambda m: (torch.manual_seed(5), fn(m))[1])
    out = _run(model, "genext", lambda m: (torch.manual_seed(5), fn(m))[1])
    assert set(gt.calls) == {f"sdpa: {reason}"}, dict(gt.calls)
    assert torch.equal(out, ref)
    names = op_names(lambda: fn(model))
    assert not any(n in names for n in GENEXT_OPS)
    assert any(n.startswith(TORCH_SDPA_OPS) for n in names)


def test_fallback_dropout():
    # training with attention dropout: sdpa draws the same dropout masks
    config = transformers.GPT2Config(**GPT2, attn_pdrop=0.5)
    model = _model(transformers.GPT2LMHeadModel, config, torch.float32).train()
    _fallback(model, lambda m: m(_ids(_keep("none"))).logits, "dropout > 0")


def test_fallback_output_attentions():
    _fallback(
        _llama(torch.float32),
        lambda m: m(_ids(_keep("none")), output_attentions=True).logits,
        "output_attentions",
    )


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fallback_custom_4d_mask(kind):
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(B, 1, L, L, generator=g) > 0.3) | torch.eye(L, dtype=torch.bool)
    if kind == "float":
        mask = torch.where(mask, 0.0, -1e9) + torch.rand(B, 1, L, L, generator=g)
    _fallback(
        _llama(torch.float32),
        lambda m: m(_ids(_keep("none")), attention_mask=mask).logits,
        "4-D mask",
    )


def test_fallback_sliding_window():
    """Mistral with a window of 4 over 9 tokens goes to sdpa; with a window longer than the
    sequence it runs on genext."""
    config = transformers.MistralConfig(**LLAMA, sliding_window=4)
    model = _model(transformers.MistralForCausalLM, config, torch.float32)
    ids = _ids(_keep("none"))
    _fallback(model, lambda m: m(ids).logits, "sliding window")
    model.config.sliding_window = 64
    ref = _run(model, "sdpa", lambda m: m(ids).logits)
    out = _run(model, "genext", lambda m: m(ids).logits)
    assert dict(gt.calls) == {"genext": 2}
    assert rel(out, ref) < TOL[torch.float32]


def test_sliding_window_generate():
    """Mistral with a window of 4, a left-padded batch: the prefill (9 tokens) goes to sdpa, every
    decode step (the cache keeps the last 3 keys, the window then hides nothing) to genext."""
    config = transformers.MistralConfig(**LLAMA, sliding_window=4)
    model = _model(transformers.MistralForCausalLM, config, torch.float32)
    keep = _keep("left")

    def gen(m):
        return m.generate(
            _ids(keep), attention_mask=keep, max_new_tokens=6, do_sample=False, pad_token_id=0
        )

    ref = _run(model, "sdpa", gen)
    out = _run(model, "genext", gen)
    assert dict(gt.calls) == {"sdpa: sliding window": 2, "genext": 2 * 5}
    assert torch.equal(out, ref)


def test_static_cache():
    """A static cache holds empty slots past the tokens seen: the prefill's mask (causal over the
    first keys, top-left) goes to sdpa; a decode step's mask is a key mask over the filled slots
    (one query), which genext runs."""
    model = _llama(torch.float32)
    ids = _ids(_keep("none"))

    def gen(m):
        return m.generate(
            ids, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static"
        )

    ref = _run(model, "sdpa", gen)
    out = _run(model, "genext", gen)
    assert gt.calls["sdpa: 4-D mask"] == 2, dict(gt.calls)
    assert gt.calls["genext varlen"] + gt.calls["genext"] == 2 * 3, dict(gt.calls)
    assert torch.equal(out, ref)


def test_sinks_and_bad_masks_raise():
    module = torch.nn.Module()
    module.is_causal = True
    q, k = torch.randn(B, 4, L, 8), torch.randn(B, 2, L, 8)
    with pytest.raises(ValueError, match="s_aux"):
        gt.attention_forward(module, q, k, k, None, s_aux=torch.zeros(4))
    with pytest.raises(ValueError, match="boolean or integer"):
        gt.attention_forward(module, q, k, k, torch.zeros(B, L))
    with pytest.raises(ValueError, match=r"\(batch, keys\)"):
        gt.attention_forward(module, q, k, k, torch.ones(B, L + 1, dtype=torch.bool))


def test_direct_call_gqa_and_causal_alignment():
    """The function itself against sdpa's: GQA without repeated K/V, bottom-right causal for
    fewer queries than keys (a decode chunk), a key mask with holes, a custom scale, fp64."""
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    g = torch.Generator().manual_seed(6)
    q = torch.randn(B, 4, 3, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, 2, L, 8, generator=g, dtype=torch.float64) for _ in range(2))
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, 2:4] = False
    keep[2, :5] = False
    i, j = torch.arange(3).unsqueeze(1), torch.arange(L)
    dense = (j <= i + L - 3) & keep[:, None, None, :]
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for mask, ref_mask in ((None, (j <= i + L - 3).expand(B, 1, 3, L)), (keep, dense)):
        out, _ = gt.attention_forward(module, q, k, v, mask, scaling=0.3)
        ref, _ = sdpa_attention_forward(module, q, k, v, ref_mask, scaling=0.3)
        assert out.shape == (B, 3, 4, 8)
        assert rel(out, ref) < TOL[torch.float64]
        # a fallback gives sdpa the mask that means the same (bottom-right, padded keys)
        gt.calls.clear()
        out, _ = gt.attention_forward(module, q, k, v, mask, scaling=0.3, output_attentions=True)
        assert dict(gt.calls) == {"sdpa: output_attentions": 1}
        assert rel(out, ref) < TOL[torch.float64]


def test_register_paths(tmp_path):
    """register() is idempotent; from_pretrained(attn_implementation=...) and a config whose
    _attn_implementation is "genext" both run the backend."""
    assert gt.register() == gt.register() == "genext"
    model = _llama(torch.float32)
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="genext")
    ids = _ids(_keep("none"))
    gt.calls.clear()
    loaded(ids)
    assert dict(gt.calls) == {"genext": 2}
    config = transformers.LlamaConfig(**LLAMA)
    config._attn_implementation = "genext"
    gt.calls.clear()
    transformers.LlamaForCausalLM(config)(ids)
    assert dict(gt.calls) == {"genext": 2}


def test_import_genext_does_not_import_transformers():
    code = (
        "import sys, genext, genext.integrations.transformers; print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_routes():
    """attention_backend names the path for each case genext does not serve."""
    module = torch.nn.Module()
    module.is_causal = True
    q, k = torch.randn(B, 4, L, 8), torch.randn(B, 2, L, 8)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, :3] = False
    route = gt.attention_backend
    assert route(module, q, k, k, None) == "genext"
    assert route(module, q, k, k, keep) == "genext varlen"
    assert route(module, q, k, k, keep.long()) == "genext varlen"
    assert route(module, q, k, k, None, dropout=0.1) == "sdpa: dropout > 0"
    assert route(module, q, k, k, None, output_attentions=True) == "sdpa: output_attentions"
    assert route(module, q, k, k, None, softcap=30.0) == "sdpa: softcap"
    assert route(module, q, k, k, None, position_bias=torch.zeros(1)) == "sdpa: position_bias"
    assert route(module, q, k, k, None, sliding_window=4) == "sdpa: sliding window"
    assert route(module, q, k, k, None, sliding_window=L) == "genext"
    # a 4-D mask decides the pattern whatever the module says: a key mask broadcast over the
    # queries is bidirectional, as sdpa reads it
    assert route(module, q, k, k, keep[:, None, None, :]) == "genext varlen"
    assert route(module, q, k, k, keep[:, None, None, :].float()) == "sdpa: 4-D mask"
    assert route(module, q, k, k, keep[:, None, None, :].expand(B, 4, L, L)) == "sdpa: 4-D mask"
    # a value head dim that differs from the query's (as in MLA), K/V heads not dividing Q heads
    served = "sdpa: shapes, dtype or device not served"
    assert route(module, q, k, torch.randn(B, 2, L, 4), None) == served
    assert route(module, q, torch.randn(B, 3, L, 8), torch.randn(B, 3, L, 8), None) == served
    assert route(module, q, k[:, :, :4], k[:, :, :4], None) == (
        "sdpa: causal with more queries than keys"
    )
    module.is_causal = False
    assert route(module, q, k[:, :, :4], k[:, :, :4], None) == "genext"


def test_cpu_float32_gradient_routes_see_the_causal_flag(monkeypatch):
    """With gradients at a shape where PyTorch's CPU float32 kernel is the faster one for
    non-causal attention only (1024 keys, D 128), both flags are served by genext's ops, and the
    op hands only the non-causal call to PyTorch's SDPA."""
    spy = []
    ops_module = sys.modules["genext.ops.flash_attention"]  # the package attribute is the function
    original = ops_module._torch_sdpa  # PyTorch's SDPA, where the op hands calls

    def counting(*args, **kwargs):
        spy.append(kwargs.get("is_causal", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(ops_module, "_torch_sdpa", counting)
    module = torch.nn.Module()
    q = torch.randn(1, 2, 1024, 128, requires_grad=True)
    k = torch.randn(1, 1, 1024, 128, requires_grad=True)
    for causal in (True, False):
        module.is_causal = causal
        assert gt.attention_backend(module, q[:, :, :8], k, k, None) == "genext"
        assert gt.attention_backend(module, q, k, k, None) == "genext"
        assert gt.attention_backend(module, q, k, k, None, is_causal=not causal) == "genext"
    module.is_causal = True
    out, _ = gt.attention_forward(module, q, k, k, None)
    assert spy == []
    module.is_causal = False
    out2, _ = gt.attention_forward(module, q, k, k, None)
    assert spy == [False]
    want = original(q, k, k, enable_gqa=True).transpose(1, 2)
    assert (out2 - want).abs().max().item() <= 2e-5
    want = original(q, k, k, is_causal=True, enable_gqa=True).transpose(1, 2)
    assert (out - want).abs().max().item() <= 2e-5


def _mask_cases(keep):
    """Masks built by transformers' own helpers the ways models ask for them."""
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    x = torch.randn(B, L, 32)
    # the key mask sizes the keys of a one-query-row mask
    keys = keep if keep is not None else torch.ones(B, L, dtype=torch.long)
    return {
        "causal": lambda c: create_causal_mask(c, x, keep, None),
        "causal, no skip": lambda c: create_causal_mask(
            c, x, keep, None, allow_is_causal_skip=False
        ),
        "bidirectional": lambda c: create_bidirectional_mask(c, x, keep),
        "bidirectional, no skip": lambda c: create_bidirectional_mask(
            c, x, keep, allow_is_bidirectional_skip=False
        ),
        # LightGlue's: one query row, which sdpa broadcasts over every query
        "bidirectional, one query row": lambda c: create_bidirectional_mask(
            c, x[:, :1], keys, allow_is_bidirectional_skip=False
        ),
    }


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_mask_function_is_sdpas(padding):
    """The "genext" mask function returns what the "sdpa" one does (None or the same 4-D mask),
    so allow_is_causal_skip=False / allow_is_bidirectional_skip=False give a real 4-D mask."""
    config = transformers.LlamaConfig(**LLAMA)
    keep = _keep(padding) if padding != "none" else None
    for name, make in _mask_cases(keep).items():
        config._attn_implementation = "sdpa"
        ref = make(config)
        config._attn_implementation = "genext"
        out = make(config)
        if ref is None:
            assert out is None, name
        else:
            assert out is not None and out.shape == ref.shape, name
            assert out.dtype == ref.dtype and torch.equal(out, ref), name


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_mask_alone_decides_the_pattern(padding):
    """Whatever the module's is_causal says, a given 4-D mask decides, as in sdpa: each of
    transformers' masks, through genext's attention and through sdpa's with the mask the "sdpa"
    mask function gives, over every query row (rows of padded queries under a causal mask
    aside, which genext zeroes)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = transformers.LlamaConfig(**LLAMA)
    keep = _keep(padding) if padding != "none" else None
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, 4, L, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for flag in (True, False):
        module = torch.nn.Module()
        module.is_causal = flag
        for name, make in _mask_cases(keep).items():
            config._attn_implementation = "sdpa"
            ref, _ = sdpa_attention_forward(module, q, k, v, make(config))
            config._attn_implementation = "genext"
            gt.calls.clear()
            out, _ = gt.attention_forward(module, q, k, v, make(config))
            assert all(c.startswith("genext") for c in gt.calls), (name, dict(gt.calls))
            rows = torch.ones(B, L, dtype=torch.bool)
            if name.startswith("causal") and keep is not None:
                rows = keep.bool()
            assert rel(out[rows], ref[rows]) < TOL[torch.float64], (name, flag)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_query_rows_are_zero(padding):
    """Under a causal padding mask a query whose own key is padding outputs 0 (sdpa leaves
    values there); every real row is sdpa's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_causal_mask

    config = transformers.LlamaConfig(**LLAMA)
    config._attn_implementation = "genext"
    keep = _keep(padding)
    mask = create_causal_mask(config, torch.randn(B, L, 32), keep, None)
    module = torch.nn.Module()
    module.is_causal = True
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(B, 4, L, 8, generator=g) for _ in range(3))
    gt.calls.clear()
    out, _ = gt.attention_forward(module, q, k, v, mask)
    assert dict(gt.calls) == {"genext varlen": 1}
    ref, _ = sdpa_attention_forward(module, q, k, v, mask)
    real = keep.bool()
    assert torch.count_nonzero(out[~real]) == 0
    if padding == "right":  # these queries see real keys: sdpa's rows are not 0 there
        assert torch.count_nonzero(ref[~real]) > 0
    assert rel(out[real], ref[real]) < TOL[torch.float32]


def test_mask_changed_in_place_is_read_again():
    """The reading of a mask is kept on the mask for the next layers; changing the mask in place
    makes the next call read it again."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_causal_mask

    config = transformers.LlamaConfig(**LLAMA)
    config._attn_implementation = "genext"
    mask = create_causal_mask(config, torch.randn(B, L, 32), _keep("left"), None)
    module = torch.nn.Module()
    module.is_causal = True
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(B, 4, L, 8, generator=g, dtype=torch.float64) for _ in range(3))
    gt.calls.clear()
    gt.attention_forward(module, q, k, v, mask)
    mask[0, 0, L - 1, 2] = False  # no longer a key mask under the causal triangle
    out, _ = gt.attention_forward(module, q, k, v, mask)
    assert dict(gt.calls) == {"genext varlen": 1, "sdpa: 4-D mask": 1}
    ref, _ = sdpa_attention_forward(module, q, k, v, mask)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_doge_dynamic_bias_stays_causal(dtype):
    """Doge asks for the causal mask with allow_is_causal_skip=False and adds its dynamic bias to
    it: with a real 4-D mask the float sum goes to sdpa and stays causal."""
    config = transformers.DogeConfig(**LLAMA, keep_window_size=2048, is_moe=False)
    model = _model(transformers.DogeForCausalLM, config, dtype)
    ids = _ids(_keep("none"))
    ref = _run(model, "sdpa", lambda m: m(ids).logits)
    out = _run(model, "genext", lambda m: m(ids).logits)
    assert dict(gt.calls) == {"sdpa: 4-D mask": 2}
    assert rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_phi4_vision_padded_patches(dtype):
    """Phi4 multimodal's vision tower says is_causal=True and attends bidirectionally under its
    patch-padding mask (in sdpa the given mask decides): genext runs it bidirectionally."""
    from transformers.models.phi4_multimodal import modeling_phi4_multimodal as phi4

    config = transformers.Phi4MultimodalVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
        crop_size=16,
    )
    model = _model(phi4.Phi4MultimodalVisionModel, config, dtype)
    pixels = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    patches = torch.ones(B, 4, 4, dtype=torch.bool)
    patches[1, :, 2:] = False  # half of the second image's patches are padding
    patches[2, 3:] = False

    def fwd(m):
        return m(pixels, patch_attention_mask=patches).last_hidden_state

    ref = _run(model, "sdpa", fwd)
    out = _run(model, "genext", fwd)
    assert dict(gt.calls) == {"genext varlen": 2}
    real = patches.view(B, -1)
    assert rel(out[real], ref[real]) < TOL[dtype]


def test_gemma4_kv_shared_generate_left_padded():
    """Gemma 4 with KV-shared layers slices the query rows of its 4-D masks before the last
    layers: greedy generation of a left-padded batch gives sdpa's tokens."""
    config = transformers.Gemma4TextConfig(
        **{**LLAMA, "num_hidden_layers": 4},
        head_dim=8,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * 2,
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=2,
    )
    model = _model(transformers.Gemma4ForCausalLM, config, torch.float32)
    keep = _keep("left")

    def gen(m):
        return m.generate(
            _ids(keep), attention_mask=keep, max_new_tokens=4, do_sample=False, pad_token_id=0
        )

    ref = _run(model, "sdpa", gen)
    out = _run(model, "genext", gen)
    _assert_served("left")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_left_padded(dtype):
    """A left-padded prompt fed in two chunks through a DynamicCache: the second chunk's 3
    queries see the 6 cached keys and themselves (causal bottom-right under padding)."""
    model = _llama(dtype)
    keep = _keep("left")
    ids = _ids(keep)

    def fwd(m):
        cache = transformers.DynamicCache(config=m.config)
        first = m(ids[:, :6], attention_mask=keep[:, :6], cache=cache).logits
        second = m(ids[:, 6:], attention_mask=keep, cache=cache).logits
        return torch.cat([first, second], dim=1)

    ref = _run(model, "sdpa", fwd)
    out = _run(model, "genext", fwd)
    assert dict(gt.calls) == {"genext varlen": 2 * 2}
    real = keep.bool()
    assert rel(out[real], ref[real]) < TOL[dtype]


@pytest.mark.parametrize("padding", ["none", "left"])
def test_llama_cpu_bf16(padding):
    """bf16 on the CPU kernel: logits at real positions no further from the float64 logits than
    twice the distance of sdpa's in bf16."""
    keep = _keep(padding)
    ids = _ids(keep)
    mask = keep if padding != "none" else None
    real = keep.bool()
    exact = _llama(torch.float64)(ids, attention_mask=mask).logits[real]
    model = _llama(torch.bfloat16)

    def fwd(m):
        return m(ids, attention_mask=mask).logits[real]

    ref = _run(model, "sdpa", fwd)
    out = _run(model, "genext", fwd)
    _assert_served(padding)
    assert rel(out, exact) <= 2 * rel(ref, exact)


def test_compile_fullgraph(avx2_routing):
    """The routing traces without a graph break (dynamo only: the op's own compile test runs
    inductor), and the compiled call computes the eager one."""
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    g = torch.Generator().manual_seed(9)
    q = torch.randn(B, 4, L, 8, generator=g)
    k, v = (torch.randn(B, 2, L, 8, generator=g) for _ in range(2))

    def fn(q, k, v):
        return gt.attention_forward(module, q, k, v, None, scaling=0.3)[0]

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, k, v), fn(q, k, v))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_llama_cuda_16bit(padding, dtype):
    """On the GPU's tensor-core kernels: logits at real positions no further from the float64
    logits than twice the distance of sdpa's in the same dtype, and generation."""
    keep = _keep(padding)
    ids = _ids(keep)
    mask = keep if padding != "none" else None
    real = keep.bool()
    exact = _llama(torch.float64)(ids, attention_mask=mask).logits[real]
    model = _llama(dtype).cuda()

    def fwd(m):
        return m(ids.cuda(), attention_mask=None if mask is None else mask.cuda()).logits

    ref = _run(model, "sdpa", fwd)[real.cuda()].cpu()
    out = _run(model, "genext", fwd)[real.cuda()].cpu()
    _assert_served(padding)
    assert rel(out, exact) <= 2 * rel(ref, exact)
