"""``generate`` for genext's causal LMs (Llama, GPT-2, LLaVA's language model), on genext's
attention kernels and :class:`genext.KVCache`.

A model gets ``generate`` by inheriting :class:`GenerationMixin` and implementing the causal-LM
protocol: ``kv_cache_spec() -> (num_layers, num_kv_heads, head_dim)``, ``forward_packed(input_ids,
position_ids, cu_seqlens, max_seqlen, caches=None, inputs_embeds=None, last_only=False) -> (T,
vocab)`` (``(B, vocab)``, each sequence's last token, with ``last_only``: the prefill asks for
that) and
``forward_decode(input_ids, position_ids, caches, inputs_embeds=None) -> (B, Lq, vocab)``, plus
``dtype``/``device`` properties and ``config.eos_token_id``/``config.pad_token_id`` (may be
None). Optionally ``_check_generate(max_length, cuda_graph)`` to refuse what the model cannot do.

The prompt is unpadded (left, right or holes: only the tokens whose mask is 1 count, each sequence
at positions 0, 1, ... of its own, as transformers' ``generate`` positions a left-padded prompt)
and prefilled in one varlen pass that fills one KVCache per layer; each new token is one
``forward_decode`` step. Logits processing, sampling, EOS handling, streaming and the returned
layout follow transformers' ``GenerationMixin.generate`` (5.x), so that the same settings and seed
give the same tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn import KVCache

__all__ = ["GenerationMixin", "TextStreamer", "process_logits"]


def process_logits(
    scores: Tensor,
    seen: Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> Tensor:
    """transformers' logits processors for these settings, in its order: repetition penalty (on
    the tokens marked in ``seen`` ``(B, V)`` bool: a positive score divided by the penalty, a
    negative one multiplied), then, when sampling, temperature, top-k, top-p and min-p. Filtered
    tokens get -inf; at least one token always survives. ``scores (B, V)`` float32."""
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(
            scores < 0, scores * repetition_penalty, scores / repetition_penalty
        )
        scores = torch.where(seen, penalised, scores)
    if not do_sample:
        return scores
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        # drop the least likely tokens whose cumulative probability stays within 1 - top_p
        ascending, order = torch.sort(scores, descending=False)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    if min_p is not None:
        probs = scores.softmax(dim=-1)
        drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
        drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
        scores = scores.masked_fill(drop, -float("inf"))
    return scores


def _check_settings(
    do_sample, temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens
) -> None:
    if not repetition_penalty > 0:
        raise ValueError(f"generate: repetition_penalty must be > 0, got {repetition_penalty}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(
            f"generate: max_new_tokens must be a non-negative int, got {max_new_tokens!r}"
        )
    if not do_sample:
        return  # the warpers only act when sampling (transformers only warns about them)
    if not temperature > 0:
        raise ValueError(
            f"generate: temperature must be > 0 (use do_sample=False for greedy), got {temperature}"
        )
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"generate: top_k must be a non-negative int or None, got {top_k!r}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in [0, 1], got {top_p}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"generate: min_p must be in [0, 1], got {min_p}")


class _StopStrings:
    """Whether a stop string now ends inside a sequence's last token, as transformers'
    ``StopStringCriteria`` decides: an occurrence in the decoded text that ends after the text
    of the tokens before the last one (the last token may run past the string's end: tokens "s",
    "to", "pped" stop at "stop"). Only a tail of the tokens is decoded, long enough for the
    longest string even at four tokens per character (byte-level tokens of UTF-8 text)."""

    def __init__(self, stop_strings: str | Sequence[str], tokenizer: Any, prompts: list[list[int]]):
        if tokenizer is None:
            raise ValueError("generate: stop_strings needs the tokenizer (tokenizer=...) to decode")
        self.strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not self.strings or any(not isinstance(s, str) or not s for s in self.strings):
            raise ValueError(
                f"generate: stop_strings must be non-empty strings, got {stop_strings!r}"
            )
        self.tokenizer = tokenizer
        self.tokens = prompts
        # a character is at most four byte tokens; the margin covers decoders that drop a
        # leading space at the start of a slice
        self.tail = 4 * max(len(s) for s in self.strings) + 8

    def __call__(self, b: int, token: int) -> bool:
        self.tokens[b].append(token)
        tail = self.tokens[b][-self.tail :]
        text = self.tokenizer.decode(tail)
        # the text the earlier tokens fix: the prefix shared with their own decoding (which may
        # end in a replacement character where the last token completes a multi-byte one)
        before = len(os.path.commonprefix([text, self.tokenizer.decode(tail[:-1])]))
        return any(text.find(s, max(0, before - len(s) + 1)) >= 0 for s in self.strings)


class GenerationMixin:
    """``generate`` for a model implementing the causal-LM protocol (see the module docstring)."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = 50,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | Tensor | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        streamer: Any = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer: Any = None,
        cache_block_size: int | None = None,
        cuda_graph: bool = False,
        inputs_embeds: Tensor | None = None,
        max_length: int | None = None,
    ) -> Tensor:
        """Continue each prompt of a batch, as transformers' ``model.generate``.

        Args:
            input_ids: ``(B, L)`` int64 prompts, padded on either side.
            attention_mask: ``(B, L)``, 1 on real tokens (all ones when None). Each sequence
                needs at least one real token.
            max_new_tokens: tokens to add (default 20; or ``max_length`` minus L).
            do_sample: multinomial sampling (``torch.multinomial``, so the global RNG after
                ``torch.manual_seed`` or ``generator`` gives transformers' tokens) instead of
                greedy argmax.
            temperature, top_k, top_p, min_p: transformers' warpers (sampling only; checked only
                when sampling). ``top_k`` is 50 by default, as in transformers'
                ``GenerationConfig`` (sampling with no argument truncates to the 50 likeliest
                tokens there too); 0 or None turns it off. A checkpoint's
                ``generation_config.json`` is not read: pass its settings.
            repetition_penalty: transformers' penalty on every token of the real prompt and the
                generated ones (applied in greedy decoding too).
            eos_token_id: int or list; a sequence that produces one is finished. None: the
                model config's ``eos_token_id``.
            pad_token_id: appended to sequences finished by an EOS token when EOS ids are known
                (None: the config's, else the first EOS id, as transformers). Without EOS ids a
                sequence finished by a stop string keeps producing tokens until all are done,
                as in transformers.
            generator: a ``torch.Generator`` for the sampling.
            streamer: an object with ``put(tensor)`` and ``end()``: ``put`` gets the prompt
                ``(B, L)`` on the CPU first (``(B, 0)`` when only ``inputs_embeds`` is given),
                then each step's tokens ``(B,)``, as transformers' streamers (its
                ``TextStreamer`` works, and :class:`TextStreamer`).
            stop_strings, tokenizer: a sequence is finished once one of the strings ends
                inside its last token's text (transformers' ``StopStringCriteria`` rule;
                ``tokenizer.decode(list_of_ids)``).
            cache_block_size: None for contiguous KV caches; an int for paged ones with blocks
                of that many tokens. The caches hold prompt + max_new_tokens from the start.
            cuda_graph: on CUDA, capture one decode step in a CUDA graph and replay it for
                every token (static caches: no growth, no host work in the step).
            inputs_embeds: ``(B, L, hidden)`` instead of (or besides) input_ids for the prefill
                (a VLM's merged embeddings); without input_ids only the new tokens are returned.
            max_length: prompt + new tokens, when max_new_tokens is None.

        Returns:
            int64 ``(B, L + n)``: the prompts as given (padding kept) followed by the n <=
            max_new_tokens new tokens (fewer when every sequence finished early); finished
            sequences continue with ``pad_token_id``.
        """
        prompt = input_ids if input_ids is not None else inputs_embeds
        if prompt is None:
            raise ValueError("generate: give input_ids (B, L) or inputs_embeds (B, L, hidden)")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(
                f"generate: input_ids must be (B, L), got shape {tuple(input_ids.shape)}"
            )
        if inputs_embeds is not None and inputs_embeds.dim() != 3:
            raise ValueError(
                f"generate: inputs_embeds must be (B, L, hidden), got shape {tuple(inputs_embeds.shape)}"
            )
        if (
            input_ids is not None
            and inputs_embeds is not None
            and inputs_embeds.shape[:2] != input_ids.shape
        ):
            raise ValueError("generate: input_ids and inputs_embeds must cover the same (B, L)")
        b, n = prompt.shape[:2]
        device = prompt.device
        if max_new_tokens is None:
            max_new_tokens = 20 if max_length is None else max_length - n
        _check_settings(
            do_sample, temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens
        )
        if attention_mask is None:
            attention_mask = torch.ones(b, n, dtype=torch.long, device=device)
        if attention_mask.shape != (b, n):
            raise ValueError(
                f"generate: attention_mask must have the prompt's shape {(b, n)}, got {tuple(attention_mask.shape)}"
            )
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"generate: cuda_graph=True needs the model on CUDA, got {device}")
        config = getattr(self, "config", {})
        if eos_token_id is None:
            eos_token_id = config.get("eos_token_id")
        if isinstance(eos_token_id, Tensor):
            eos_token_id = eos_token_id.reshape(-1).tolist()
        if eos_token_id is None:
            eos = []
        elif isinstance(eos_token_id, int):
            eos = [eos_token_id]
        else:
            eos = [int(t) for t in eos_token_id]
        if pad_token_id is None:
            pad_token_id = config.get("pad_token_id")
        if pad_token_id is None and eos:
            pad_token_id = eos[0]

        keep = attention_mask.bool()
        lengths = keep.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError(
                "generate: every sequence needs at least one real token (attention_mask all 0)"
            )
        longest = int(lengths.max())
        check = getattr(self, "_check_generate", None)
        if check is not None:
            check(longest + max_new_tokens, cuda_graph)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        positions = (keep.long().cumsum(1) - 1)[keep]
        num_layers, kv_heads, head_dim = self.kv_cache_spec()
        caches = [
            KVCache(
                b,
                kv_heads,
                head_dim,
                longest + max_new_tokens,
                dtype=self.dtype,
                device=device,
                block_size=cache_block_size,
            )
            for _ in range(num_layers)
        ]
        logits = self.forward_packed(
            input_ids[keep] if inputs_embeds is None else None,
            positions,
            cu,
            longest,
            caches,
            inputs_embeds=inputs_embeds[keep] if inputs_embeds is not None else None,
            last_only=True,
        )
        last = logits
        vocab = last.shape[-1]

        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(b, vocab + 1, dtype=torch.bool, device=device)
            if input_ids is not None:
                ids = input_ids.masked_fill(~keep, vocab).clamp(0, vocab)
                seen.scatter_(1, ids, True)
        stops = None
        if stop_strings is not None:
            prompts = (
                [row[m].tolist() for row, m in zip(input_ids, keep)]
                if input_ids is not None
                else [[] for _ in range(b)]
            )
            stops = _StopStrings(stop_strings, tokenizer, prompts)
        if streamer is not None:  # the prompt first; an empty one without input_ids
            streamer.put(
                input_ids.cpu() if input_ids is not None else torch.zeros(b, 0, dtype=torch.long)
            )

        # (one new token needs no decode step, so nothing to capture)
        step = self._decode_step(caches, b, device) if cuda_graph and max_new_tokens > 1 else None
        eos_t = torch.tensor(eos, dtype=torch.long, device=device)
        unfinished = torch.ones(b, dtype=torch.long, device=device)
        next_pos = lengths.clone()
        new: list[Tensor] = []
        for i in range(max_new_tokens):
            scores = process_logits(
                last.float(),
                seen[:, :vocab] if seen is not None else None,
                do_sample,
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
            )
            if do_sample:
                token = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
            else:
                token = scores.argmax(dim=-1)
            if eos and pad_token_id is not None:
                token = token * unfinished + pad_token_id * (1 - unfinished)
            new.append(token)
            if seen is not None:
                seen.scatter_(1, token[:, None].clamp(0, vocab), True)
            if streamer is not None:
                streamer.put(token.cpu())
            if eos:
                unfinished = unfinished & ~torch.isin(token, eos_t)
            if stops is not None:
                host = token.tolist()
                done = [j for j, u in enumerate(unfinished.tolist()) if u and stops(j, host[j])]
                if done:
                    unfinished[done] = 0
            if (eos or stops is not None) and not bool(unfinished.any()):
                break
            if i + 1 == max_new_tokens:
                break
            ids, pos = token[:, None], next_pos[:, None]
            if step is not None:
                last = step(ids, pos)[:, -1]
            else:
                last = self.forward_decode(ids, pos, caches)[:, -1]
            next_pos += 1
        if step is not None:
            for cache in caches:
                cache.sync_lengths()
        if streamer is not None:
            streamer.end()
        out = torch.stack(new, 1) if new else torch.zeros(b, 0, dtype=torch.long, device=device)
        return torch.cat([input_ids, out], 1) if input_ids is not None else out

    def _decode_step(
        self, caches: list[KVCache], batch: int, device: torch.device
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """``forward_decode`` of one token per sequence captured in a CUDA graph: the returned
        function copies ids and positions ``(B, 1)`` into static inputs, replays, and returns the
        static logits ``(B, 1, vocab)`` (overwritten by the next replay). The caches must
        already hold room for every step (no growth inside a graph)."""
        ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        lengths = [cache.lengths for cache in caches]
        # a warm-up run off the capture stream (lazy initialisations), then the capture; both
        # append a token to the caches (the warm-up for real, the capture on the host count
        # only), so the lengths are put back after each
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.forward_decode(ids, pos, caches)
        torch.cuda.current_stream(device).wait_stream(side)
        for cache, n in zip(caches, lengths):
            cache.set_seqlens(n)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.forward_decode(ids, pos, caches)
        for cache, n in zip(caches, lengths):
            cache.set_seqlens(n)

        def step(new_ids: Tensor, new_pos: Tensor) -> Tensor:
            ids.copy_(new_ids)
            pos.copy_(new_pos)
            graph.replay()
            return logits

        return step


class TextStreamer:
    """Prints generated text as it comes (batch of one), like transformers' ``TextStreamer``:
    ``put`` receives the prompt ``(1, L)`` then each new token; text is printed once it decodes
    without a partial character. ``skip_prompt`` leaves the prompt out. ``text`` holds everything
    printed so far; override :meth:`on_text` to send it elsewhere."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.tokens: list[int] = []
        self.printed = 0
        self.text = ""
        self._prompt_next = True

    def put(self, value: Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("TextStreamer: only a batch of one sequence can be streamed")
        ids = value.reshape(-1).tolist()
        if self._prompt_next:
            self._prompt_next = False
            if self.skip_prompt:
                return
        self.tokens.extend(ids)
        text = self.tokenizer.decode(self.tokens, **self.decode_kwargs)
        if text.endswith("\ufffd"):  # a multi-byte character cut in the middle: wait for the rest
            return
        self._emit(text[self.printed :], False)
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, **self.decode_kwargs) if self.tokens else ""
        self._emit(text[self.printed :], True)
        self.tokens, self.printed, self._prompt_next = [], 0, True

    def _emit(self, chunk: str, final: bool) -> None:
        self.text += chunk
        self.on_text(chunk, final)

    def on_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="\n" if stream_end else "")
