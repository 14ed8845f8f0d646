"""genext's ``generate`` (genext/models/_generation.py) against transformers' ``generate`` with the
same weights: greedy and seeded sampling token for token on a left-padded batch, EOS per
sequence, paged and contiguous caches, streaming, stop strings, and the CUDA-graph decode step.

Every model that implements the causal-LM protocol is checked by the same tests: add a line to
CASES (genext class, transformers class, config factory)."""

from __future__ import annotations

import pytest
import torch

from genext.models import GPT2LMHeadModel, LlamaForCausalLM, TextStreamer

from peer_parity import perturb_

transformers = pytest.importorskip("transformers")

VOCAB = 99


# transformers' LlamaModelTester sizes, grouped-query attention (4 query / 2 kv heads); no EOS
# unless a test sets one
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    eos_token_id=None,
)


def _llama_config(**kw):
    return transformers.LlamaConfig(**{**TINY, **kw})


def _qwen2_config(**kw):
    return transformers.Qwen2Config(**{**TINY, **kw})


def _gpt2_config(**kw):
    # transformers' GPT2ModelTester sizes (vocab 99, width 32, 2 layers, 4 heads), dropout off
    # (generation runs in eval mode either way); max_position_embeddings -> n_positions
    kw = {**TINY, **kw}
    return transformers.GPT2Config(
        vocab_size=kw["vocab_size"],
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=kw["max_position_embeddings"],
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=kw["pad_token_id"],
        eos_token_id=kw["eos_token_id"],
        bos_token_id=None,
    )


