"""genext.models.LlamaForCausalLM against transformers' LlamaForCausalLM, MistralForCausalLM and
Qwen2ForCausalLM with the same (perturbed random) weights: logits, loss and gradients on
unpadded, left- and right-padded batches, the rotary schedules, the generation protocol
(forward_packed, forward_decode) against the plain forward, loading, and that genext's
attention kernels are the ones that ran."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genext.models import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from genext.models._rope import rope_inv_freq, standardize_rope
from genext.nn import KVCache

from peer_parity import assert_grads_match, grads_after, op_names, perturb_, rel

transformers = pytest.importorskip("transformers")

# transformers' LlamaModelTester sizes (vocab 99, hidden 32, 2 layers, intermediate 37), with
# grouped-query attention: 4 query heads sharing 2 key/value heads
BASE = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)
CONFIGS = {
    "gqa": lambda: transformers.LlamaConfig(**BASE),
    # plain multi-head attention, with Llama's optional biases on q/k/v/o and the MLP
    "mha_bias": lambda: transformers.LlamaConfig(
        **{**BASE, "num_key_value_heads": 4}, attention_bias=True, mlp_bias=True
    ),
    "tied": lambda: transformers.LlamaConfig(**BASE, tie_word_embeddings=True),
    # head_dim 16 != hidden / heads = 8: the projections are 64 wide for a hidden size of 32
    "head_dim16": lambda: transformers.LlamaConfig(**BASE, head_dim=16),
    # a single key/value head (multi-query), theta changed
    "mqa_theta": lambda: transformers.LlamaConfig(
        **{**BASE, "num_key_value_heads": 1}, rope_parameters={"rope_theta": 500.0}
    ),
    "mistral": lambda: transformers.MistralConfig(**BASE, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**BASE),
}
PEERS = {
    "llama": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread while these tests run: the matrices are a few dozen wide, and on a
    busy machine two threads synchronising per GEMM made a (27, 32) x (32, 99) product take 30 ms
    instead of 30 us."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def perturb_weights_(peer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """perturb_ on the parameters only: the rotary embedding's buffers (inv_freq) are constants
    computed from the config, not weights (they are not in the state_dict), so noise there would
    only make the two models disagree about the positions."""
    buffers = {k: b.clone() for k, b in peer.named_buffers()}
    perturb_(peer, scale=0.3, seed=seed)
    with torch.no_grad():
        for k, b in peer.named_buffers():
            b.copy_(buffers[k])
    return peer


def _pair(config, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    peer = PEERS[config.model_type](config)
    peer = perturb_weights_(peer, seed).to(dtype)
    ours = LlamaForCausalLM.from_config(config).to(dtype)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


def _batch(padding: str, vocab: int = 99, b: int = 3, n: int = 9):
    """Token ids (B, L), attention mask, labels (-100 on padding)."""
    ids = torch.randint(1, vocab, (b, n))
    mask = torch.ones(b, n, dtype=torch.long)
    if padding != "none":
        # sequence lengths 9, 4, 7 (one unpadded row, one mostly padding)
        for row, real in ((1, 4), (2, 7)):
            if padding == "left":
                mask[row, : n - real] = 0
            else:
                mask[row, real:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _ref_loss(logits, labels, mask):
    """The shifted cross-entropy written out (float64 when the logits are): the logits at t
    predict labels[t + 1], over the real positions whose label is not -100."""
    pred, target = logits[:, :-1], labels[:, 1:].clone()
    target[mask[:, :-1] == 0] = -100
    keep = target != -100
    return F.cross_entropy(pred[keep], target[keep])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_keys_are_transformers(name):
    config = CONFIGS[name]()
    peer = PEERS[config.model_type](config)
    ours = LlamaForCausalLM.from_config(config)
    assert list(ours.state_dict()) == list(peer.state_dict())
    for k, v in peer.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    # neither side saves the rotary frequencies (a non-persistent buffer in both)
    assert not any("rotary" in k or "inv_freq" in k for k in peer.state_dict())
    ours.load_state_dict(peer.state_dict(), strict=True)
    if config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_loss_and_grads_match(name, dtype, padding):
    """Logits, loss and every parameter's gradient against transformers.

    Only the real positions are compared: genext does not compute the padded ones (their
    logits are 0), and transformers' values there come from queries whose keys are all masked,
    which mean nothing. Padding never reaches a real position in either model (masked as keys),
    so the real logits and all gradients of losses over them must agree.

    transformers upcasts the logits to float32 for its loss, float64 ones included, so in
    float64 the loss is checked against the cross-entropy written out on transformers' logits,
    and the gradients of that written-out loss are compared; in float32 the gradients of each
    model's own loss."""
    config = CONFIGS[name]()
    ours, peer = _pair(config, dtype)
    ids, mask, labels = _batch(padding)
    mask_arg = None if padding == "none" else mask
    tol = TOL[dtype]
    real = mask.bool()
    out, ref = (
        ours(ids, attention_mask=mask_arg, labels=labels),
        peer(ids, attention_mask=mask_arg, labels=labels),
    )
    assert out.logits.shape == ref.logits.shape
    assert out.logits.dtype == dtype
    assert rel(out.logits[real], ref.logits[real]) < tol
    if padding != "none":
        assert (out.logits[~real] == 0).all()
    assert rel(out.loss, _ref_loss(ref.logits.double(), labels, mask)) < tol
    # with left padding the first real token's label is predicted at a padded position:
    # transformers counts that prediction (from a meaningless logit), genext does not; with
    # that label also -100 the two losses are the same
    strict = labels.masked_fill(F.pad(mask, (1, 0))[:, :-1] == 0, -100)
    assert rel(ours(ids, attention_mask=mask_arg, labels=strict).loss, out.loss) < 1e-15
    if dtype == torch.float32:
        assert rel(out.loss, peer(ids, attention_mask=mask_arg, labels=strict).loss) < tol

        def loss_fn(m):
            return m(ids, attention_mask=mask_arg, labels=strict).loss
    else:

        def loss_fn(m):
            return _ref_loss(m(ids, attention_mask=mask_arg).logits, labels, mask)

    assert_grads_match(grads_after(ours, loss_fn), grads_after(peer, loss_fn), tol)


