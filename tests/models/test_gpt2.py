"""genext.models.GPT2LMHeadModel / GPT2Model against transformers' GPT-2 with the same (perturbed
random) weights: logits, loss and gradients with and without padding, dropout in training, the
causal-LM protocol (packed prefill into KVCaches, decode steps, greedy generation against
transformers' generate), loading, and that genext's attention kernels are the ones that ran."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import genext
from genext.models import GPT2LMHeadModel, GPT2Model

from peer_parity import assert_grads_match, grads_after, op_names, perturb_, rel

transformers = pytest.importorskip("transformers")

# transformers' own tiny test config (tests/models/gpt2/test_modeling_gpt2.py, GPT2ModelTester:
# vocab 99, hidden 32, 2 layers, 4 heads, 512 positions, "gelu", bos = eos = pad = vocab - 1)
TINY = dict(
    vocab_size=99,
    n_embd=32,
    n_layer=2,
    n_head=4,
    n_positions=512,
    activation_function="gelu",
    resid_pdrop=0.1,
    embd_pdrop=0.1,
    attn_pdrop=0.1,
    bos_token_id=98,
    eos_token_id=98,
    pad_token_id=98,
)
# the switches off the default path: GPT-2's own gelu_new, an MLP width that is not 4 * n_embd
# (the tester's intermediate_size 37), the per-layer softmax scale, the eager attention's upcast
# (float32 only: a no-op there apart from rounding), 5 layers, another LayerNorm eps
VARIANT = dict(
    TINY,
    n_layer=5,
    n_inner=37,
    activation_function="gelu_new",
    scale_attn_by_inverse_layer_idx=True,
    reorder_and_upcast_attn=True,
    layer_norm_epsilon=1e-3,
)
# no softmax scale at all (scale_attn_weights=False), ReLU
UNSCALED = dict(TINY, scale_attn_weights=False, activation_function="relu")
CONFIGS = {"tiny": TINY, "variant": VARIANT, "unscaled": UNSCALED}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
B, L = 3, 13  # 13: not a multiple of any tile


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the models are tiny, and on a shared machine idle OpenMP workers
    waiting for a core made every matmul tens of milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(config: dict, dtype: torch.dtype, attn: str = "eager", seed: int = 0):
    """(ours, peer) in eval mode with the same weights. The peer runs transformers' eager
    attention: explicit masks, any dtype."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**config, attn_implementation=attn)
    peer = perturb_(transformers.GPT2LMHeadModel(cfg), seed=seed).to(dtype).eval()
    ours = GPT2LMHeadModel.from_config(cfg).to(dtype).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


def _ids(batch: int = B, length: int = L, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 98, (batch, length), generator=g)


def _mask(kind: str) -> torch.Tensor | None:
    """None (no padding), all ones (no padding either: the dense path), or a (B, L) mask with
    rows of different real lengths, one full; "holes": pads inside the rows, which the packing
    treats as any other pad (a real token attends to the real tokens before it)."""
    if kind == "none":
        return None
    m = torch.ones(B, L, dtype=torch.long)
    for b, n in enumerate([5, 0, 1]):
        if kind == "left":
            m[b, :n] = 0
        elif kind == "right":
            m[b, L - n :] = 0
        elif kind == "holes":
            m[b, 2 : 2 + n] = 0
    return m