# (genext class, transformers class, config factory): the factory takes config overrides
# (eos_token_id=..., max_position_embeddings=...) and builds a tiny config with vocab_size 99,
# pad_token_id 0 and no EOS token
CASES = {
    "llama": (LlamaForCausalLM, transformers.LlamaForCausalLM, _llama_config),
    "qwen2": (LlamaForCausalLM, transformers.Qwen2ForCausalLM, _qwen2_config),
    "gpt2": (GPT2LMHeadModel, transformers.GPT2LMHeadModel, _gpt2_config),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny matrices, and two threads synchronising per GEMM on a busy
    machine cost a thousand times the product itself."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(case: str, dtype=torch.float32, **config_kw):
    ours_cls, peer_cls, factory = CASES[case]
    config = factory(**config_kw)
    torch.manual_seed(0)
    peer = peer_cls(config)
    # parameters only: rotary inv_freq buffers are constants of the config, not weights.
    # A large perturbation makes the logits spread, so greedy choices are far from ties.
    buffers = {k: b.clone() for k, b in peer.named_buffers()}
    perturb_(peer, scale=0.5)
    with torch.no_grad():
        for k, b in peer.named_buffers():
            b.copy_(buffers[k])
    peer = peer.to(dtype).eval()
    ours = ours_cls.from_config(config).to(dtype).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


def _prompts(lengths=(6, 3, 1, 5), seed=1):
    """A left-padded batch of prompts of different lengths (one of a single token)."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, n - length :] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _right_padded(ids, mask):
    """The same prompts padded on the right."""
    out_ids, out_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for b in range(ids.shape[0]):
        real = ids[b][mask[b].bool()]
        out_ids[b, : len(real)] = real
        out_mask[b, : len(real)] = 1
    return out_ids, out_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers(case, dtype):
    ours, peer = _pair(case, dtype)
    ids, mask = _prompts()
    want = peer.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert got.shape == want.shape == (4, 6 + 12)
    assert torch.equal(got, want)
    # the prompt side does not matter to genext: right padding, same new tokens
    r_ids, r_mask = _right_padded(ids, mask)
    assert torch.equal(
        ours.generate(r_ids, attention_mask=r_mask, max_new_tokens=12)[:, 6:], got[:, 6:]
    )


SAMPLING = dict(
    do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3
)


@pytest.mark.parametrize("case", list(CASES))
def test_seeded_sampling_equals_transformers(case):
    ours, peer = _pair(case)
    ids, mask = _prompts()
    torch.manual_seed(123)
    want = peer.generate(ids, attention_mask=mask, max_new_tokens=12, **SAMPLING)
    torch.manual_seed(123)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, **SAMPLING)
    assert torch.equal(got, want)
    # a generator seeded the same way draws the same tokens as the seeded global RNG
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(7)
    assert torch.equal(
        ours.generate(ids, attention_mask=mask, max_new_tokens=12, generator=gen, **SAMPLING), want
    )


@pytest.mark.parametrize(
    "settings",
    [
        dict(do_sample=True),
        dict(do_sample=True, temperature=1.6),
        dict(do_sample=True, top_k=3),
        dict(do_sample=True, top_p=0.5),
        dict(do_sample=True, min_p=0.3),
        dict(do_sample=False, repetition_penalty=1.8),  # the penalty applies to greedy too
        dict(do_sample=True, repetition_penalty=0.6),  # < 1 rewards repetition
    ],
    ids=["plain", "temperature", "top_k", "top_p", "min_p", "greedy_penalty", "reward"],
)
def test_each_logits_setting_equals_transformers(settings):
    ours, peer = _pair("llama")
    ids, mask = _prompts()
    torch.manual_seed(5)
    want = peer.generate(ids, attention_mask=mask, max_new_tokens=8, **settings)
    torch.manual_seed(5)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=8, **settings), want)


@pytest.mark.parametrize("case", list(CASES))
def test_eos_per_sequence_equals_transformers(case):
    """Two EOS ids that the sequences produce at different steps: each sequence is padded with
    pad_token_id after its EOS, and generation stops once all are finished."""
    ours, peer = _pair(case)
    ids, mask = _prompts()
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=16)[:, 6:]
    # the first token of sequence 0 at step 2 and of sequence 1 at step 5 become EOS ids;
    # the other sequences finish by them or by max_new_tokens
    eos = [int(free[0, 2]), int(free[1, 5])]
    want = peer.generate(
        ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0
    )
    got = ours.generate(
        ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0
    )
    assert torch.equal(got, want)
    new = got[:, 6:]
    for b in range(new.shape[0]):
        hits = [i for i, t in enumerate(new[b].tolist()) if t in eos]
        if hits:  # everything after the first EOS is padding
            assert (new[b, hits[0] + 1 :] == 0).all()
    # stopped early exactly when every sequence had finished (or ran to the end)
    last_needed = max(
        min([i for i, t in enumerate(free[b].tolist()) if t in eos] or [15]) for b in range(4)
    )
    assert new.shape[1] == last_needed + 1
    # the config's eos_token_id is the default, as in transformers
    ours_cfg, _ = _pair(case, eos_token_id=eos)
    assert torch.equal(ours_cfg.generate(ids, attention_mask=mask, max_new_tokens=16), want)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0},
        {
            "rope_type": "longrope",
            "short_factor": [1.0, 1.1, 1.3, 1.7],
            "long_factor": [1.5, 2.5, 4.0, 7.0],
            "original_max_position_embeddings": 8,
        },
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 6},
    ],
    ids=["dynamic", "longrope", "yarn"],
)
def test_rope_schedules_generate_like_transformers(rope):
    """Generation across the lengths where the schedules switch (max_position_embeddings 12,
    longrope's original 8): dynamic and longrope recompute the frequencies at every step from
    the longest position, as transformers' decode steps do, while the cache keeps the keys
    rotated as they were."""
    ours, peer = _pair("llama", max_position_embeddings=12, rope_parameters=rope)
    ids, mask = _prompts()
    want = peer.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=14), want)


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_paged_cache_equals_contiguous(case, block_size):
    ours, _ = _pair(case)
    ids, mask = _prompts()
    torch.manual_seed(9)
    want = ours.generate(ids, attention_mask=mask, max_new_tokens=10, **SAMPLING)
    torch.manual_seed(9)
    got = ours.generate(
        ids, attention_mask=mask, max_new_tokens=10, cache_block_size=block_size, **SAMPLING
    )
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", list(CASES))
def test_inputs_embeds_prefill(case):
    """A prefill from embeddings (as a VLM gives them) continues as from the ids; without ids
    only the new tokens come back, as in transformers."""
    ours, peer = _pair(case)
    ids, mask = _prompts()
    emb = ours.get_input_embeddings()(ids)
    want = ours.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(
        ours.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=6), want[:, 6:]
    )
    both = ours.generate(ids, attention_mask=mask, inputs_embeds=emb, max_new_tokens=6)
    assert torch.equal(both, want)
    assert torch.equal(
        peer.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=6), want[:, 6:]
    )


class _Recorder:
    def __init__(self):
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("case", list(CASES))
def test_streamer_receives_exactly_the_tokens(case):
    ours, peer = _pair(case)
    ids, mask = _prompts()
    eos = [5, 17, 33]
    ours_rec, peer_rec = _Recorder(), _Recorder()
    got = ours.generate(
        ids, attention_mask=mask, max_new_tokens=9, eos_token_id=eos, streamer=ours_rec
    )
    peer.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=eos, streamer=peer_rec)
    assert ours_rec.ended == 1
    assert torch.equal(ours_rec.puts[0], ids) and ours_rec.puts[0].device.type == "cpu"
    assert torch.equal(torch.stack(ours_rec.puts[1:], 1), got[:, ids.shape[1] :])
    assert len(ours_rec.puts) == len(peer_rec.puts)
    for a, b in zip(ours_rec.puts, peer_rec.puts):
        assert torch.equal(a, b)


class CharTokenizer:
    """One character per token: id i is chr(ord('!') + i) (a printable ASCII range for 0..93,
    then Latin-1 letters)."""

    def decode(self, ids, **kwargs) -> str:
        if isinstance(ids, int):
            ids = [ids]
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(chr(ord("!") + i) if i < 94 else chr(0xC0 + i - 94) for i in ids)


def test_text_streamers_print_the_text(capsys):
    """transformers' TextStreamer and genext's print the same text: the prompt and the new
    tokens of a batch of one, decoded."""
    ours, _ = _pair("llama")
    tok = CharTokenizer()
    ids, mask = _prompts(lengths=(5,))
    out = ours.generate(ids, max_new_tokens=7, streamer=transformers.TextStreamer(tok))
    printed = capsys.readouterr().out
    assert printed == tok.decode(out[0]) + "\n"
    streamer = TextStreamer(tok)
    ours.generate(ids, max_new_tokens=7, streamer=streamer)
    assert capsys.readouterr().out == printed and streamer.text == tok.decode(out[0])
    skip = TextStreamer(tok, skip_prompt=True)
    skip.on_text = lambda text, stream_end=False: None  # keep quiet: only .text is checked
    ours.generate(ids, max_new_tokens=7, streamer=skip)
    assert skip.text == tok.decode(out[0, 5:])


@pytest.mark.parametrize("case", list(CASES))
def test_stop_strings(case):
    """A sequence stops once a stop string ends in its last token; with no EOS id (this config
    has none) the others go on and a stopped sequence keeps its tokens, as in transformers, so
    the output is the free generation cut where the last sequence stopped."""
    ours, _ = _pair(case)
    tok = CharTokenizer()
    ids, mask = _prompts()
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    new = free[:, 6:]
    stop = tok.decode(new[0, 3:5])  # two characters sequence 0 produces at steps 3 and 4
    got = ours.generate(
        ids, attention_mask=mask, max_new_tokens=12, stop_strings=[stop, "never"], tokenizer=tok
    )
    ends = []
    for b in range(4):
        text = tok.decode(ids[b][mask[b].bool()])
        end = 12
        for i, t in enumerate(new[b].tolist()):
            text += tok.decode([t])
            if text.endswith(stop):
                end = i + 1
                break
        ends.append(end)
    assert ends[0] == 5
    assert got.shape[1] == 6 + max(ends)
    assert torch.equal(got, free[:, : got.shape[1]])
    with pytest.raises(ValueError, match="tokenizer"):
        ours.generate(ids, max_new_tokens=2, stop_strings="x")


class PairTokenizer:
    """Two characters per token: id i decodes to the i-th pair of 'abcdefghij'."""

    LETTERS = "abcdefghij"

    def decode(self, ids, **kwargs) -> str:
        return "".join(self.LETTERS[i // 10] + self.LETTERS[i % 10] for i in ids)


class ByteTokenizer:
    """One UTF-8 byte per token (a byte-fallback tokenizer's worst case)."""

    def decode(self, ids, **kwargs) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_stop_string_ending_inside_a_token():
    """transformers' rule: the string may end inside the last token ("qs", "to" stops at
    "st"), and a string of many byte tokens (three 3-byte characters) is still seen."""
    from genext.models._generation import _StopStrings

    stops = _StopStrings(["ce"], PairTokenizer(), [[1]])  # "ab"
    assert [stops(0, t) for t in (23, 45, 67)] == [False, False, False]  # "cd" "ef" "gh"
    stops = _StopStrings(["ce"], PairTokenizer(), [[1]])
    assert [stops(0, t) for t in (32, 45)] == [False, True]  # "dc" "ef": "...dcef" ends in "ef"
    stops = _StopStrings(["ce"], PairTokenizer(), [[24]])  # "ce" in the prompt alone: no stop
    assert stops(0, 11) is False
    text = "abc 你好吗"
    data = list(text.encode())
    stops = _StopStrings(["你好吗"], ByteTokenizer(), [data[:4]])
    hits = [stops(0, t) for t in data[4:]]
    assert hits == [False] * 8 + [True]


def test_default_top_k_is_transformers():
    """Sampling with no top_k truncates to transformers' default 50 tokens, as its generate
    does: with flat logits (a scaled-down head) over 99 tokens, the seeded draws are equal only
    if both sides keep the same 50."""
    ours, peer = _pair("llama")
    with torch.no_grad():
        for model in (ours, peer):
            model.lm_head.weight.mul_(0.02)
    ids, mask = _prompts()
    torch.manual_seed(5)
    want = peer.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True)
    torch.manual_seed(5)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True)
    assert torch.equal(got, want)
    torch.manual_seed(5)
    off = ours.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=0)
    assert not torch.equal(off, want)  # the setting matters here


