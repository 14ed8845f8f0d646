"""Greedy generation with a Llama: genext.models.LlamaForCausalLM.generate against transformers'
LlamaForCausalLM.generate with the same weights (transformers' random weights, perturbed, loaded
into genext's model), a fixed number of new tokens (no EOS token), the prompt unpadded.

Rows (implementations): genext with contiguous KV caches, genext with paged caches
(``cache_block_size``), genext with the decode step in a CUDA graph (CUDA, small batches);
transformers with PyTorch's SDPA and its dynamic cache, with its static cache
(``cache_implementation="static"``, not compiled), with the static cache compiled (transformers'
own auto-compile of the decode step; CUDA), and with ``attn_implementation="genext"``
(genext.integrations.transformers). A row that cannot run here (a compiler failure, out of
memory) is a row saying so, not the end of the bench.

Figures per row: the prefill time (``generate`` with one new token: the prompt's forward and the
first token) and its prompt tokens/s; decode tokens/s, the batch's new tokens after the first
over the rest of the time of ``generate`` with all the new tokens (the two medians' difference);
the whole ``generate``'s time, and its peak memory on CUDA.

The check runs every implementation once: in float32 its tokens must equal transformers' (SDPA,
dynamic cache) token for token; in 16 bits exact equality is not a fair demand of two sets of
kernels (a near tie flips a token, and the sequences part), so each new token must instead be
greedy under transformers' model run in float32 over the same sequence, up to twice the error of
transformers' own 16-bit logits there.

CPU: the character-level demo LM's shape (genext train lm) at batch 1 and 8, and a Llama of about
38M parameters (SmolLM-135M's layout, narrower and shallower) at batch 1; prompt 128, 128 new
tokens; one thread (see CPU_CASES). CUDA: a Llama of about 1.1B parameters (hidden 2048, 16
layers, 32 heads, 8 KV heads), bfloat16, prompt 2048, 128 new tokens, batch 1, 8 and 64.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..integrations.transformers import register
from ..models import LlamaForCausalLM
from .harness import host_time_fn
from .registry import DTYPE, IMPL, PEAK_MIB, Bench, Case, Column, Config, Row, Timing, device_cases

# the character-level demo LM (genext.train.tasks.lm's model_config): Shakespeare's 85 characters
DEMO_LM = dict(
    vocab_size=85,
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
# SmolLM-135M's layout (49152-token vocabulary, tied embeddings, 3:1 grouped queries of dim 64)
# at 384 wide and 12 layers deep: about 38M parameters
SMALL_LLAMA = dict(
    vocab_size=49152,
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=12,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
# a Llama of about 1.1B parameters (TinyLlama-1.1B's widths at 16 layers)
LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# no EOS (every sequence gets all its new tokens), pad 0, no BOS
TOKENS = dict(pad_token_id=0, eos_token_id=None, bos_token_id=None)


@dataclass(frozen=True)
class LMCase:
    label: str
    config: dict = field(hash=False)
    batch: int
    prompt: int  # prompt tokens per sequence
    new: int  # new tokens per sequence
    block_size: int = 16  # tokens per block of the paged caches
    graph: bool = False  # also genext's CUDA-graph decode (CUDA)
    threads: int | None = None  # CPU intra-op threads for this case (None: the run's)

    @property
    def name(self) -> str:
        name = f"{self.label} b{self.batch} p{self.prompt} n{self.new}"
        return name if self.threads is None else f"{name} {self.threads}thr"

    def cpu_threads(self, device: str) -> AbstractContextManager:
        """The case's thread count, held while it is built, checked and timed (CPU)."""
        return cpu_threads(self.threads, device)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_threads(threads: int | None, device: str) -> AbstractContextManager:
    """A context holding `threads` intra-op threads on the CPU (nothing when None or on
    another device)."""
    return _threads(threads) if device == "cpu" and threads else nullcontext()


# one thread: the demo LM's matrices are tiny, and on the project's 2-core machine shared with
# other processes a second thread made every row slower (the demo LM's prefill 30x, the 38M
# model's decode 2-3x), measuring the threads' waits instead of the model
CPU_CASES = [
    LMCase("demo-lm", DEMO_LM, 1, 128, 128, threads=1),
    LMCase("demo-lm", DEMO_LM, 8, 128, 128, threads=1),
    LMCase("llama-38m", SMALL_LLAMA, 1, 128, 128, threads=1),
]
CUDA_CASES = [
    LMCase("llama-1.1b", LLAMA_1B, 1, 2048, 128, block_size=64, graph=True),
    LMCase("llama-1.1b", LLAMA_1B, 8, 2048, 128, block_size=64, graph=True),
    LMCase("llama-1.1b", LLAMA_1B, 64, 2048, 128, block_size=64),
]