# every layout on the tiny config, the two main ones on the others
CASES = [("tiny", p) for p in ("none", "ones", "left", "right", "holes")] + [
    (n, p) for n in ("variant", "unscaled") for p in ("none", "left")
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "padding"), CASES)
def test_logits_loss_grads_match_transformers(name, padding, dtype):
    config = CONFIGS[name]
    if dtype == torch.float64:
        # transformers' upcast path computes the scores in float32 and raises on float64 masks
        config = dict(config, reorder_and_upcast_attn=False)
    ours, peer = _pair(config, dtype)
    ids, mask = _ids(), _mask(padding)
    real = torch.ones(B, L, dtype=torch.bool) if mask is None else mask.bool()
    # -100 for every label a padding position would predict: the pads' own labels (as data
    # collators set them) and, with left padding, each row's first real token (predicted by the
    # last pad); genext leaves predictions made at pads out of the loss, transformers counts them
    after_real = F.pad(real, (1, 0), value=True)[:, :-1]
    labels = ids.masked_fill(~(real & after_real), -100)
    tol = TOL[dtype]
    # Only real positions are compared: at a padding position transformers computes logits from a
    # query row whose every key is masked (a meaningless softmax), genext skips it (zeros).
    w = torch.randn(int(real.sum()), config["vocab_size"], dtype=dtype)

    with torch.no_grad():
        po = peer(ids, attention_mask=mask, labels=labels)
        oo = ours(ids, attention_mask=mask, labels=labels)
    assert oo.logits.shape == po.logits.shape == (B, L, config["vocab_size"])
    assert rel(oo.logits[real], po.logits[real]) < tol
    assert torch.count_nonzero(oo.logits[~real]) == 0
    emb = ours.transformer.wte(ids)
    assert rel(ours(inputs_embeds=emb, attention_mask=mask).logits, oo.logits) == 0
    # transformers computes the loss in float32 even for float64 logits; genext in the logits'
    # dtype: in float64 the reference is the shifted cross-entropy of the peer's logits
    if dtype == torch.float32:
        assert rel(oo.loss, po.loss) < tol
    else:
        target = F.pad(labels, (0, 1), value=-100)[:, 1:]
        want = F.cross_entropy(po.logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        assert rel(oo.loss, want) < tol

    def loss_fn(model):
        out = model(ids, attention_mask=mask, labels=labels)
        extra = out.loss if dtype == torch.float32 else 0.0
        return (out.logits[real] * w).sum() + extra

    ga, gb = grads_after(ours, loss_fn), grads_after(peer, loss_fn)
    assert "transformer.wte.weight" in gb and "lm_head.weight" not in gb  # tied: one gradient
    assert_grads_match(ga, gb, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_labels_at_padding_positions_are_left_out(dtype):
    """A prediction made at a padding position does not count, whatever its label."""
    ours, _ = _pair(TINY, dtype)
    ids, mask = _ids(), _mask("left")
    masked = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, labels=ids).loss
        b = ours(ids, attention_mask=mask, labels=masked).loss
    # the last pad of each left-padded row predicts the row's first real token: dropped in a
    target = F.pad(masked, (0, 1), value=-100)[:, 1:].masked_fill(mask == 0, -100)
    logits = ours(ids, attention_mask=mask).logits
    want = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    assert rel(a, want) < TOL[dtype] and rel(b, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_dropout_matches_transformers_sdpa(dtype, avx2_routing):
    """In train mode every dropout is drawn as transformers draws it (the attention dropout through
    PyTorch's SDPA, genext's kernel having none), so with one seed the outputs agree; with
    attn_pdrop=0 the attention runs genext's kernel and the embedding/residual dropouts still
    agree."""
    for attn_pdrop, kernel in ((0.1, "aten::scaled_dot_product_attention"), (0.0, None)):
        ours, peer = _pair(dict(TINY, attn_pdrop=attn_pdrop), dtype, attn="sdpa")
        ours.train(), peer.train()
        ids = _ids()

        def run(model, ids=ids):
            torch.manual_seed(7)
            out = model(ids, labels=ids)
            return out.logits, out.loss

        (lo, so), (lp, sp) = run(ours), run(peer)
        assert rel(lo, lp) < TOL[dtype]
        assert rel(run(ours)[0], lo) == 0  # the seed decides
        torch.manual_seed(8)
        assert rel(ours(ids).logits, lo) > 1e-3  # dropout is on
        if dtype == torch.float32:
            assert rel(so, sp) < TOL[dtype]

        def loss_fn(model):
            lg, ls = run(model)
            return lg.square().mean() + (ls if dtype == torch.float32 else 0.0)

        assert_grads_match(grads_after(ours, loss_fn), grads_after(peer, loss_fn), TOL[dtype])
        names = op_names(lambda ours=ours: loss_fn(ours).backward())
        if kernel is None:
            assert "genext::flash_attention_forward" in names
            assert not any("scaled_dot_product" in n for n in names)
        else:
            assert kernel in names


def test_attention_dropout_on_packed_tokens_keeps_sequences_apart():
    """With padding, attention dropout in training runs SDPA on the packed tokens with a
    block-diagonal causal mask. At a dropout probability of 1e-12 no element is dropped (the
    chance is about 1e-8 over the whole test) and the kept ones are scaled by 1 / (1 - 1e-12), so
    the logits are the evaluation logits to about 1e-12: the mask keeps sequences apart and causal."""
    cfg = dict(TINY, attn_pdrop=1e-12, resid_pdrop=0.0, embd_pdrop=0.0)
    ours, _ = _pair(cfg, torch.float64)
    ids, mask = _ids(), _mask("holes")
    with torch.no_grad():
        want = ours(ids, attention_mask=mask).logits
        ours.train()
        names = op_names(lambda: ours(ids, attention_mask=mask))
        got = ours(ids, attention_mask=mask).logits
    assert "aten::scaled_dot_product_attention" in names
    assert "genext::flash_attention_forward" not in names
    assert rel(got, want) < 1e-10


def test_kernels_ran(avx2_routing):
    ours, _ = _pair(TINY, torch.float32)
    ids = _ids()
    for mask in (None, _mask("left")):
        names = op_names(lambda mask=mask: ours(ids, attention_mask=mask).logits.sum().backward())
        assert "genext::flash_attention_forward" in names
        assert "genext::flash_attention_backward" in names
        assert not any("scaled_dot_product" in n for n in names), sorted(names)
    # q, k, v reach the kernel as strided views of c_attn's output: nothing copies them
    with torch.no_grad():
        for mask in (None, _mask("right")):
            names = op_names(lambda mask=mask: ours(ids, attention_mask=mask))
            assert not {"aten::clone", "aten::contiguous"} & names
    caches = _caches(ours, B, torch.float32)
    lens = [4, 7, 2]
    tokens, pos, cu = _packed([ids[b, :n] for b, n in enumerate(lens)])
    with torch.no_grad():
        names = op_names(lambda: ours.forward_packed(tokens, pos, cu, max(lens), caches))
        assert "genext::flash_attention_forward" in names
        step = torch.tensor(lens).unsqueeze(1)
        names = op_names(lambda: ours.forward_decode(ids[:, :1], step, caches))
    assert "genext::attention_with_kvcache" in names
    assert not any("scaled_dot_product" in n for n in names)


# ---- the causal-LM protocol ---------------------------------------------------------------------


def _packed(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (T,), positions (T,), cu_seqlens int32 (B + 1,)) of sequences packed end to end."""
    lengths = torch.tensor([len(s) for s in seqs])
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    return torch.cat(seqs), pos, cu


def _caches(model, batch: int, dtype: torch.dtype, capacity: int = 4) -> list[genext.KVCache]:
    # a small capacity on purpose: decoding must grow the caches
    n, hk, d = model.kv_cache_spec()
    return [genext.KVCache(batch, hk, d, capacity, dtype=dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_packed_equals_forward(dtype):
    ours, _ = _pair(VARIANT, dtype)
    lens = [5, 1, 13, 8]  # a sequence of one token
    seqs = [_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lens)]
    tokens, pos, cu = _packed(seqs)
    with torch.no_grad():
        packed = ours.forward_packed(tokens, pos, cu, max(lens))
        for i, s in enumerate(seqs):
            alone = ours(s[None]).logits[0]
            assert rel(packed[cu[i] : cu[i + 1]], alone) < TOL[dtype]
        emb = ours.transformer.wte(tokens)
        assert rel(ours.forward_packed(None, pos, cu, max(lens), inputs_embeds=emb), packed) == 0
        # last_only: each sequence's last token's logits, (B, vocab), as a prefill needs
        last = ours.forward_packed(tokens, pos, cu, max(lens), last_only=True)
    assert last.shape == (len(lens), packed.shape[-1])
    assert rel(last, packed[cu[1:].long() - 1]) < TOL[dtype]  # one GEMM of B rows, not T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_decode_equals_full_forward(dtype):
    """Prefill prompts of different lengths into the caches, then decode one token at a time
    (and once two at a time): every step's logits are the full forward's at that position."""
    ours, _ = _pair(VARIANT, dtype)
    prompt, extra = [3, 6, 1], 7
    full = [_ids(1, n + extra, seed=20 + i)[0] for i, n in enumerate(prompt)]
    caches = _caches(ours, len(full), dtype)
    tokens, pos, cu = _packed([s[:n] for s, n in zip(full, prompt)])
    with torch.no_grad():
        want = [ours(s[None]).logits[0] for s in full]
        got = ours.forward_packed(tokens, pos, cu, max(prompt), caches)
        for i, n in enumerate(prompt):
            assert rel(got[cu[i] : cu[i + 1]], want[i][:n]) < TOL[dtype]
            assert caches[-1].lengths[i] == n
        step = 0
        while step < extra:
            lq = 2 if step == 3 else 1
            ids = torch.stack([s[n + step : n + step + lq] for s, n in zip(full, prompt)])
            positions = torch.tensor(prompt).unsqueeze(1) + step + torch.arange(lq)
            logits = ours.forward_decode(ids, positions, caches)
            for i, n in enumerate(prompt):
                assert rel(logits[i], want[i][n + step : n + step + lq]) < TOL[dtype]
            step += lq
    assert caches[0].lengths == tuple(n + extra for n in prompt)


def test_greedy_loop_matches_transformers_generate():
    """Greedy decoding by a small loop over forward_packed / forward_decode equals transformers'
    generate(do_sample=False) on a left-padded batch. generate gives the prompt tokens the
    positions cumsum(attention_mask) - 1 (0, 1, ... from each row's first real token, checked
    below), which is what packing the real tokens from position 0 gives."""
    dtype, new = torch.float64, 10  # float64: no argmax decided by rounding
    ours, peer = _pair(TINY, dtype)
    ids, mask = _ids(seed=3), _mask("left")
    lens = mask.sum(1).tolist()

    # generate's prompt positions: the peer's logits at the last prompt token with positions
    # cumsum(mask) - 1 are the next-token logits of generate's first step
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        first = peer(ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        gen = peer.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=98,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    # generate returns its logits in float32: compare with the float64 logits so rounded
    assert rel(gen.logits[0], first.float()) < TOL[dtype]
    want = gen.sequences[:, L:]

    caches = _caches(ours, B, dtype)
    tokens, pos, cu = _packed([ids[b, L - n :] for b, n in enumerate(lens)])
    out = []
    with torch.no_grad():
        logits = ours.forward_packed(tokens, pos, cu, max(lens), caches)[cu[1:].long() - 1]
        assert rel(logits, first) < TOL[dtype]
        for step in range(new):
            nxt = logits.argmax(-1)
            out.append(nxt)
            if step + 1 < new:
                at = torch.tensor(lens).unsqueeze(1) + step
                logits = ours.forward_decode(nxt[:, None], at, caches)[:, -1]
    got = torch.stack(out, 1)
    assert torch.equal(got, want), (got, want)
    assert len(set(got.flatten().tolist())) > 3  # not one token repeated


def test_generate_matches_transformers():
    """genext's generate() (genext/models/_generation.py, driving the protocol) against
    transformers' on a left-padded batch, greedy; runs where GPT2LMHeadModel has it."""
    if not hasattr(GPT2LMHeadModel, "generate"):
        pytest.skip("GPT2LMHeadModel gets generate() from genext.models._generation's mixin")
    ours, peer = _pair(TINY, torch.float64)
    ids, mask = _ids(seed=3), _mask("left")
    with torch.no_grad():
        want = peer.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="n_positions"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=TINY["n_positions"])


# ---- construction and loading ------------------------------------------------------------------


def test_state_dict_and_config():
    ours, peer = _pair(TINY, torch.float32)
    assert list(ours.state_dict()) == list(peer.state_dict())
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in peer.named_parameters()]
    assert ours.kv_cache_spec() == (2, 4, 8)
    # a dict of the fields, with GPT2Config's other names, builds the same model, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fields = {k: v for k, v in TINY.items() if k not in ("n_embd", "n_layer")}
        fields |= {"hidden_size": 32, "num_hidden_layers": 2, "initializer_range": 0.5}
        alias = GPT2LMHeadModel.from_config(fields)
        GPT2LMHeadModel.from_config(peer.config)
    assert alias.config.n_embd == 32 and alias.config.n_layer == 2
    with pytest.warns(UserWarning, match="not_a_field"):
        GPT2LMHeadModel.from_config(dict(TINY, not_a_field=1))
    with pytest.raises(ValueError, match="activation_function"):
        GPT2LMHeadModel.from_config(TINY, activation_function="bogus")
    with pytest.raises(NotImplementedError, match="add_cross_attention"):
        GPT2LMHeadModel.from_config(TINY, add_cross_attention=True)
    untied = GPT2LMHeadModel.from_config(TINY, tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_from_pretrained_reads_transformers_save(tmp_path):
    """transformers' save_pretrained writes the tied weight once (no lm_head.weight); older
    checkpoints carry mask buffers and GPT2Model's keys: all load strictly."""
    ours, peer = _pair(TINY, torch.float32)
    peer.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    ours.save_pretrained(tmp_path / "ours")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "ours")
    assert again.lm_head.weight is again.transformer.wte.weight
    ids = _ids()
    with torch.no_grad():
        assert rel(loaded(ids).logits, ours(ids).logits) == 0
        assert rel(again(ids).logits, ours(ids).logits) == 0
    old = {k[len("transformer.") :]: v for k, v in peer.state_dict().items() if "lm_head" not in k}
    old |= {f"h.{i}.attn.bias": torch.ones(1, 1, 512, 512) for i in range(2)}
    old |= {f"h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(2)}
    fresh = GPT2LMHeadModel.from_config(TINY)
    fresh.load_state_dict(GPT2LMHeadModel._convert_legacy_state(old), strict=True)
    base = GPT2Model.from_config(TINY)
    base.load_state_dict(GPT2Model._convert_legacy_state(peer.state_dict()), strict=True)
    with torch.no_grad():
        assert rel(fresh.eval()(ids).logits, ours(ids).logits) == 0
        peer_base = peer.transformer(ids, attention_mask=_mask("right")).last_hidden_state
        h = base.eval()(ids, attention_mask=_mask("right")).last_hidden_state
    real = _mask("right").bool()
    assert rel(h[real], peer_base[real]) < 1e-5


def test_gradient_checkpointing_same_gradients():
    ours, _ = _pair(TINY, torch.float64)
    ids, mask = _ids(), _mask("right")

    def loss_fn(m):
        return m(ids, attention_mask=mask, labels=ids).loss

    plain = grads_after(ours, loss_fn)
    ours.train().enable_gradient_checkpointing()
    # dropout off: the two passes must be deterministic to compare
    ours.transformer.drop.p = 0.0
    for blk in ours.transformer.h:
        blk.attn.resid_dropout.p = blk.mlp.dropout.p = blk.attn.attn_dropout.p = 0.0
    assert_grads_match(grads_after(ours, loss_fn), plain, 1e-12)


# ---- construction from a config, packed sequences, dropout layout, positions, saving ----------


def test_constructs_from_a_config_as_transformers():
    """``GPT2LMHeadModel(config)`` / ``GPT2Model(config)`` with a GPT2Config or a dict of its
    fields (aliases included), keyword fields overriding, is ``from_config``; an int first is
    still vocab_size; anything else is a TypeError. (The override form comes first: without the
    config handling a dict lands in vocab_size beside the default 124M-parameter sizes.)"""
    config = transformers.GPT2Config(**TINY)
    one_layer = GPT2LMHeadModel(config.to_dict(), n_layer=1)
    assert len(one_layer.transformer.h) == 1 and one_layer.config.n_embd == 32
    for cls in (GPT2LMHeadModel, GPT2Model):
        want = cls.from_config(config).config
        assert cls(config).config == cls(TINY).config == cls(config=config).config == want
        assert cls(dict(TINY, n_embd=64)).config.n_embd == 64
        assert cls(TINY, num_hidden_layers=3).config.n_layer == 3  # GPT2Config's alias
    assert list(GPT2LMHeadModel(config).state_dict()) == list(
        transformers.GPT2LMHeadModel(config).state_dict()
    )
    assert GPT2Model(99, n_embd=32, n_layer=1, n_head=4).config.vocab_size == 99
    with pytest.raises(TypeError, match="first argument must be a config .* or vocab_size"):
        GPT2LMHeadModel([99, 32])
    with pytest.warns(UserWarning, match="not_a_field"):
        GPT2Model(TINY, not_a_field=1)


def _packed_rows():
    """Two rows of packed sequences (DataCollatorWithFlattening's layout): position ids that
    restart, a single-token sequence, a row that starts mid-sequence (one sequence), the first
    label of every sequence -100."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1], [3, 4, 5, 6, 0, 0, 1, 0, 1, 2]])
    ids = _ids(*pos.shape, seed=5)
    return ids, pos, ids.masked_fill(pos == 0, -100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_position_ids_match_transformers(dtype):
    """Without an attention_mask, position ids that restart separate sequences, as transformers'
    masks without a cache (find_packed_sequence_indices, use_cache=False): logits, loss and
    gradients; genext's kernel ran."""
    ours, peer = _pair(VARIANT if dtype == torch.float32 else TINY, dtype)
    ids, pos, labels = _packed_rows()
    tol = TOL[dtype]
    with torch.no_grad():
        out = ours(ids, position_ids=pos, labels=labels)
        ref = peer(ids, position_ids=pos, labels=labels, use_cache=False)
        assert rel(out.logits, ref.logits) < tol
        target = F.pad(labels, (0, 1), value=-100)[:, 1:]
        want = F.cross_entropy(ref.logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        assert rel(out.loss, ref.loss if dtype == torch.float32 else want) < tol
        # row 0's second sequence is that sequence alone
        assert rel(out.logits[:1, 3:8], ours(ids[:1, 3:8]).logits) < tol
        hidden = ours.transformer(ids, position_ids=pos).last_hidden_state
        peer_hidden = peer.transformer(ids, position_ids=pos, use_cache=False).last_hidden_state
        assert rel(hidden, peer_hidden) < tol
        # with a mask the positions are only positions, as in transformers
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["left", "holes", "packed"])
def test_dropout_with_padding_or_packing_matches_transformers_sdpa(layout, dtype, monkeypatch):
    """Attention dropout in training on a padded (or position-packed) batch runs PyTorch's SDPA
    per batch row, on (B, H, L, D) with a (B, 1, L, L) mask, the call transformers' sdpa
    attention makes: with one seed the dropout masks, hence the logits at the real tokens and
    the gradients, are transformers'. (resid_pdrop 0: genext draws the residual dropouts over
    the real tokens only.)"""
    cfg = dict(TINY, resid_pdrop=0.0, attn_pdrop=0.3)
    ours, peer = _pair(cfg, dtype, attn="sdpa")
    ours.train(), peer.train()
    if layout == "packed":
        ids, pos, _ = _packed_rows()
        kw, real = {"position_ids": pos}, torch.ones(ids.shape, dtype=torch.bool)
    else:
        ids, mask = _ids(), _mask(layout)
        kw, real = {"attention_mask": mask}, mask.bool()
    w = torch.randn(int(real.sum()), 99, dtype=dtype)

    def run(model):
        torch.manual_seed(11)
        extra = {} if model is ours else {"use_cache": False}
        return model(ids, **kw, **extra).logits[real]

    got, want = run(ours), run(peer)
    assert rel(got, want) < TOL[dtype]
    torch.manual_seed(12)
    assert rel(ours(ids, **kw).logits[real], got) > 1e-3  # dropout is on

    def loss_fn(model):
        return (run(model) * w).sum()

    assert_grads_match(grads_after(ours, loss_fn), grads_after(peer, loss_fn), TOL[dtype])
    shapes = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append((tuple(q.shape), tuple(attn_mask.shape)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ours(ids, **kw)
    b, n = ids.shape
    assert shapes == [((b, 4, n, 8), (b, 1, n, n))] * TINY["n_layer"]


def test_dropout_attention_memory_is_per_row():
    """The dropout fallback's mask and scores grow as B * L^2, not (B * L)^2: the largest
    allocation at B = 32 is about 8 times that at B = 4 (it was 64 times with a mask over the
    whole packed batch)."""
    ours = GPT2LMHeadModel.from_config(dict(TINY, n_positions=128, attn_pdrop=0.1)).train()

    def peak(batch: int) -> int:
        ids = _ids(batch, 96)
        mask = torch.ones_like(ids)
        mask[:, -1] = 0
        with torch.profiler.profile(profile_memory=True) as prof:
            with torch.no_grad():
                ours(ids, attention_mask=mask)
        return max(e.cpu_memory_usage for e in prof.key_averages() if "scaled_dot" in e.key)

    small, large = peak(4), peak(32)
    assert 4 * small < large < 16 * small


def test_positions_past_n_positions_raise_value_error():
    ours, _ = _pair(dict(TINY, n_positions=16), torch.float32)
    with torch.no_grad():
        with pytest.raises(ValueError, match="n_positions = 16"):
            ours(_ids(1, 17))
        with pytest.raises(ValueError, match="from 0 to 16"):
            ours(_ids(1, 3), position_ids=torch.tensor([[0, 1, 16]]))
        with pytest.raises(ValueError, match="from -1 to 1"):
            ours.transformer(_ids(1, 3), position_ids=torch.tensor([[-1, 0, 1]]))
        caches = _caches(ours, 1, torch.float32)
        with pytest.raises(ValueError, match="n_positions"):
            ours.forward_decode(_ids(1, 1), torch.tensor([[16]]), caches)
        with pytest.raises(ValueError, match="n_positions"):
            ours.forward_packed(_ids(1, 3)[0], torch.tensor([14, 15, 16]), torch.tensor([0, 3]), 3)
        ours(_ids(1, 16))  # the whole table is fine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_padding_batch(dtype):
    """A batch of padding only: zero logits and hidden states, and a NaN loss (no token counts,
    the mean over nothing), as documented; a row of padding only in a batch is zeros."""
    ours, _ = _pair(TINY, dtype)
    ids = _ids()
    with torch.no_grad():
        out = ours(ids, attention_mask=torch.zeros_like(ids), labels=ids)
        hidden = ours.transformer(ids, attention_mask=torch.zeros_like(ids)).last_hidden_state
        mask = torch.ones_like(ids)
        mask[1] = 0
        one_row = ours(ids, attention_mask=mask).logits
    assert out.logits.shape == (B, L, 99) and torch.count_nonzero(out.logits) == 0
    assert torch.count_nonzero(hidden) == 0 and torch.isnan(out.loss)
    assert torch.count_nonzero(one_row[1]) == 0
    assert rel(one_row[0], ours(ids[:1]).logits[0]) < TOL[dtype]


def test_save_pretrained_is_read_by_transformers(tmp_path):
    """genext's save_pretrained writes transformers' layout (model.safetensors, the tied weight
    once, a config.json with model_type and architectures): transformers' from_pretrained reads
    it with the same outputs; float64 round-trips exactly through both."""
    pytest.importorskip("safetensors")
    ours, _ = _pair(TINY, torch.float64)
    ids = _ids()
    for model, peer_cls in ((ours, transformers.GPT2LMHeadModel), (ours.transformer, None)):
        folder = tmp_path / type(model).__name__
        model.save_pretrained(folder)
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        peer = (peer_cls or transformers.AutoModel).from_pretrained(folder)
        again = type(model).from_pretrained(folder)
        assert type(peer).__name__ == type(model).__name__ and peer.dtype == torch.float64
        assert again.dtype == torch.float64 and again.config == model.config
        with torch.no_grad():
            a, b, c = (m(ids)[0] for m in (model, again, peer))
        assert torch.equal(a, b) and rel(a, c) < 1e-12
        for k, v in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], v) and torch.equal(peer.state_dict()[k], v)
    assert again.wte.weight.dtype == torch.float64
    head = GPT2LMHeadModel.from_pretrained(tmp_path / "GPT2LMHeadModel")
    assert head.lm_head.weight is head.transformer.wte.weight


def test_attention_dropout_in_forward_packed_keeps_sequences_apart():
    """forward_packed in training with attention dropout: SDPA on the sequences padded to the
    longest, (S, H, M, D) with an (S, 1, M, M) causal + length mask. At a dropout probability of
    1e-12 nothing is dropped, so the logits are the evaluation logits to about 1e-12."""
    cfg = dict(TINY, attn_pdrop=1e-12, resid_pdrop=0.0, embd_pdrop=0.0)
    ours, _ = _pair(cfg, torch.float64)
    lens = [5, 1, 13, 8]
    tokens, pos, cu = _packed([_ids(1, n, seed=30 + i)[0] for i, n in enumerate(lens)])
    with torch.no_grad():
        want = ours.forward_packed(tokens, pos, cu, max(lens))
        ours.train()
        names = op_names(lambda: ours.forward_packed(tokens, pos, cu, max(lens)))
        got = ours.forward_packed(tokens, pos, cu, max(lens))
    assert "aten::scaled_dot_product_attention" in names
    assert "genext::flash_attention_forward" not in names
    assert rel(got, want) < 1e-10