def test_inputs_embeds_position_ids_and_num_items():
    config = CONFIGS["gqa"]()
    ours, peer = _pair(config, torch.float64)
    ids, mask, labels = _batch("left")
    emb = peer.model.embed_tokens(ids).detach()
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 0, 1, 2, 3], [5] * 9])
    pos[2] = torch.arange(9) + 3  # an offset, as a continuation would have
    out = ours(inputs_embeds=emb, attention_mask=mask, position_ids=pos, labels=labels)
    ref = peer(inputs_embeds=emb, attention_mask=mask, position_ids=pos)
    real = mask.bool()
    assert rel(out.logits[real], ref.logits[real]) < 1e-10
    summed = ours(
        inputs_embeds=emb,
        attention_mask=mask,
        position_ids=pos,
        labels=labels,
        num_items_in_batch=5,
    ).loss
    # the counted labels: not -100 and predicted at a real position
    count = int(((labels[:, 1:] != -100) & (mask[:, :-1] == 1)).sum())
    assert rel(summed * 5 / count, out.loss) < 1e-12
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        ours(ids, inputs_embeds=emb)


# rope schedules on a model whose max_position_embeddings (16) the long batch passes
ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 8,
        "mscale": 0.8,
        "mscale_all_dim": 0.5,
        "beta_fast": 16,
        "beta_slow": 2,
        "truncate": False,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0, 1.1, 1.3, 1.7],
        "long_factor": [1.5, 2.5, 4.0, 7.0],
        "original_max_position_embeddings": 8,
    },
    "longrope_factor": {
        "rope_type": "longrope",
        "short_factor": [1.0, 1.2, 1.4, 1.6],
        "long_factor": [2.0, 3.0, 5.0, 9.0],
        "original_max_position_embeddings": 8,
        "factor": 2.0,
        "attention_factor": 1.3,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
}


def _rope_config(params):
    return transformers.LlamaConfig(
        **{**BASE, "max_position_embeddings": 16},
        rope_parameters={"rope_theta": 1000.0, **params},
    )