# Figures of a row besides its time, by (case name, dtype, implementation): the prefill seconds
# its setup measured and the check's verdict on its tokens. The runner's Row carries the timed
# call's figures only, so the columns read these here (a --json file has the generate time and
# peak memory, not these).
_FIGURES: dict[tuple[str, str, str], dict[str, Any]] = {}


def _key(case_name: str, dtype: torch.dtype | str, impl: str) -> tuple[str, str, str]:
    return case_name, str(dtype).removeprefix("torch."), impl


def _perturbed_(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Seeded noise on every parameter, drawn on the parameters' device (a 1B model's noise
    drawn on the host would take longer than its generation). Buffers (rotary frequencies) are
    constants of the config and stay. A large scale spreads the logits, so that greedy choices
    are far from ties."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for p in model.parameters():
            g = gens.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
            p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * scale)
    return model


def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def lm_inputs(case: LMCase, dtype: torch.dtype, device: str) -> dict:
    """transformers' model (SDPA) with perturbed random weights, genext's with the same weights, a
    copy of transformers' running genext's attention, and the prompts ``(B, P)`` (random ids,
    none of them padding). Without transformers only genext's model (with its own random
    weights) is built."""
    torch.manual_seed(0)
    inputs: dict = {"peer": None, "peer_genext": None}
    config = {**case.config, **TOKENS}
    tf = _transformers()
    if tf is not None:
        hf_config = tf.LlamaConfig(**config)
        hf_config._attn_implementation = "sdpa"
        with torch.device(device):
            peer = tf.LlamaForCausalLM(hf_config)
        peer = _perturbed_(peer).to(dtype).eval()
        with torch.device(device):  # a 1B model's initialisation on the host takes a while
            ours = LlamaForCausalLM.from_config(hf_config)
        ours = ours.to(dtype).eval()
        ours.load_state_dict(peer.state_dict(), strict=True)
        register()
        with_genext = copy.deepcopy(peer)
        with_genext.set_attn_implementation("genext")
        inputs.update(peer=peer, peer_genext=with_genext)
    else:
        with torch.device(device):
            ours = LlamaForCausalLM(**config)
        ours = _perturbed_(ours).to(dtype).eval()
    inputs["genext"] = ours
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, case.config["vocab_size"], (case.batch, case.prompt), generator=g)
    inputs["ids"] = ids.to(device)
    inputs["mask"] = torch.ones_like(inputs["ids"])
    return inputs


def _generate(impl: str, inputs: dict, new: int, case: LMCase) -> torch.Tensor:
    """``generate`` of one implementation: the prompts followed by `new` greedy tokens."""
    ids, mask = inputs["ids"], inputs["mask"]
    if impl.startswith("genext"):
        kw: dict[str, Any] = {}
        if impl == "genext paged":
            kw["cache_block_size"] = case.block_size
        elif impl == "genext graph":
            kw["cuda_graph"] = True
        return inputs["genext"].generate(ids, attention_mask=mask, max_new_tokens=new, **kw)
    model = inputs["peer_genext" if impl == "transformers+genext-attn" else "peer"]
    kw = dict(attention_mask=mask, max_new_tokens=new, do_sample=False)
    if impl.startswith("transformers static"):
        kw["cache_implementation"] = "static"
        # transformers compiles the decode step of a static cache on CUDA by itself
        kw["disable_compile"] = impl != "transformers static+compile"
    with torch.no_grad():
        return model.generate(ids, **kw)


def _available(impl: str, inputs: dict) -> bool:
    return inputs["genext" if impl.startswith("genext") else "peer"] is not None


def impls(case: LMCase, config: Config) -> list[str]:
    """The rows of a case: genext's first (its first row carries the check), then transformers'
    (its SDPA + dynamic cache row is the reference the others are checked against)."""
    cuda = config.device == "cuda"
    rows = ["genext", "genext paged"]
    if cuda and case.graph:
        rows.append("genext graph")
    rows += ["transformers", "transformers static"]
    if cuda and config.compile:
        rows.append("transformers static+compile")
    rows.append("transformers+genext-attn")
    return rows


# rows allowed to fail (the compiler, memory): their failure is a row, not the end of the bench
OPTIONAL = ("transformers static", "transformers static+compile", "genext graph")