def test_streamer_gets_an_empty_prompt_with_inputs_embeds_only():
    """As transformers: the first put is the prompt, (B, 0) when there are no input_ids, so a
    skip_prompt streamer does not swallow the first new token."""
    ours, _ = _pair("llama")
    ids, _ = _prompts(lengths=(5,))
    calls = []

    class Recorder:
        def put(self, value):
            calls.append(value.clone())

        def end(self):
            calls.append(None)

    embeds = ours.get_input_embeddings()(ids)
    out = ours.generate(inputs_embeds=embeds, max_new_tokens=4, streamer=Recorder())
    assert calls[0].shape == (1, 0)
    assert [int(c) for c in calls[1:-1]] == out[0].tolist()
    assert calls[-1] is None


def test_argument_errors():
    ours, _ = _pair("llama")
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(ids, do_sample=True, temperature=0.0)
    # the warpers are checked only when sampling (transformers only warns about them)
    ours.generate(ids, attention_mask=mask, max_new_tokens=1, temperature=0.0, top_p=1.5)
    eos = ours.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=torch.tensor(3))
    assert eos.shape[0] == 4
    with pytest.raises(ValueError, match="at least one real token"):
        ours.generate(ids, attention_mask=torch.zeros_like(mask))
    with pytest.raises(ValueError, match="cuda_graph"):
        ours.generate(ids, cuda_graph=True)
    assert ours.generate(ids, attention_mask=mask, max_new_tokens=0).shape == ids.shape
    assert ours.generate(ids, attention_mask=mask, max_length=9).shape == (4, 9)


@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_graph_decode_equals_eager(case, dtype, block_size):
    """The decode step captured once in a CUDA graph and replayed gives the eager loop's
    tokens exactly (same kernels, same inputs); float32 also equals transformers on the CPU."""
    ours, peer = _pair(case)
    ours = ours.to("cuda", dtype)
    ids, mask = _prompts()
    kw = dict(attention_mask=mask.cuda(), max_new_tokens=12, cache_block_size=block_size)
    eager = ours.generate(ids.cuda(), **kw)
    graph = ours.generate(ids.cuda(), cuda_graph=True, **kw)
    assert torch.equal(graph, eager)
    torch.manual_seed(3)
    eager = ours.generate(ids.cuda(), **kw, **SAMPLING)
    torch.manual_seed(3)
    assert torch.equal(ours.generate(ids.cuda(), cuda_graph=True, **kw, **SAMPLING), eager)
    if dtype == torch.float32:
        want = peer.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        assert torch.equal(ours.generate(ids.cuda(), cuda_graph=True, **kw).cpu(), want)
