"""A Flamingo-style vision-language model (Alayrac et al. 2022) on genext's attention kernels: a
frozen causal LM (genext's :class:`LlamaForCausalLM`) with tanh-gated cross-attention blocks
inserted before every k-th decoder layer, attending from the text tokens to visual tokens that a
Perceiver resampler makes from a vision tower's features.

The gates start at 0, so an untrained model computes exactly the language model's logits;
training the new blocks (``freeze_language_model()``) opens them. Every attention runs a genext
kernel: the LM's causal self-attention as in :class:`LlamaForCausalLM`, the cross-attention and
the resampler non-causal :func:`genext.ops.flash_attention` (dense batches) or
:func:`genext.ops.flash_attention_varlen` (packed tokens); generation decodes through
:class:`genext.KVCache` with the visual keys/values of every cross-attention block computed once
at the prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..nn import KVCache
from ..ops import flash_attention, flash_attention_varlen
from ._config import FrozenConfig
from ._generation import GenerationMixin
from .clip import CLIPVisionModel
from .llama import CausalLMOutput, LlamaForCausalLM, causal_lm_loss

__all__ = [
    "FeedForward",
    "FlamingoForCausalLM",
    "GatedCrossAttentionBlock",
    "MaskedCrossAttention",
    "PerceiverAttention",
    "PerceiverResampler",
]


class FeedForward(nn.Module):
    """``fc2(gelu(fc1(norm(x))))`` without biases, ``dim -> dim * mult -> dim``."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mult, bias=False)
        self.fc2 = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class PerceiverAttention(nn.Module):
    """The latents attend to the media and to themselves (keys/values from
    ``[norm_media(x), norm_latents(latents)]``), non-causal: ``x (B, N, dim)``, ``latents (B, n,
    dim)`` -> ``(B, n, dim)``."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, head_dim, head_dim**-0.5
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        b, n = latents.shape[:2]
        latents = self.norm_latents(latents)
        both = torch.cat([self.norm_media(x), latents], dim=1)
        q = self.to_q(latents).view(b, n, self.heads, self.head_dim)
        k, v = self.to_kv(both).view(b, both.shape[1], 2, self.heads, self.head_dim).unbind(2)
        out = flash_attention(q, k, v, causal=False, scale=self.scale, layout="blhd")
        return self.to_out(out.reshape(b, n, -1))


class PerceiverResampler(nn.Module):
    """A fixed number of learned latents that read a variable number of vision features:
    ``depth`` rounds of ``latents += attn(x, latents)``, ``latents += ff(latents)``, then a
    LayerNorm. ``(B, N, dim) -> (B, num_latents, dim)``."""

    def __init__(
        self,
        dim: int,
        depth: int = 2,
        num_latents: int = 64,
        heads: int = 8,
        head_dim: int = 64,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {"attn": PerceiverAttention(dim, heads, head_dim), "ff": FeedForward(dim, ff_mult)}
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = latents + layer["attn"](x, latents)
            latents = latents + layer["ff"](latents)
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    """Text tokens (queries, ``dim``) attend to visual tokens (keys/values, ``media_dim``),
    non-causal; a token whose ``media_mask`` is False gets no contribution (a zero output: the
    out projection has no bias)."""

    def __init__(self, dim: int, media_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, head_dim, head_dim**-0.5
        inner = heads * head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def media_kv(self, media: Tensor) -> tuple[Tensor, Tensor]:
        """``media (B, M, media_dim)`` -> keys and values ``(B, M, H, D)`` each (computed once
        per generation and reused at every step)."""
        b, m = media.shape[:2]
        k, v = self.to_kv(media).view(b, m, 2, self.heads, self.head_dim).unbind(2)
        return k, v

    def forward(
        self,
        x: Tensor,
        kv: tuple[Tensor, Tensor],
        media_mask: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Tensor:
        """``x (B, L, dim)`` with ``media_mask (B, L)``, or packed ``x (T, dim)`` with
        ``media_mask (T,)`` and the queries' ``cu_seqlens`` int32 ``(B + 1,)`` and
        ``max_seqlen``; ``kv`` from :meth:`media_kv`. Returns x's shape."""
        k, v = kv
        lead = x.shape[:-1]
        q = self.to_q(self.norm(x)).view(*lead, self.heads, self.head_dim)
        if cu_seqlens is None:
            out = flash_attention(q, k, v, causal=False, scale=self.scale, layout="blhd")
        else:
            b, m = k.shape[:2]
            cu_k = torch.arange(b + 1, device=q.device, dtype=torch.int32) * m
            out = flash_attention_varlen(
                q,
                k.reshape(b * m, self.heads, self.head_dim),
                v.reshape(b * m, self.heads, self.head_dim),
                cu_seqlens,
                cu_k,
                max_seqlen,
                m,
                causal=False,
                scale=self.scale,
            )
        out = out.reshape(*lead, -1)
        if media_mask is not None:
            out = out * media_mask[..., None].to(out.dtype)
        return self.to_out(out)