def _near_greedy(
    peer: torch.nn.Module, ref_model: torch.nn.Module, seqs: torch.Tensor, prompt: int, rows: int
) -> tuple[bool, str]:
    """Whether each new token of ``seqs`` (the first `rows` sequences) is greedy under
    transformers' model in float32 (``ref_model``) over that sequence (teacher forcing), within
    twice the largest error of transformers' own logits (``peer``, in the run's dtype) at that
    step. Also how many steps had a near tie that wide."""
    seqs = seqs[:rows]
    new = seqs.shape[1] - prompt
    with torch.no_grad():
        low = peer(seqs[:, :-1], logits_to_keep=new).logits.float()
        ref = ref_model(seqs[:, :-1], logits_to_keep=new).logits.float()
    chosen = seqs[:, prompt:]
    err = (low - ref).abs().amax(-1)
    gap = ref.amax(-1) - ref.gather(-1, chosen[..., None]).squeeze(-1)
    ok = bool((gap <= 2 * err).all())
    top2 = ref.topk(2, -1).values
    ties = int((top2[..., 0] - top2[..., 1] <= 2 * err).sum())
    worst = (gap - 2 * err).max().item()
    return ok, f"greedy within 2x peer err ({ties} near ties; worst excess {worst:.1e})"


def float_reference(peer: torch.nn.Module) -> torch.nn.Module:
    """transformers' model in float32 with the weights the run holds (their 16-bit values) and
    its rotary frequencies computed again in float32. Casting the model to 16 bits rounds those
    buffers too (``inv_freq`` to 8 bits of mantissa, so the angles drift by up to 2^-8 of
    position x frequency), and a float32 copy would keep them rounded: a reference carrying an
    error of the peer's own, which held genext (whose frequencies stay float32) to it."""
    ref = copy.deepcopy(peer).float()
    for name, mod in list(ref.named_modules()):
        if isinstance(getattr(mod, "inv_freq", None), torch.Tensor) and hasattr(mod, "config"):
            with torch.device(mod.inv_freq.device):
                fresh = type(mod)(mod.config)
            parent, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, attr, fresh)
    return ref


def lm_check(case: LMCase, config: Config, dtype: torch.dtype, inputs: dict):
    """Runs every implementation once (its warm-up, a compile included) and checks its tokens
    against transformers' (SDPA, dynamic cache): equal in float32, greedy under the float32
    model within twice transformers' own 16-bit error otherwise. Each row's verdict goes to its
    "tokens" column; the case is ok when every row that ran passed."""
    if inputs["peer"] is None:
        return None, "transformers not available"
    try:
        want = _generate("transformers", inputs, case.new, case)
    except torch.OutOfMemoryError:
        return None, "transformers' generate ran out of memory: nothing compared"
    expected = (case.batch, case.prompt + case.new)
    all_ok, notes = True, []
    # 16-bit: teacher-forced checks on at most 8 sequences, by a float32 copy of the model
    rows = min(case.batch, 8)
    exact = dtype in (torch.float32, torch.float64)
    ref_model = None if exact else float_reference(inputs["peer"])
    for impl in impls(case, config):
        key = _key(case.name, dtype, impl)
        try:
            got = _generate(impl, inputs, case.new, case)
        except Exception as e:
            # out of memory at a batch, or an optional row's compiler or option failing: the
            # row says so; anything else in genext's or transformers' own rows is a bug
            if impl not in OPTIONAL and not isinstance(e, torch.OutOfMemoryError):
                raise
            first = (str(e).splitlines() or [type(e).__name__])[0]
            _FIGURES[key] = {"tokens": f"not run: {first[:50]}"}
            continue
        if tuple(got.shape) != expected or not torch.equal(got[:, : case.prompt], inputs["ids"]):
            ok, verdict = False, f"shape {tuple(got.shape)}, expected {expected} with the prompt"
        elif exact:
            same = got == want
            ok = bool(same.all())
            first_diff = int((~same).any(0).nonzero()[0]) - case.prompt if not ok else -1
            verdict = "equal" if ok else f"differ from new token {first_diff}"
        else:
            ok, detail = _near_greedy(inputs["peer"], ref_model, got, case.prompt, rows)
            n_equal = int((got[:, case.prompt :] == want[:, case.prompt :]).sum())
            verdict = f"{'ok' if ok else f'FAIL {detail}'}; {n_equal}/{case.batch * case.new} equal"
        _FIGURES[key] = {"tokens": verdict}
        all_ok &= ok
        if not ok:
            notes.append(f"{impl}: {verdict}")
    if exact:
        note = "tokens equal to transformers'" if all_ok else "; ".join(notes)
    else:
        _, note = _near_greedy(inputs["peer"], ref_model, want, case.prompt, rows)
        note = "each row's tokens greedy in fp32 within 2x transformers' error; theirs: " + note
        if not all_ok:
            note = "; ".join(notes)
    return all_ok, note


