"""LlamaForCausalLM: transformers' Llama (and Mistral, Qwen2: the same decoder) on genext's attention
kernels.

Takes transformers' ``LlamaConfig``, ``MistralConfig`` or ``Qwen2Config`` (the object or its dict)
and loads transformers' ``state_dict`` with no renaming. Attention runs
:func:`genext.ops.flash_attention` (causal, ``(B, L, H, D)``) on unpadded batches and
:func:`genext.ops.flash_attention_varlen` on the real tokens of padded ones (no compute on
padding); generation prefills with the varlen kernel and decodes through
:class:`genext.nn.KVCache` (see :mod:`genext.models._generation` for ``generate``).

Packed sequences: a forward with ``position_ids`` that restart inside a row (``[0, 1, 2, 0, 1,
2, 3, 4]``, transformers' ``DataCollatorWithFlattening``) and no ``attention_mask`` treats each run
of consecutive positions as its own sequence (block-diagonal causal attention, with the varlen
kernel), as transformers' masks do when there is no cache (``use_cache=False``, training).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..nn import KVCache
from ..ops import flash_attention, flash_attention_varlen
from ._config import (
    TRANSFORMERS_GENERIC_KEYS,
    ModelOutput,
    PeerConfigMixin,
    accepts_config,
    transformers_config,
)
from ._generation import GenerationMixin
from ._packing import packing_from_positions
from ._rope import RotaryEmbedding, apply_rotary, standardize_rope

__all__ = [
    "CausalLMOutput",
    "LlamaForCausalLM",
    "LlamaModel",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "causal_lm_loss",
]

# attention(layer index, q, k, v) -> out; q (..., Hq, D), k and v (..., Hk, D), post-rotary
Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# transformers' generic fields, and two more a Llama config carries that change nothing here
_GENERIC_KEYS = TRANSFORMERS_GENERIC_KEYS | {"pretraining_tp", "tie_encoder_decoder"}


class CausalLMOutput(ModelOutput):
    """``loss`` (when labels were given) and ``logits (B, L, vocab)``, as transformers'
    ``CausalLMOutputWithPast`` (``out[0]`` is the loss when there is one)."""

    _fields = ("loss", "logits")


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    num_items_in_batch: int | Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """transformers' causal-LM loss: the logits at t predict ``labels[:, t + 1]``; labels equal to
    ``ignore_index`` do not count; the mean over the counted tokens (or their sum over
    ``num_items_in_batch``). 16-bit logits are upcast to float32 (float64 stays float64).

    With ``attention_mask``, predictions made at padded positions do not count either (their
    logits are not computed): labels of padding are -100 in any usual collator, and then this is
    exactly transformers' loss."""
    vocab = logits.shape[-1]
    target = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if attention_mask is not None:
        target = target.masked_fill(attention_mask == 0, ignore_index)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(
        logits.reshape(-1, vocab),
        target.reshape(-1).to(logits.device),
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return loss if num_items_in_batch is None else loss / num_items_in_batch


class LlamaRMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, the statistics in float32 and the normalised
    value cast back to x's dtype before the weight, as transformers computes it."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_fn = _ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaAttention(nn.Module):
    """Grouped-query attention: projections to Hq query and Hk key/value heads of ``head_dim``,
    rotary on q and k, attention by the caller's ``attend`` (dense, varlen or KV cache)."""

    def __init__(
        self,
        layer_idx: int,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        o_bias: bool,
    ) -> None:
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
        """x ``(..., L, hidden)``, cos/sin ``(..., L, head_dim)`` -> ``(..., L, hidden)``."""
        # unflatten/flatten of the last dims only: also for no tokens at all (T = 0)
        heads = (-1, self.head_dim)
        q = self.q_proj(x).unflatten(-1, heads)
        k = self.k_proj(x).unflatten(-1, heads)
        v = self.v_proj(x).unflatten(-1, heads)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(self.layer_idx, q, k, v)
        return self.o_proj(out.flatten(-2))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, attn: LlamaAttention, mlp: LlamaMLP, hidden: int, eps: float) -> None:
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = LlamaRMSNorm(hidden, eps)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder without the LM head (transformers' ``model.``): ``embed_tokens``, ``layers``,
    ``norm`` and ``rotary_emb`` (no weights: its ``inv_freq`` is not in the ``state_dict``)."""

    def __init__(
        self,
        layers: Sequence[LlamaDecoderLayer],
        vocab_size: int,
        hidden: int,
        eps: float,
        rotary: RotaryEmbedding,
        padding_idx: int | None,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden, padding_idx)
        self.layers = nn.ModuleList(layers)
        self.norm = LlamaRMSNorm(hidden, eps)
        self.rotary_emb = rotary
        self.gradient_checkpointing = False

    def run(self, h: Tensor, positions: Tensor, attend: Attend, seq_len: int | None) -> Tensor:
        """Hidden states ``(..., L, hidden)`` at ``positions`` ``(..., L)`` through every layer
        and the final norm. ``seq_len``: the largest position + 1, for the rope types that
        depend on it (None: from ``positions``)."""
        cos, sin = self.rotary_emb(positions, h.dtype, seq_len)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, attend, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attend)
        return self.norm(h)


class LlamaForCausalLM(PeerConfigMixin, GenerationMixin, nn.Module):
    """transformers' ``LlamaForCausalLM`` (also ``MistralForCausalLM`` and ``Qwen2ForCausalLM``):
    the keyword arguments are the transformers config's fields; build from a config as
    transformers does, ``LlamaForCausalLM(config)`` (a ``PretrainedConfig`` object or its dict,
    keyword arguments overriding single fields), or with :meth:`from_config`.

    ``model_type`` picks the family's biases: ``"llama"`` puts a bias on q/k/v/o when
    ``attention_bias`` and on the MLP when ``mlp_bias``; ``"qwen2"`` on q/k/v only;
    ``"mistral"`` none. ``rope_parameters`` (transformers 5's layout) or ``rope_scaling`` +
    ``rope_theta`` (4.x's) select the rotary schedule (``default``, ``linear``, ``dynamic``,
    ``yarn``, ``longrope``, ``llama3``). A sliding window (Mistral's ``sliding_window``, Qwen2's
    ``use_sliding_window``) is not implemented: any call on a sequence longer than the window
    raises a ValueError (shorter sequences are unaffected by it). ``attention_dropout`` must be 0.

    Forward: :meth:`forward` as transformers' (logits and loss); the generation protocol
    :meth:`kv_cache_spec`, :meth:`forward_packed` and :meth:`forward_decode`; ``generate``.
    """

    default_model_type = "llama"
    _weights_name = "model"  # save_pretrained writes transformers' model.safetensors

    @accepts_config
    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = False,
        rope_parameters: Mapping[str, Any] | None = None,
        rope_scaling: Mapping[str, Any] | None = None,
        rope_theta: float | None = None,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        attention_dropout: float = 0.0,
        sliding_window: int | None = None,
        use_sliding_window: bool | None = None,
        max_window_layers: int | None = None,
        layer_types: Sequence[str] | None = None,
        model_type: str | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | list[int] | None = None,
        eos_token_id: int | list[int] | None = None,
    ) -> None:
        super().__init__()
        model_type = model_type or self.default_model_type
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(
                f"{type(self).__name__}: model_type must be 'llama', 'mistral' or 'qwen2', "
                f"got {model_type!r}"
            )
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"{type(self).__name__}: hidden_act must be one of {sorted(_ACTIVATIONS)}, "
                f"got {hidden_act!r}"
            )
        if attention_dropout:
            raise ValueError(
                f"{type(self).__name__}: attention_dropout must be 0 (genext's attention kernels "
                f"have no dropout), got {attention_dropout}"
            )
        kv_heads = num_key_value_heads or num_attention_heads
        if num_attention_heads % kv_heads:
            raise ValueError(
                f"num_key_value_heads ({kv_heads}) must divide num_attention_heads "
                f"({num_attention_heads})"
            )
        head_dim = head_dim or hidden_size // num_attention_heads
        rope = standardize_rope(rope_parameters, rope_scaling, rope_theta, max_position_embeddings)
        self.sliding_window = self._window(
            model_type,
            sliding_window,
            use_sliding_window,
            max_window_layers,
            layer_types,
            num_hidden_layers,
        )
        qkv_bias = attention_bias if model_type == "llama" else model_type == "qwen2"
        o_bias = attention_bias and model_type == "llama"
        mlp_bias = mlp_bias and model_type == "llama"
        layers = [
            LlamaDecoderLayer(
                LlamaAttention(
                    i, hidden_size, num_attention_heads, kv_heads, head_dim, qkv_bias, o_bias
                ),
                LlamaMLP(hidden_size, intermediate_size, hidden_act, mlp_bias),
                hidden_size,
                rms_norm_eps,
            )
            for i in range(num_hidden_layers)
        ]
        rotary = RotaryEmbedding(rope, head_dim, max_position_embeddings)
        self.model = LlamaModel(layers, vocab_size, hidden_size, rms_norm_eps, rotary, pad_token_id)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        if tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.num_kv_heads, self.head_dim = kv_heads, head_dim
        self.scale = head_dim**-0.5
        self._record_config(
            dict(
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                intermediate_size=intermediate_size,
                num_hidden_layers=num_hidden_layers,
                num_attention_heads=num_attention_heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                hidden_act=hidden_act,
                max_position_embeddings=max_position_embeddings,
                rms_norm_eps=rms_norm_eps,
                tie_word_embeddings=tie_word_embeddings,
                rope_parameters=rope,
                attention_bias=attention_bias,
                mlp_bias=mlp_bias,
                sliding_window=sliding_window,
                use_sliding_window=use_sliding_window,
                max_window_layers=max_window_layers,
                layer_types=layer_types,
                model_type=model_type,
                pad_token_id=pad_token_id,
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
            )
        )

    # ---- config -----------------------------------------------------------------------------

    @staticmethod
    def _window(model_type, window, use_window, max_window_layers, layer_types, n_layers):
        """The sliding window some layer uses (None: full attention everywhere)."""
        if window is None or use_window is False or model_type == "llama":
            return None
        if layer_types is not None:
            sliding = any(t == "sliding_attention" for t in layer_types)
        elif model_type == "qwen2":
            sliding = bool(use_window) and n_layers > (max_window_layers or 0)
        else:
            sliding = True
        return int(window) if sliding else None

    @classmethod
    def _fields_of(cls, config: Any, overrides: Mapping[str, Any]) -> dict:
        if not isinstance(config, Mapping) and hasattr(config, "to_dict"):
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise TypeError(
                f"{cls.__name__}.from_config: config must be a transformers config or a dict, "
                f"got {type(config).__name__}"
            )
        config = {k: v for k, v in config.items() if k not in _GENERIC_KEYS}
        return cls._config_kwargs(config, overrides)

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> LlamaForCausalLM:
        """A model with random weights from transformers' ``LlamaConfig``/``MistralConfig``/
        ``Qwen2Config`` (or any object with ``to_dict()``), or a dict of its fields;
        ``overrides`` replace single fields. transformers' generic fields (``use_cache``,
        ``initializer_range``, ``id2label``, ...) are ignored. The same as ``cls(config,
        **overrides)``."""
        return cls(**cls._fields_of(config, overrides))

    def _saved_config(self) -> dict[str, Any]:
        model_type = self.config.model_type
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
        return transformers_config(
            self.config, model_type, arch.get(model_type, "Qwen2ForCausalLM"), self.dtype
        )

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign=False):
        """``nn.Module.load_state_dict``; with tied embeddings a state without ``lm_head.weight``
        (transformers saves the tied tensor once) loads too."""
        if self.config.tie_word_embeddings and "lm_head.weight" not in state_dict:
            key = "model.embed_tokens.weight"
            if key in state_dict:
                state_dict = {**state_dict, "lm_head.weight": state_dict[key]}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    # ---- checks -----------------------------------------------------------------------------

    def _check_window(self, longest: int) -> None:
        if self.sliding_window is not None and longest > self.sliding_window:
            raise ValueError(
                f"{type(self).__name__}: a sequence of {longest} tokens is longer than the "
                f"sliding_window ({self.sliding_window}); sliding-window attention is not "
                "implemented (it changes nothing up to that length)"
            )

    def _check_generate(self, max_length: int, cuda_graph: bool) -> None:
        """Called by ``generate`` before the prefill: the longest sequence it may build, and
        whether decode steps will be captured in a CUDA graph."""
        self._check_window(max_length)
        if cuda_graph and self.model.rotary_emb.depends_on_length:
            raise ValueError(
                f"generate: cuda_graph=True cannot capture rope_type "
                f"{self.config.rope_parameters['rope_type']!r}, whose frequencies depend on the "
                "longest position at every step (read on the host)"
            )

    def _embed(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, what: str) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{what}: give exactly one of input_ids and inputs_embeds")
        return self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    # ---- forward ----------------------------------------------------------------------------

    # the attention of every layer, as ``model.run`` calls it: attend(layer, q, k, v)

    def _dense_attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return flash_attention(q, k, v, causal=True, scale=self.scale, layout="blhd")

    def _varlen_attend(
        self, cu_seqlens: Tensor, max_seqlen: int, caches: Sequence[KVCache] | None = None
    ) -> Callable[[int, Tensor, Tensor, Tensor], Tensor]:
        """Causal varlen attention over packed sequences; with ``caches`` each layer's keys and
        values also become its cache's content (a prefill)."""

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            if caches is not None:
                caches[layer].prefill_packed(k, v, cu_seqlens)
            return flash_attention_varlen(
                q,
                k,
                v,
                cu_seqlens,
                cu_seqlens,
                max_seqlen,
                max_seqlen,
                causal=True,
                scale=self.scale,
            )

        return attend

    def _cache_attend(
        self, caches: Sequence[KVCache]
    ) -> Callable[[int, Tensor, Tensor, Tensor], Tensor]:
        """A decode step's attention: each layer appends to and attends over its cache."""

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return caches[layer].attend(q, k, v, causal=True, scale=self.scale)

        return attend

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> CausalLMOutput:
        """transformers' forward.

        Args:
            input_ids: ``(B, L)`` int64, or ``inputs_embeds`` ``(B, L, hidden)``.
            attention_mask: ``(B, L)``, 1 for real tokens, 0 for padding (either side). With
                padding the real tokens are packed and attend with the varlen kernel; the
                logits at padded positions are not computed (they are 0); a batch of padding
                only gives zero logits and a NaN loss (no token counts).
            position_ids: ``(B, L)`` or ``(1, L)``; by default ``arange(L)`` counting padding,
                as transformers' forward (generation gives each sequence 0, 1, ... instead).
                Without ``attention_mask``, positions that restart inside a row (``[0, 1, 2, 0,
                1]``: a position that is not the previous one + 1 starts a sequence) mark
                sequences packed into the row: each attends only to itself (block-diagonal
                causal), as transformers without a cache. The loss still runs over the whole row
                (a collator sets each sequence's first label to -100).
            labels: ``(B, L)``: the loss of :func:`causal_lm_loss` (shifted inside; -100 ignored;
                predictions made at padding ignored).
            num_items_in_batch: divide the summed loss by it instead of taking the mean.

        Returns:
            :class:`CausalLMOutput` with ``logits (B, L, vocab)`` and ``loss``.
        """
        h = self._embed(input_ids, inputs_embeds, "forward")
        b, n = h.shape[:2]
        # sequences packed into rows, told apart by restarting positions (only without a mask)
        by_positions = None
        if position_ids is None:
            position_ids = torch.arange(n, device=h.device)[None]
        elif attention_mask is None:
            by_positions = packing_from_positions(position_ids.expand(b, n))
        position_ids = position_ids.expand(b, n)
        rotary = self.model.rotary_emb
        # the largest position of the whole batch, padding included, as transformers takes it
        seq_len = int(position_ids.max()) + 1 if rotary.depends_on_length and n else None
        padded = attention_mask is not None and not bool(attention_mask.all())
        if by_positions is not None:
            cu, longest = by_positions.cu_seqlens, by_positions.max_seqlen
            self._check_window(longest)
            attend = self._varlen_attend(cu, longest)
            hidden = self.model.run(h.flatten(0, 1), position_ids.flatten(), attend, seq_len)
            logits = self.lm_head(hidden).unflatten(0, (b, n))
        elif not padded:
            self._check_window(n)
            logits = self.lm_head(self.model.run(h, position_ids, self._dense_attend, seq_len))
        else:
            keep = attention_mask.bool()
            lengths = keep.sum(1)
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            longest = int(lengths.max())
            self._check_window(longest)
            attend = self._varlen_attend(cu, longest)
            hidden = self.model.run(h[keep], position_ids[keep], attend, seq_len)
            packed = self.lm_head(hidden)
            logits = packed.new_zeros(b, n, packed.shape[-1])
            logits = logits.index_put(keep.nonzero(as_tuple=True), packed)
        loss = None
        if labels is not None:
            mask = attention_mask if padded else None
            loss = causal_lm_loss(logits, labels, mask, num_items_in_batch)
        return CausalLMOutput(loss=loss, logits=logits)

    # ---- the generation protocol ------------------------------------------------------------

    def kv_cache_spec(self) -> tuple[int, int, int]:
        """``(num_layers, num_kv_heads, head_dim)``: one :class:`genext.KVCache` per layer."""
        return len(self.model.layers), self.num_kv_heads, self.head_dim

    def _check_caches(self, caches: Sequence[KVCache] | None, what: str) -> None:
        n = len(self.model.layers)
        if caches is not None and len(caches) != n:
            raise ValueError(
                f"{what}: caches must hold one KVCache per layer ({n}), got {len(caches)}"
            )

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
        """B sequences packed without padding: ``input_ids (T,)`` (or ``inputs_embeds (T,
        hidden)``), ``position_ids (T,)``, ``cu_seqlens`` int32 ``(B + 1,)`` from 0,
        ``max_seqlen`` their longest length. Every layer attends with
        :func:`genext.ops.flash_attention_varlen` (causal). With ``caches`` (one per layer, B
        sequences each), each layer's post-rotary keys and values of sequence b become that
        cache's content for b. Returns logits ``(T, vocab)``, or with ``last_only`` those of each
        sequence's last token only, ``(B, vocab)`` (a prefill needs no more: the head's product
        over every prompt token is skipped)."""
        self._check_caches(caches, "forward_packed")
        h = self._embed(input_ids, inputs_embeds, "forward_packed")
        self._check_window(int(max_seqlen))
        attend = self._varlen_attend(cu_seqlens, max_seqlen, caches)
        h = self.model.run(h, position_ids, attend, None)
        return self.lm_head(h[cu_seqlens[1:].long() - 1] if last_only else h)

    def forward_decode(
        self,
        input_ids: Tensor | None,
        position_ids: Tensor,
        caches: Sequence[KVCache],
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """A decode step: ``input_ids (B, Lq)`` (or ``inputs_embeds (B, Lq, hidden)``) at
        ``position_ids (B, Lq)``; every layer runs ``caches[layer].attend(q, k, v)`` (appends
        the new keys/values, attends over the cache, causal). Returns logits ``(B, Lq,
        vocab)``."""
        self._check_caches(caches, "forward_decode")
        if caches is None:
            raise ValueError("forward_decode: caches are required (one KVCache per layer)")
        h = self._embed(input_ids, inputs_embeds, "forward_decode")
        self._check_window(max(caches[0].lengths, default=0) + h.shape[1])
        return self.lm_head(self.model.run(h, position_ids, self._cache_attend(caches), None))


class MistralForCausalLM(LlamaForCausalLM):
    """:class:`LlamaForCausalLM` with ``model_type="mistral"`` by default (no biases)."""

    default_model_type = "mistral"


class Qwen2ForCausalLM(LlamaForCausalLM):
    """:class:`LlamaForCausalLM` with ``model_type="qwen2"`` by default (bias on q/k/v)."""

    default_model_type = "qwen2"