class GatedCrossAttentionBlock(nn.Module):
    """``x += tanh(attn_gate) * cross_attn(x, media)``, then ``x += tanh(ff_gate) * ff(x)``;
    both gates start at 0, so a new block passes x through unchanged."""

    def __init__(
        self, dim: int, media_dim: int, heads: int = 8, head_dim: int = 64, ff_mult: int = 4
    ) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(dim, media_dim, heads, head_dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        x: Tensor,
        kv: tuple[Tensor, Tensor],
        media_mask: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Tensor:
        x = x + self.attn_gate.tanh() * self.attn(x, kv, media_mask, cu_seqlens, max_seqlen)
        return x + self.ff_gate.tanh() * self.ff(x)


class FlamingoForCausalLM(GenerationMixin, nn.Module):
    """A Flamingo-style VLM around a genext causal LM.

    Args:
        language_model: a :class:`LlamaForCausalLM` (or Mistral/Qwen2); its modules are kept
            as they are (state_dict keys ``language_model.*``).
        vision_model: a :class:`CLIPVisionModel` whose ``last_hidden_state`` (before the
            post-layernorm, CLS included) gives the vision features; None when ``forward`` gets
            ``vision_features`` only (then ``vision_dim`` is required).
        cross_attn_every: a gated cross-attention block before decoder layers k-1, 2k-1, ...
            (every layer for 1).
        num_latents: the visual tokens per image the Perceiver resampler makes; None for no
            resampler (the cross-attention reads the vision features themselves).
        resampler_depth, heads, head_dim, ff_mult: sizes of the resampler and the blocks.
        vision_dim: the vision features' width (default: the vision model's hidden size).
        project_media: a linear map from ``vision_dim`` to the LM's hidden size after the
            resampler (the blocks' keys/values then read LM-width media).

    Trainable after :meth:`freeze_language_model`: ``gated_cross_attn``, ``perceiver`` and
    ``media_proj``.
    """

    def __init__(
        self,
        language_model: LlamaForCausalLM,
        vision_model: CLIPVisionModel | None = None,
        cross_attn_every: int = 4,
        num_latents: int | None = 64,
        resampler_depth: int = 2,
        heads: int = 8,
        head_dim: int = 64,
        ff_mult: int = 4,
        vision_dim: int | None = None,
        project_media: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(language_model, LlamaForCausalLM):
            raise TypeError(
                "FlamingoForCausalLM: language_model must be a genext LlamaForCausalLM, got "
                f"{type(language_model).__name__}"
            )
        n_layers = len(language_model.model.layers)
        if not isinstance(cross_attn_every, int) or not 1 <= cross_attn_every <= n_layers:
            raise ValueError(
                f"FlamingoForCausalLM: cross_attn_every must be an int in [1, {n_layers}] (the "
                f"language model's layers), got {cross_attn_every!r}"
            )
        if vision_dim is None:
            if vision_model is None:
                raise ValueError("FlamingoForCausalLM: give vision_model or vision_dim")
            vision_dim = vision_model.config.hidden_size
        if num_latents is not None and num_latents < 1:
            raise ValueError(f"FlamingoForCausalLM: num_latents must be >= 1, got {num_latents}")
        hidden = language_model.config.hidden_size
        self.language_model = language_model
        self.vision_model = vision_model
        self.perceiver = (
            PerceiverResampler(vision_dim, resampler_depth, num_latents, heads, head_dim, ff_mult)
            if num_latents is not None
            else None
        )
        self.media_proj = nn.Linear(vision_dim, hidden) if project_media else None
        media_dim = hidden if project_media else vision_dim
        self.cross_layers = [i for i in range(n_layers) if (i + 1) % cross_attn_every == 0]
        self.gated_cross_attn = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(hidden, media_dim, heads, head_dim, ff_mult)
                for i in self.cross_layers
            }
        )
        self._generation: tuple | None = None
        nn.Module.__setattr__(
            self,
            "config",
            FrozenConfig(
                cross_attn_every=cross_attn_every,
                num_latents=num_latents,
                resampler_depth=resampler_depth,
                heads=heads,
                head_dim=head_dim,
                ff_mult=ff_mult,
                vision_dim=vision_dim,
                project_media=project_media,
            ),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    def freeze_language_model(self, freeze_vision: bool = True) -> FlamingoForCausalLM:
        """Turns off the gradients of the language model (and of the vision model unless
        ``freeze_vision=False``): only the new modules train. Returns self."""
        self.language_model.requires_grad_(False)
        if self.vision_model is not None:
            self.vision_model.requires_grad_(not freeze_vision)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that require gradients (an optimizer's argument)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ---- media ------------------------------------------------------------------------------

    def encode_media(
        self, pixel_values: Tensor | None = None, vision_features: Tensor | None = None
    ) -> Tensor:
        """The visual tokens of each sequence, ``(B, M, media_dim)``.

        ``pixel_values (B, 3, S, S)`` (one image per sequence) or ``(B, N, 3, S, S)`` (N images
        each), through the vision model; or ``vision_features (B, P, vision_dim)`` /
        ``(B, N, P, vision_dim)``. Each image becomes ``num_latents`` tokens (P without the
        resampler); a sequence's images are concatenated, M = N x that."""
        if (pixel_values is None) == (vision_features is None):
            raise ValueError("encode_media: give exactly one of pixel_values and vision_features")
        if pixel_values is not None:
            if self.vision_model is None:
                raise ValueError("encode_media: pixel_values need a vision_model")
            if pixel_values.dim() not in (4, 5):
                raise ValueError(
                    "pixel_values must be (B, 3, S, S) or (B, N, 3, S, S), got shape "
                    f"{tuple(pixel_values.shape)}"
                )
            b = pixel_values.shape[0]
            images = pixel_values.reshape(-1, *pixel_values.shape[-3:])
            features = self.vision_model(images).last_hidden_state
        else:
            if vision_features.dim() not in (3, 4):
                raise ValueError(
                    "vision_features must be (B, P, C) or (B, N, P, C), got shape "
                    f"{tuple(vision_features.shape)}"
                )
            b = vision_features.shape[0]
            features = vision_features.reshape(-1, *vision_features.shape[-2:])
        if features.shape[-1] != self.config.vision_dim:
            raise ValueError(
                f"vision features are {features.shape[-1]} wide, the model expects vision_dim "
                f"{self.config.vision_dim}"
            )
        if self.perceiver is not None:
            features = self.perceiver(features)
        if self.media_proj is not None:
            features = self.media_proj(features)
        return features.reshape(b, -1, features.shape[-1])

    def _media_kv(self, media: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
        media = media.to(self.dtype)
        return {i: self.gated_cross_attn[str(i)].attn.media_kv(media) for i in self.cross_layers}

    # ---- the decoder with the cross-attention blocks ----------------------------------------

    def _run(
        self,
        h: Tensor,
        positions: Tensor,
        attend,
        kvs: dict[int, tuple[Tensor, Tensor]],
        media_mask: Tensor | None,
        cu_seqlens: Tensor | None,
        max_seqlen: int | None,
        seq_len: int | None,
    ) -> Tensor:
        """The LM's decoder (as ``LlamaModel.run``) with block i's cross-attention before layer
        i; ``h (B, L, hidden)`` dense or ``(T, hidden)`` packed (then ``cu_seqlens``,
        ``max_seqlen``). Returns the final-normed hidden states."""
        lm = self.language_model.model
        cos, sin = lm.rotary_emb(positions, h.dtype, seq_len)
        ckpt = lm.gradient_checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(lm.layers):
            if i in kvs:
                block = self.gated_cross_attn[str(i)]
                if ckpt:
                    h = checkpoint(
                        block, h, kvs[i], media_mask, cu_seqlens, max_seqlen, use_reentrant=False
                    )
                else:
                    h = block(h, kvs[i], media_mask, cu_seqlens, max_seqlen)
            if ckpt:
                h = checkpoint(layer, h, cos, sin, attend, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attend)
        return lm.norm(h)

    def forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        vision_features: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        media_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        media: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits (and loss) of the text given the images.

        Args:
            input_ids: ``(B, L)`` int64 (or ``inputs_embeds (B, L, hidden)``).
            pixel_values / vision_features: see :meth:`encode_media`; or ``media (B, M,
                media_dim)`` already encoded.
            attention_mask, position_ids, labels, num_items_in_batch: as
                :meth:`LlamaForCausalLM.forward` (padding either side, logits 0 there; default
                positions ``arange(L)``).
            media_mask: ``(B, L)`` bool, True where a text token may attend to the images
                (e.g. only after the image's place in the text); None: every token.

        Returns:
            :class:`CausalLMOutput` with ``logits (B, L, vocab)`` and ``loss``.
        """
        lm = self.language_model
        h = lm._embed(input_ids, inputs_embeds, "forward")
        b, n = h.shape[:2]
        if media is None:
            media = self.encode_media(pixel_values, vision_features)
        elif pixel_values is not None or vision_features is not None:
            raise ValueError("forward: give media or pixel_values/vision_features, not both")
        if media.dim() != 3 or media.shape[0] != b:
            raise ValueError(
                f"forward: the media must be (B={b}, M, media_dim), got {tuple(media.shape)}"
            )
        if media_mask is not None and media_mask.shape != (b, n):
            raise ValueError(
                f"forward: media_mask must be (B, L) = {(b, n)}, got {tuple(media_mask.shape)}"
            )
        kvs = self._media_kv(media)
        if position_ids is None:
            position_ids = torch.arange(n, device=h.device)[None]
        position_ids = position_ids.expand(b, n)
        rotary = lm.model.rotary_emb
        seq_len = int(position_ids.max()) + 1 if rotary.depends_on_length and n else None
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded:
            lm._check_window(n)
            attend = lm._dense_attend
            hidden = self._run(h, position_ids, attend, kvs, media_mask, None, None, seq_len)
            logits = lm.lm_head(hidden)
        else:
            keep = attention_mask.bool()
            lengths = keep.sum(1)
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            longest = int(lengths.max())
            lm._check_window(longest)
            attend = lm._varlen_attend(cu, longest)
            mask = media_mask[keep] if media_mask is not None else None
            hidden = self._run(h[keep], position_ids[keep], attend, kvs, mask, cu, longest, seq_len)
            packed = lm.lm_head(hidden)
            logits = packed.new_zeros(b, n, packed.shape[-1])
            logits = logits.index_put(keep.nonzero(as_tuple=True), packed)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(
                logits, labels, attention_mask if padded else None, num_items_in_batch
            )
        return CausalLMOutput(loss=loss, logits=logits)

    # ---- the generation protocol ------------------------------------------------------------

    def kv_cache_spec(self) -> tuple[int, int, int]:
        return self.language_model.kv_cache_spec()

    def _check_generate(self, max_length: int, cuda_graph: bool) -> None:
        self.language_model._check_generate(max_length, cuda_graph)

    def _generation_state(self, what: str) -> tuple:
        if self._generation is None:
            raise RuntimeError(
                f"{what}: the visual tokens are set by FlamingoForCausalLM.generate(...); call "
                "generate rather than the protocol methods directly"
            )
        return self._generation

    def forward_packed(
        self,
        input_ids: Tensor | None,
        position_ids: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        caches: Sequence[KVCache] | None = None,
        inputs_embeds: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """The prefill of :meth:`generate`: as :meth:`LlamaForCausalLM.forward_packed`, with the
        cross-attention blocks reading the visual keys/values of the current generation."""
        kvs, prefill_mask, _ = self._generation_state("forward_packed")
        lm = self.language_model
        lm._check_caches(caches, "forward_packed")
        h = lm._embed(input_ids, inputs_embeds, "forward_packed")
        attend = lm._varlen_attend(cu_seqlens, max_seqlen, caches)
        hidden = self._run(h, position_ids, attend, kvs, prefill_mask, cu_seqlens, max_seqlen, None)
        return lm.lm_head(hidden[cu_seqlens[1:].long() - 1] if last_only else hidden)

    def forward_decode(
        self,
        input_ids: Tensor | None,
        position_ids: Tensor,
        caches: Sequence[KVCache],
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """A decode step of :meth:`generate`: as :meth:`LlamaForCausalLM.forward_decode`, the
        cross-attention blocks reading the cached visual keys/values."""
        kvs, _, decode_mask = self._generation_state("forward_decode")
        lm = self.language_model
        lm._check_caches(caches, "forward_decode")
        h = lm._embed(input_ids, inputs_embeds, "forward_decode")
        attend = lm._cache_attend(caches)
        mask = decode_mask[:, None].expand(h.shape[:2]) if decode_mask is not None else None
        return lm.lm_head(self._run(h, position_ids, attend, kvs, mask, None, None, None))

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        vision_features: Tensor | None = None,
        attention_mask: Tensor | None = None,
        media_mask: Tensor | None = None,
        media: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """:meth:`GenerationMixin.generate` with images: the visual tokens are encoded once and
        each cross-attention block's keys/values computed once; the prefill runs the prompt
        (``input_ids (B, L)``, ``attention_mask``, ``media_mask (B, L)`` as in
        :meth:`forward`), each decode step one token per sequence, attending to the images when
        the sequence's last prompt token did. ``kwargs``: ``max_new_tokens``, ``do_sample``, ...
        (``eos_token_id``/``pad_token_id`` default to the language model's config). Returns
        ``(B, L + n)`` int64."""
        if media is None:
            media = self.encode_media(pixel_values, vision_features)
        b, n = input_ids.shape
        if media.dim() != 3 or media.shape[0] != b:
            raise ValueError(
                f"generate: the media must be (B={b}, M, media_dim), got {tuple(media.shape)}"
            )
        keep = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(b, n, dtype=torch.bool, device=input_ids.device)
        )
        prefill_mask = decode_mask = None
        if media_mask is not None:
            if media_mask.shape != (b, n):
                raise ValueError(
                    f"generate: media_mask must be (B, L) = {(b, n)}, got {tuple(media_mask.shape)}"
                )
            media_mask = media_mask.bool()
            prefill_mask = media_mask[keep]
            last = keep.long().cumsum(1).argmax(1)
            decode_mask = media_mask.gather(1, last[:, None])[:, 0]
        config = self.language_model.config
        kwargs.setdefault("eos_token_id", config.get("eos_token_id"))
        if kwargs.get("pad_token_id") is None:
            kwargs["pad_token_id"] = config.get("pad_token_id")
        self._generation = (self._media_kv(media), prefill_mask, decode_mask)
        try:
            return GenerationMixin.generate(
                self, input_ids, attention_mask=attention_mask, **kwargs
            )
        finally:
            self._generation = None