def _setup(impl: str, case: LMCase, warmup: int, reps: int, dtype: torch.dtype, device: str):
    """The timed call: ``generate`` with every new token. Before it, the prefill (``generate``
    with one new token) is timed the same way and kept for the row's columns."""

    def setup(inputs: dict):
        if not _available(impl, inputs):
            return None
        seen = _FIGURES.get(_key(case.name, dtype, impl), {}).get("tokens", "")
        if seen.startswith("not run"):  # it failed in the check: the same reason, not again
            raise RuntimeError(seen)
        if device == "cuda":
            torch.cuda.empty_cache()
        try:
            prefill = host_time_fn(lambda i: _generate(impl, inputs, 1, case), device, warmup, reps)
        except ValueError as e:  # transformers refusing an option: a row saying so
            raise RuntimeError(str(e)) from e
        _FIGURES.setdefault(_key(case.name, dtype, impl), {})["prefill_s"] = prefill
        return lambda i: _generate(impl, inputs, case.new, case)

    return setup


def make_case(case: LMCase, config: Config) -> Case:
    cuda = config.device == "cuda"
    dtype = config.dtype_or(torch.bfloat16 if cuda else torch.float32)
    # the check has run each implementation once already (the CPU's warm-up); on CUDA one more
    # run lets a compiled decode step record its CUDA graphs
    warmup, reps = (1, 3) if cuda else (0, 5)  # 5: the CPU machine is shared (noisy medians)
    if config.quick:
        warmup, reps = 0, 1
    timings = tuple(
        Timing(
            impl,
            "generate",
            _setup(impl, case, warmup, reps, dtype, config.device),
            warmup,
            reps,
            clock="host",  # a loop with host work between steps (transformers' stopping checks)
            peak_memory=cuda,
            shows_check=k == 0,
            on_error="failed" if impl in OPTIONAL or cuda else None,
            context=lambda: case.cpu_threads(config.device),
        )
        for k, impl in enumerate(impls(case, config))
    )

    def check(inputs: dict):
        with case.cpu_threads(config.device):
            return lm_check(case, config, dtype, inputs)

    def build() -> dict:
        with case.cpu_threads(config.device):
            return lm_inputs(case, dtype, config.device)

    return Case(case.name, dtype, timings, check, inputs=build)


def cases(config: Config) -> list[Case]:
    # a quick run: the first case with 32 new tokens
    chosen = device_cases(config, CUDA_CASES, CPU_CASES, quick=lambda c: [replace(c[0], new=32)])
    return [make_case(c, config) for c in chosen]


def _shape(row: Row) -> tuple[int, int, int]:
    """(batch, prompt, new) from a row's case name ("label bB pP nN ...")."""
    found = re.search(r" b(\d+) p(\d+) n(\d+)", row.case)
    if found is None:
        raise ValueError(f"lm bench: no batch, prompt and new tokens in case name {row.case!r}")
    b, p, n = map(int, found.groups())
    return b, p, n


def _figure(row: Row, name: str) -> Any:
    return _FIGURES.get(_key(row.case, row.dtype, row.impl), {}).get(name)


def prefill_ms(row: Row) -> float:
    s = _figure(row, "prefill_s")
    return float("nan") if s is None else s * 1e3


def prefill_tokens_per_s(row: Row) -> float:
    """Prompt tokens of the batch over the prefill time."""
    b, p, _ = _shape(row)
    return b * p / (prefill_ms(row) / 1e3)


def decode_tokens_per_s(row: Row) -> float:
    """New tokens after the first (each one decode step) over generate's time beyond the
    prefill."""
    b, _, n = _shape(row)
    return b * (n - 1) / ((row.ms - prefill_ms(row)) / 1e3)


def tokens_verdict(row: Row) -> str:
    return _figure(row, "tokens") or ""


BENCH = Bench(
    "lm",
    "Llama greedy generate: genext (contiguous, paged, CUDA graph) vs transformers (SDPA dynamic, "
    "static, static+compile, genext attention), same weights: prefill and decode tokens/s",
    cases,
    (
        Column("lm case", "case"),
        DTYPE,
        IMPL,
        Column("prefill ms", prefill_ms, ".1f"),
        Column("prefill tok/s", prefill_tokens_per_s, ".0f"),
        Column("decode tok/s", decode_tokens_per_s, ".1f"),
        Column("generate ms", "ms", ".1f"),
        PEAK_MIB,
        Column("tokens", tokens_verdict),
    ),
)