@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_frequencies_match_transformers(kind):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = _rope_config(ROPES[kind])
    params = standardize_rope(config.rope_parameters, None, None, 16)
    fn = ROPE_INIT_FUNCTIONS[params["rope_type"]]
    # seq_len as transformers' forward passes it (the batch's largest position + 1, a tensor)
    for seq_len in (None, 9, 16, 17, 40):
        arg = None if seq_len is None else torch.tensor(seq_len)
        want, want_scale = fn(config, None, seq_len=arg)
        got, scale = rope_inv_freq(params, 8, 16, seq_len)
        assert got.dtype == torch.float32
        assert torch.equal(got, want.float()), (seq_len, got, want)
        assert scale == pytest.approx(want_scale, rel=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_models_match_transformers(kind, dtype):
    config = _rope_config(ROPES[kind])
    ours, peer = _pair(config, dtype)
    # 24 positions pass both max_position_embeddings (16) and the original 8; the short batch
    # after it stays below (dynamic returns to the original frequencies, longrope to short)
    for n in (24, 6):
        ids = torch.randint(1, 99, (2, n))
        with torch.no_grad():
            assert rel(ours(ids).logits, peer(ids).logits) < TOL[dtype], n


def test_rope_old_layout_and_errors():
    """transformers 4.x's rope_scaling + rope_theta gives the same model as 5.x's
    rope_parameters; unsupported rope settings and options raise with the field's name."""
    new = LlamaForCausalLM.from_config(
        {**BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}
    )
    old = LlamaForCausalLM.from_config(
        {**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 500.0}
    )
    assert torch.equal(new.model.rotary_emb.inv_freq, old.model.rotary_emb.inv_freq)
    assert new.config.rope_parameters == old.config.rope_parameters
    with pytest.raises(ValueError, match="rope_type"):
        LlamaForCausalLM(**BASE, rope_parameters={"rope_type": "mrope"})
    with pytest.raises(ValueError, match="needs \\['factor'\\]"):
        LlamaForCausalLM(**BASE, rope_parameters={"rope_type": "linear"})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        LlamaForCausalLM(**BASE, rope_parameters={"partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="attention_dropout"):
        LlamaForCausalLM(**BASE, attention_dropout=0.1)
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaForCausalLM(**BASE, hidden_act="quick_gelu")


def test_config_forms_and_family_classes():
    config = CONFIGS["qwen2"]()
    from_obj = LlamaForCausalLM.from_config(config)
    from_dict = LlamaForCausalLM.from_config(config.to_dict())
    assert from_obj.config == from_dict.config
    assert from_obj.model.layers[0].self_attn.q_proj.bias is not None
    assert from_obj.model.layers[0].self_attn.o_proj.bias is None
    # the family classes only change the default model_type
    assert Qwen2ForCausalLM(**BASE).model.layers[0].self_attn.k_proj.bias is not None
    assert (
        MistralForCausalLM(**BASE, attention_bias=True).model.layers[0].self_attn.q_proj.bias
        is None
    )


def test_mistral_sliding_window_refused_past_the_window():
    config = transformers.MistralConfig(**BASE, sliding_window=8)
    ours, peer = _pair(config)
    ids = torch.randint(1, 99, (2, 8))
    with torch.no_grad():  # up to the window it changes nothing
        assert rel(ours(ids).logits, peer(ids).logits) < 1e-5
    with pytest.raises(ValueError, match="sliding_window"):
        ours(torch.randint(1, 99, (2, 9)))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[:, :2] = 0  # 8 real tokens in 10: fine
    ours(torch.randint(1, 99, (2, 10)), attention_mask=mask)
    with pytest.raises(ValueError, match="sliding_window"):
        ours.generate(ids, max_new_tokens=1)
    # Qwen2 without use_sliding_window ignores its sliding_window, as transformers does; with
    # it, the layers from max_window_layers on slide
    assert Qwen2ForCausalLM(**BASE, sliding_window=4).sliding_window is None
    qwen = transformers.Qwen2Config(
        **{**BASE, "num_hidden_layers": 3},
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    assert qwen.layer_types[2] == "sliding_attention"
    assert LlamaForCausalLM.from_config(qwen).sliding_window == 4
    assert MistralForCausalLM(**BASE).sliding_window is None  # sliding_window None: full


def _packed(seqs):
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).to(torch.int32)
    return ids, pos, cu, max(len(s) for s in seqs)


@pytest.mark.parametrize("name", ["gqa", "head_dim16", "qwen2"])
def test_forward_packed_equals_forward(name):
    ours, _ = _pair(CONFIGS[name](), torch.float64)
    seqs = [torch.randint(1, 99, (n,)) for n in (5, 1, 8)]  # one single-token sequence
    ids, pos, cu, longest = _packed(seqs)
    with torch.no_grad():
        packed = ours.forward_packed(ids, pos, cu, longest)
        want = torch.cat([ours(s[None]).logits[0] for s in seqs])
    assert packed.shape == (len(ids), 99)
    assert rel(packed, want) < 1e-12
    # last_only: each sequence's last token's logits, (B, vocab), as a prefill needs
    with torch.no_grad():
        last = ours.forward_packed(ids, pos, cu, longest, last_only=True)
    assert last.shape == (len(seqs), 99)
    assert rel(last, packed[cu[1:].long() - 1]) < 1e-12  # one GEMM of B rows, not of T


@pytest.mark.parametrize("block_size", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_decode_step_by_step_equals_forward(dtype, block_size):
    """Prefill the prompts (lengths 4, 2, 6) with forward_packed into one KVCache per layer,
    then feed the rest of each sequence one token at a time (and once two at a time) with
    forward_decode: every step's logits are the full forward's at that position."""
    ours, _ = _pair(CONFIGS["gqa"](), dtype)
    prompt_lens, total = (4, 2, 6), 11
    full = torch.randint(1, 99, (3, total))
    with torch.no_grad():
        want = torch.stack([ours(full[b : b + 1]).logits[0] for b in range(3)])
        n_layers, hk, d = ours.kv_cache_spec()
        assert (n_layers, hk, d) == (2, 2, 8)
        caches = [
            KVCache(3, hk, d, 5, dtype=dtype, block_size=block_size) for _ in range(n_layers)
        ]  # capacity 5: the caches must grow on the way
        ids, pos, cu, longest = _packed([full[b, :n] for b, n in enumerate(prompt_lens)])
        pre = ours.forward_packed(ids, pos, cu, longest, caches)
        got = [pre[cu[b + 1] - 1] for b in range(3)]
        assert caches[0].lengths == prompt_lens
        lens = torch.tensor(prompt_lens)
        steps = [1, 2, 1, 1]
        for lq in steps:
            idx = lens[:, None] + torch.arange(lq)
            out = ours.forward_decode(full.gather(1, idx), idx, caches)
            assert out.shape == (3, lq, 99)
            for b in range(3):
                assert rel(out[b], want[b, idx[b]]) < TOL[dtype]
            lens += lq
        assert caches[1].lengths == tuple(lens.tolist())
        for b in range(3):
            assert rel(got[b], want[b, prompt_lens[b] - 1]) < TOL[dtype]


@pytest.mark.parametrize("padding", ["none", "left"])
def test_genext_attention_ran_not_sdpa(padding, avx2_routing):
    ours, _ = _pair(CONFIGS["gqa"]())
    ids, mask, labels = _batch(padding)
    mask_arg = None if padding == "none" else mask
    ran = op_names(lambda: ours(ids, attention_mask=mask_arg, labels=labels).loss.backward())
    assert "genext::flash_attention_forward" in ran
    assert "genext::flash_attention_backward" in ran
    assert not any("scaled_dot_product" in name for name in ran), sorted(ran)
    with torch.no_grad():
        ran = op_names(lambda: ours.generate(ids, attention_mask=mask_arg, max_new_tokens=2))
    assert {"genext::flash_attention_forward", "genext::attention_with_kvcache"} <= ran
    assert not any("scaled_dot_product" in name for name in ran), sorted(ran)


def test_bfloat16_no_worse_than_transformers():
    """In bfloat16 the rotary frequencies stay float32 (.to() does not round them), and the
    logits' error against the float64 model is at most twice transformers' bfloat16 error."""
    config = CONFIGS["gqa"]()
    ours, peer = _pair(config, torch.float64)
    ids = torch.randint(1, 99, (2, 12))
    with torch.no_grad():
        exact = peer(ids).logits
        ours16, peer16 = ours.to(torch.bfloat16), peer.to(torch.bfloat16)
        assert ours16.model.rotary_emb.inv_freq.dtype == torch.float32
        err = rel(ours16(ids).logits, exact)
        assert err <= 2 * rel(peer16(ids).logits, exact), err


def test_gradient_checkpointing_same_grads():
    ours, _ = _pair(CONFIGS["gqa"](), torch.float64)
    ids, mask, labels = _batch("right")

    def loss_fn(m):
        return m(ids, attention_mask=mask, labels=labels).loss

    plain = grads_after(ours, loss_fn)
    ours.enable_gradient_checkpointing()
    assert_grads_match(grads_after(ours, loss_fn), plain, 1e-12)


def test_loads_a_transformers_folder(tmp_path):
    """from_pretrained reads what transformers' save_pretrained writes (config.json and
    model.safetensors, where a tied lm_head is not stored)."""
    pytest.importorskip("safetensors")
    config = CONFIGS["tied"]()
    _, peer = _pair(config)
    peer.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(1, 99, (2, 5))
    with torch.no_grad():
        assert rel(ours(ids).logits, peer(ids).logits) < 1e-5
    # and genext's own save_pretrained round-trips, tied weights still tied
    ours.save_pretrained(tmp_path / "genext")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "genext")
    assert again.config == ours.config
    assert again.lm_head.weight is again.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)


@pytest.mark.cuda
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_against_float64(dtype, padding):
    """On the GPU (genext's CUDA kernels): logits and gradients against the float64 model on
    the CPU; float32 within 1e-5, 16-bit types no worse than twice transformers' error in that
    dtype on the same GPU."""
    config = CONFIGS["gqa"]()
    ours, peer = _pair(config, torch.float64)
    ids, mask, labels = _batch(padding)
    mask_arg = None if padding == "none" else mask
    real = mask.bool()

    def run(model, device):
        cuda = lambda t: None if t is None else t.to(device)  # noqa: E731
        return model(cuda(ids), attention_mask=cuda(mask_arg)).logits

    def loss_fn(model):
        device = next(model.parameters()).device
        logits = run(model, device)
        return _ref_loss(logits.double(), labels.to(device), mask.to(device))

    exact = run(peer, "cpu").detach()
    exact_grads = grads_after(peer, loss_fn)
    ours_c, peer_c = ours.to("cuda", dtype), peer.to("cuda", dtype)
    ours_err = rel(run(ours_c, "cuda").detach().cpu()[real], exact[real])
    ours_grads = {k: g.cpu() for k, g in grads_after(ours_c, loss_fn).items()}
    if dtype == torch.float32:
        assert ours_err < 1e-5
        assert_grads_match(ours_grads, exact_grads, 1e-5)
        return
    peer_err = rel(run(peer_c, "cuda").detach().cpu()[real], exact[real])
    assert ours_err <= 2 * peer_err, (ours_err, peer_err)
    peer_grads = {k: g.cpu() for k, g in grads_after(peer_c, loss_fn).items()}
    for k, g in exact_grads.items():
        assert rel(ours_grads[k], g) <= 2 * rel(peer_grads[k], g) + 1e-6, k


# ---- construction from a config, packed sequences, saving ------------------------------------


@pytest.mark.parametrize("name", ["gqa", "mistral", "qwen2"])
def test_constructs_from_a_config_as_transformers(name):
    """``LlamaForCausalLM(config)`` with a config object or its dict, keyword fields overriding,
    is ``from_config``; an int first is still vocab_size; anything else is a TypeError. (The
    override form comes first: without the config handling a dict lands in vocab_size, and a
    bare ``LlamaForCausalLM(config_dict)`` builds the 7B default.)"""
    config = CONFIGS[name]()
    cls = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}
    one_layer = LlamaForCausalLM(config.to_dict(), num_hidden_layers=1, intermediate_size=40)
    assert len(one_layer.model.layers) == 1 and one_layer.config.hidden_size == 32
    want = LlamaForCausalLM.from_config(config).config
    for model in (
        LlamaForCausalLM(config),
        LlamaForCausalLM(config.to_dict()),
        LlamaForCausalLM(config=config),
        cls[config.model_type](config),
    ):
        assert model.config == want
    assert list(LlamaForCausalLM(config).state_dict()) == list(
        PEERS[config.model_type](config).state_dict()
    )
    plain = LlamaForCausalLM(99, hidden_size=32, intermediate_size=37, num_hidden_layers=1)
    assert plain.config.vocab_size == 99
    with pytest.raises(TypeError, match="first argument must be a config .* or vocab_size"):
        LlamaForCausalLM("llama")
    with pytest.raises(TypeError, match="keyword arguments"):
        LlamaForCausalLM(config, 32)


def _packed_rows():
    """Two rows of packed sequences (DataCollatorWithFlattening's layout): position ids that
    restart, one sequence of a single token, a row that starts mid-sequence (positions 3, 4,
    ...: one sequence), the first label of every sequence -100."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0], [3, 4, 5, 6, 0, 1, 0, 1, 2]])
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 99, pos.shape, generator=g)
    labels = ids.masked_fill(pos == 0, -100)
    return ids, pos, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["gqa", "qwen2"])
def test_packed_position_ids_match_transformers(name, dtype):
    """Without an attention_mask, position ids that restart separate sequences, as transformers'
    masks (find_packed_sequence_indices) without a cache: logits, loss and gradients."""
    ours, peer = _pair(CONFIGS[name](), dtype)
    ids, pos, labels = _packed_rows()
    tol = TOL[dtype]
    with torch.no_grad():
        out = ours(ids, position_ids=pos, labels=labels)
        ref = peer(ids, position_ids=pos, labels=labels, use_cache=False)
        assert rel(out.logits, ref.logits) < tol
        if dtype == torch.float32:
            assert rel(out.loss, ref.loss) < tol
        else:  # transformers' loss is float32; the float64 reference from its logits
            assert rel(out.loss, _ref_loss(ref.logits, labels, torch.ones_like(ids))) < tol
        # the second sequence of row 0 is that sequence alone
        alone = ours(ids[:1, 3:8]).logits
        assert rel(out.logits[:1, 3:8], alone) < tol
        # one row of positions for the whole batch is read per row too
        same = ours(ids, position_ids=pos[:1]).logits
        assert rel(same, peer(ids, position_ids=pos[:1], use_cache=False).logits) < tol
        # with an attention mask the positions are only positions, as in transformers
        ones = torch.ones_like(ids)
        masked = ours(ids, attention_mask=ones, position_ids=pos).logits
        assert rel(masked, peer(ids, attention_mask=ones, position_ids=pos).logits) < tol
        assert rel(masked, out.logits) > 1e-3
    w = torch.randn(ids.shape + (99,), dtype=dtype)

    def loss_fn(model):
        extra = {} if model is ours else {"use_cache": False}
        o = model(ids, position_ids=pos, labels=labels, **extra)
        return (o.logits * w).sum() + (o.loss if dtype == torch.float32 else 0.0)

    assert_grads_match(grads_after(ours, loss_fn), grads_after(peer, loss_fn), tol)
    names = op_names(lambda: ours(ids, position_ids=pos))
    assert "genext::flash_attention_forward" in names
    assert not any("scaled_dot_product" in n for n in names)


def test_save_pretrained_is_read_by_transformers(tmp_path):
    """genext's save_pretrained writes transformers' layout (model.safetensors, a config.json
    with model_type and architectures): transformers' from_pretrained reads it, with the same
    outputs; a float64 model round-trips exactly through genext's from_pretrained (built in
    the checkpoint's dtype, not through float32) and transformers'."""
    pytest.importorskip("safetensors")
    for name in ("tied", "qwen2"):
        ours, _ = _pair(CONFIGS[name](), torch.float64)
        folder = tmp_path / name
        ours.save_pretrained(folder)
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        peer = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert type(peer) is PEERS[ours.config.model_type] and peer.dtype == torch.float64
        again = LlamaForCausalLM.from_pretrained(folder)
        assert again.dtype == torch.float64 and again.config == ours.config
        ids = torch.randint(1, 99, (2, 7))
        with torch.no_grad():
            assert torch.equal(again(ids).logits, ours(ids).logits)
            assert rel(peer(ids).logits, ours(ids).logits) < 1e-12
        for k, v in ours.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k
            assert torch.equal(peer.state_dict()[k], v), k
    as_half = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert as_half.dtype == torch.bfloat16
    want = ours.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(as_half.model.embed_tokens.weight, want)


def test_all_padding_batch():
    """A batch of padding only: zero logits and a NaN loss (the mean over no token), as
    documented, and the backward runs; a row of padding only in a batch is zeros."""
    ours, _ = _pair(CONFIGS["gqa"](), torch.float64)
    ids, _, labels = _batch("none")
    out = ours(ids, attention_mask=torch.zeros_like(ids), labels=labels)
    assert torch.count_nonzero(out.logits) == 0 and torch.isnan(out.loss)
    out.logits.sum().backward()
    mask = torch.ones_like(ids)
    mask[1] = 0
    with torch.no_grad():
        one_row = ours(ids, attention_mask=mask).logits
        assert torch.count_nonzero(one_row[1]) == 0
        assert rel(one_row[0], ours(ids[:1]).logits[0]) < 1e-12
