"""GPT-2: transformers' ``GPT2Model`` and ``GPT2LMHeadModel`` on genext's attention kernels.

The classes take transformers' ``GPT2Config`` (or a dict of its fields) and load transformers'
``state_dict`` with no renaming. Attention never materialises an ``(L, L)`` tensor:

- a batch without padding runs :func:`genext.ops.flash_attention` (causal, ``(B, L, H, D)``) on
  strided views of the fused ``c_attn`` output;
- a batch with padding (on either side, or holes) is packed to its real tokens once, after the
  embedding, and every layer runs :func:`genext.ops.flash_attention_varlen` on the packed tokens:
  no compute is spent on padding (an all-padding batch gives zero logits and a NaN loss: no
  token counts);
- a batch without ``attention_mask`` whose ``position_ids`` restart inside a row (``[0, 1, 2, 0,
  1, 2, 3, 4]``, transformers' ``DataCollatorWithFlattening``) holds several sequences per row:
  each run of consecutive positions attends only to itself (block-diagonal causal, the varlen
  kernel), as transformers' masks do without a cache (``use_cache=False``, training);
- generation uses the causal-LM protocol shared with genext's Llama: :meth:`kv_cache_spec`,
  :meth:`GPT2LMHeadModel.forward_packed` (a prefill that fills one :class:`genext.KVCache` per
  layer) and :meth:`GPT2LMHeadModel.forward_decode` (:meth:`genext.KVCache.attend` per layer).

Attention dropout: genext's kernels have none, so in training with ``attn_pdrop > 0`` attention
runs PyTorch's ``scaled_dot_product_attention`` with ``dropout_p`` on the batch's own ``(B, H, L,
L)`` layout with a causal (and padding or packed-sequence) mask, the call transformers' default
"sdpa" implementation makes, so with the same seed the attention dropout masks are the same
(with padding the residual dropouts are drawn over the real tokens only, so those differ unless
``resid_pdrop=0``); set ``attn_pdrop=0`` to train on genext's kernel. Evaluation and
``attn_pdrop == 0`` always run genext.

Positions: GPT-2's learned table ends at ``n_positions``; a position outside it raises a
ValueError naming the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..nn import KVCache
from ..ops import flash_attention, flash_attention_varlen
from ._config import ModelOutput, PeerConfigMixin, accepts_config, transformers_config
from ._generation import GenerationMixin
from ._packing import packing_from_positions

__all__ = [
    "BaseModelOutput",
    "CausalLMOutput",
    "Conv1D",
    "GPT2Attention",
    "GPT2Block",
    "GPT2LMHeadModel",
    "GPT2MLP",
    "GPT2Model",
]


class BaseModelOutput(ModelOutput):
    """``last_hidden_state (B, L, n_embd)`` after ``ln_f`` (zeros at padding positions)."""

    _fields = ("last_hidden_state",)


class CausalLMOutput(ModelOutput):
    """``loss`` (scalar, when labels are given) and ``logits (B, L, vocab_size)`` (zeros at
    padding positions)."""

    _fields = ("loss", "logits")


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# transformers' ACT2FN names -> the same function (the tanh forms of GELU, written out in Python
# there, are one formula: PyTorch's fused approximate="tanh" GELU computes it)
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}

# GPT2Config's alternative names (its attribute_map)
_ALIASES = {
    "hidden_size": "n_embd",
    "max_position_embeddings": "n_positions",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}

# fields of a GPT2Config (and of every transformers config) that do not change the computation
# of these classes: dropped without a warning
_UNUSED_PEER_KEYS = frozenset(
    {
        "architectures",
        "chunk_size_feed_forward",
        "dtype",
        "id2label",
        "initializer_range",
        "is_encoder_decoder",
        "label2id",
        "model_type",
        "n_ctx",
        "num_labels",
        "output_attentions",
        "output_hidden_states",
        "problem_type",
        "return_dict",
        "summary_activation",
        "summary_first_dropout",
        "summary_proj_to_labels",
        "summary_type",
        "summary_use_proj",
        "task_specific_params",
        "torch_dtype",
        "transformers_version",
        "use_cache",
    }
)


class Conv1D(nn.Module):
    """transformers' ``Conv1D``: a linear layer whose weight is stored transposed, ``(in, out)``
    (GPT-2's original layout), so checkpoints load unchanged. ``(..., in) -> (..., out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], self.nf)


# The attention of one layer: (q, k, v) as (..., H, D) views -> (..., H, D). Built per call by
# GPT2Model for the batch's layout (dense, packed, decode) and handed to every layer.
AttendFn = Callable[["GPT2Attention", Tensor, Tensor, Tensor], Tensor]


class GPT2Attention(nn.Module):
    """Causal self-attention: ``c_attn`` (fused q, k, v), genext's attention, ``c_proj``.

    ``scaling`` is transformers' softmax scale: ``head_dim ** -0.5`` (1 without
    ``scale_attn_weights``), divided by ``layer_idx + 1`` with
    ``scale_attn_by_inverse_layer_idx``."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        layer_idx: int,
        attn_pdrop: float,
        resid_pdrop: float,
        scale_attn_weights: bool,
        scale_attn_by_inverse_layer_idx: bool,
    ) -> None:
        super().__init__()
        self.num_heads = n_head
        self.head_dim = n_embd // n_head
        self.layer_idx = layer_idx
        self.scaling = self.head_dim**-0.5 if scale_attn_weights else 1.0
        if scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        self.c_attn = Conv1D(3 * n_embd, n_embd)
        self.c_proj = Conv1D(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(attn_pdrop)
        self.resid_dropout = nn.Dropout(resid_pdrop)

    def forward(self, x: Tensor, attend: AttendFn) -> Tensor:
        """``x (..., n_embd)`` -> ``(..., n_embd)``; ``...`` is ``(B, L)`` or ``(T,)`` (packed)."""
        qkv = self.c_attn(x)
        # (..., 3 * C) -> (..., 3, H, D): q, k and v are strided views (last dim contiguous, which
        # is all the kernels need), no copies
        qkv = qkv.unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.unbind(-3)
        out = attend(self, q, k, v)
        out = self.c_proj(out.flatten(-2))
        return self.resid_dropout(out)

    @property
    def dropout_p(self) -> float:
        """The attention dropout in effect now (0 in eval mode)."""
        return self.attn_dropout.p if self.training else 0.0


class GPT2MLP(nn.Module):
    """``c_fc`` -> activation -> ``c_proj`` -> dropout."""

    def __init__(self, n_inner: int, n_embd: int, activation: str, resid_pdrop: float) -> None:
        super().__init__()
        self.c_fc = Conv1D(n_inner, n_embd)
        self.c_proj = Conv1D(n_embd, n_inner)
        self.act = _ACTIVATIONS[activation]
        self.dropout = nn.Dropout(resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        n_inner: int,
        layer_idx: int,
        activation: str,
        eps: float,
        attn_pdrop: float,
        resid_pdrop: float,
        scale_attn_weights: bool,
        scale_attn_by_inverse_layer_idx: bool,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.attn = GPT2Attention(
            n_embd,
            n_head,
            layer_idx,
            attn_pdrop,
            resid_pdrop,
            scale_attn_weights,
            scale_attn_by_inverse_layer_idx,
        )
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.mlp = GPT2MLP(n_inner, n_embd, activation, resid_pdrop)

    def forward(self, x: Tensor, attend: AttendFn) -> Tensor:
        x = x + self.attn(self.ln_1(x), attend)
        return x + self.mlp(self.ln_2(x))


# ---- the attention of each layout --------------------------------------------------------------


def _attend_dense(attn: GPT2Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``(B, L, H, D)`` without padding: genext's causal kernel, or PyTorch's SDPA when attention
    dropout is on (the call transformers' "sdpa" attention makes, so the same RNG draws)."""
    if attn.dropout_p > 0.0:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=attn.dropout_p,
            is_causal=True,
            scale=attn.scaling,
        )
        return out.transpose(1, 2)
    return flash_attention(q, k, v, causal=True, scale=attn.scaling, layout="blhd")


class _Packing:
    """Where B sequences' tokens lie in a packed ``(T, ...)`` tensor: ``cu_seqlens`` int32
    ``(B + 1,)`` on the device, the lengths on the host, and (for a cache prefill or the dropout
    fallback) each token's sequence and offset. ``grid``: when the tokens come from a ``(B, L)``
    batch, their flat indices ``(T,)`` into ``B * L`` and the ``segments (B, L)`` int64 (equal
    within a sequence of a row, -1 at padding), the layout the dropout fallback attends in."""

    def __init__(
        self, cu_seqlens: Tensor, max_seqlen: int, grid: tuple[Tensor, Tensor] | None = None
    ) -> None:
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = int(max_seqlen)
        cu = cu_seqlens.tolist()
        self.lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        self.grid = grid
        self._index: tuple[Tensor, Tensor] | None = None

    def index(self) -> tuple[Tensor, Tensor]:
        """(sequence, offset within it) of every packed token, int64 ``(T,)`` each."""
        if self._index is None:
            dev = self.cu_seqlens.device
            lengths = torch.tensor(self.lengths, device=dev)
            seq = torch.repeat_interleave(torch.arange(len(self.lengths), device=dev), lengths)
            start = self.cu_seqlens[:-1].long()[seq]
            self._index = seq, torch.arange(seq.numel(), device=dev) - start
        return self._index

    def pad(self, x: Tensor) -> Tensor:
        """``(T, H, D)`` -> ``(B, max length, H, D)``, zeros after each sequence's end."""
        seq, off = self.index()
        out = x.new_zeros(len(self.lengths), max(self.lengths, default=0), *x.shape[1:])
        out[seq, off] = x
        return out

    def dropout_attention(self, attn: GPT2Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """PyTorch's SDPA with attention dropout on packed ``(T, H, D)`` tokens, per batch row
        (never a ``(T, T)`` mask): in the ``(B, L)`` grid they came from, causal within each
        sequence, as transformers' "sdpa" attention draws its dropout; or, for sequences packed
        by the caller, each padded to the longest."""
        if self.grid is not None:
            flat, segments = self.grid
            b, n = segments.shape
            same = segments[:, :, None] == segments[:, None, :]
            # a pad row sees the pads up to it (segment -1): finite, and thrown away
            causal = torch.ones(n, n, dtype=torch.bool, device=flat.device).tril()
            mask = (same & causal)[:, None]

            def spread(t: Tensor) -> Tensor:
                out = t.new_zeros(b * n, *t.shape[1:]).index_copy(0, flat, t)
                return out.view(b, n, *t.shape[1:]).transpose(1, 2)

            def gather(o: Tensor) -> Tensor:
                return o.transpose(1, 2).flatten(0, 1)[flat]

        else:
            seq, off = self.index()
            n = max(self.lengths, default=0)
            lengths = torch.tensor(self.lengths, device=seq.device)
            keys = torch.arange(n, device=seq.device)
            causal = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril()
            mask = (causal & (keys < lengths[:, None, None]))[:, None]

            def spread(t: Tensor) -> Tensor:
                return self.pad(t).transpose(1, 2)

            def gather(o: Tensor) -> Tensor:
                return o.transpose(1, 2)[seq, off]

        out = F.scaled_dot_product_attention(
            spread(q),
            spread(k),
            spread(v),
            attn_mask=mask,
            dropout_p=attn.dropout_p,
            scale=attn.scaling,
        )
        return gather(out)


def _packed_attention(packing: _Packing, caches: list[KVCache] | None) -> AttendFn:
    """The attention of packed ``(T, H, D)`` tokens: genext's varlen kernel (or PyTorch's SDPA
    per batch row when attention dropout is on); with caches, each layer's keys and values
    become its cache's content."""

    def attend(attn: GPT2Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if caches is not None:
            with torch.no_grad():
                caches[attn.layer_idx].prefill(
                    packing.pad(k.detach()), packing.pad(v.detach()), packing.lengths
                )
        if attn.dropout_p > 0.0:
            return packing.dropout_attention(attn, q, k, v)
        cu, n = packing.cu_seqlens, packing.max_seqlen
        return flash_attention_varlen(q, k, v, cu, cu, n, n, causal=True, scale=attn.scaling)

    return attend


def _decode_attention(caches: list[KVCache]) -> AttendFn:
    def attend(attn: GPT2Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return caches[attn.layer_idx].attend(q, k, v, causal=True, scale=attn.scaling)

    return attend


# ---- config handling ---------------------------------------------------------------------------


def _peer_fields(config: Any) -> dict[str, Any]:
    """A transformers ``PretrainedConfig`` or a mapping of its fields -> a dict with GPT2Config's
    canonical names, less the fields that do not affect the computation."""
    if not isinstance(config, Mapping):
        if not callable(getattr(config, "to_dict", None)):
            raise TypeError(
                "config must be a transformers GPT2Config or a mapping of its fields, got "
                f"{type(config).__name__}"
            )
        config = config.to_dict()
    out = {}
    for k, v in config.items():
        k = _ALIASES.get(k, k)
        if k not in _UNUSED_PEER_KEYS:
            out[k] = v
    return out


def _check_fields(
    n_embd: int,
    n_head: int,
    activation_function: str,
    add_cross_attention: bool,
) -> None:
    if n_embd % n_head != 0:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    if activation_function not in _ACTIVATIONS:
        raise ValueError(
            f"activation_function {activation_function!r} is not supported; supported: "
            f"{sorted(_ACTIVATIONS)}"
        )
    if add_cross_attention:
        raise NotImplementedError(
            "add_cross_attention=True (GPT-2 as a decoder over encoder states) is not supported"
        )


def _strip_buffers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # older transformers versions stored the causal mask (attn.bias) and attn.masked_bias as
    # buffers in the checkpoint; the masks are not state here
    return {
        k: v
        for k, v in state.items()
        if not (k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"))
    }


class _GPT2ConfigMixin(PeerConfigMixin):
    """Construction from transformers' config objects as well as mappings (``from_config`` and
    ``Cls(config)``), and transformers' on-disk layout for ``save_pretrained``."""

    _weights_name = "model"  # save_pretrained writes transformers' model.safetensors

    @classmethod
    def _fields_of(cls, config: Any, overrides: Mapping[str, Any]) -> dict:
        return cls._config_kwargs(_peer_fields(config), _peer_fields(overrides))

    @classmethod
    def from_config(cls, config: Any, **overrides: Any):
        """A model with random weights from a transformers ``GPT2Config`` (or any
        ``PretrainedConfig`` of GPT-2's fields) or a dict of them (``config.json``'s content,
        ``model.config``); ``overrides`` replace single fields. Fields that do not change the
        computation (``initializer_range``, ``summary_*``, ``use_cache``, ...) are ignored. The
        same as ``cls(config, **overrides)``."""
        return cls(**cls._fields_of(config, overrides))

    def _saved_config(self) -> dict[str, Any]:
        return transformers_config(self.config, "gpt2", type(self).__name__, self.dtype)


# ---- the models --------------------------------------------------------------------------------


class GPT2Model(_GPT2ConfigMixin, nn.Module):
    """transformers' ``GPT2Model``: token and position embeddings, ``n_layer`` blocks, ``ln_f``.

    Args (GPT2Config's fields; build from a config as transformers does, ``GPT2Model(config)``
    with a ``GPT2Config`` or a dict of its fields and keyword overrides, or :meth:`from_config`):
        vocab_size, n_positions, n_embd, n_layer, n_head: sizes.
        n_inner: the MLP's width (``4 * n_embd`` when None).
        activation_function: transformers' name (``gelu_new``, ``gelu``, ``relu``, ``silu``, ...).
        resid_pdrop, embd_pdrop, attn_pdrop: dropout in training (see the module docstring for
            attention dropout).
        layer_norm_epsilon: of every LayerNorm.
        scale_attn_weights, scale_attn_by_inverse_layer_idx: the softmax scale, as transformers.
        reorder_and_upcast_attn: accepted and without effect: it asks transformers' eager
            attention to compute the scores and softmax in float32 for half-precision training,
            which genext's kernels always do (fp32 accumulation, the scale folded into the
            scores), so the results agree up to rounding.
        add_cross_attention: must be False (not supported).
        tie_word_embeddings, bos_token_id, eos_token_id, pad_token_id: used by
            :class:`GPT2LMHeadModel` and by generation; recorded here too.
    """

    @accepts_config
    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        n_inner: int | None = None,
        activation_function: str = "gelu_new",
        resid_pdrop: float = 0.1,
        embd_pdrop: float = 0.1,
        attn_pdrop: float = 0.1,
        layer_norm_epsilon: float = 1e-5,
        scale_attn_weights: bool = True,
        scale_attn_by_inverse_layer_idx: bool = False,
        reorder_and_upcast_attn: bool = False,
        add_cross_attention: bool = False,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = 50256,
        eos_token_id: int | list[int] | None = 50256,
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__()
        self._record_config(locals_without_self(locals()))
        _check_fields(n_embd, n_head, activation_function, add_cross_attention)
        self.embed_dim = n_embd
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.drop = nn.Dropout(embd_pdrop)
        inner = n_inner if n_inner is not None else 4 * n_embd
        self.h = nn.ModuleList(
            GPT2Block(
                n_embd,
                n_head,
                inner,
                i,
                activation_function,
                layer_norm_epsilon,
                attn_pdrop,
                resid_pdrop,
                scale_attn_weights,
                scale_attn_by_inverse_layer_idx,
            )
            for i in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, eps=layer_norm_epsilon)
        self.gradient_checkpointing = False
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)

    def kv_cache_spec(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim): one :class:`genext.KVCache` per layer."""
        return len(self.h), self.config.n_head, self.embed_dim // self.config.n_head

    # ---- pieces shared by the layouts ----

    def embed(
        self, input_ids: Tensor | None, position_ids: Tensor, inputs_embeds: Tensor | None
    ) -> Tensor:
        """Token plus position embeddings, then ``drop``: ``(..., n_embd)`` for ids ``(...)``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        self._check_positions(position_ids)
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        return self.drop(x + self.wpe(position_ids))

    def _check_positions(self, position_ids: Tensor) -> None:
        """A clear error for positions outside the learned table (instead of an index error,
        or a device assert on CUDA). Skipped while a CUDA graph is captured (no host reads
        there; generation checks its longest sequence beforehand)."""
        if position_ids.numel() == 0:
            return
        if position_ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        lo, hi = torch.aminmax(position_ids)
        lo, hi, limit = int(lo), int(hi), self.config.n_positions
        if lo < 0 or hi >= limit:
            raise ValueError(
                f"position_ids must lie in [0, n_positions = {limit}) (GPT-2's learned position "
                f"table), got positions from {lo} to {hi}"
            )

    def run_blocks(self, x: Tensor, attend: AttendFn) -> Tensor:
        """The blocks and ``ln_f`` on ``(..., n_embd)``, each layer's attention by ``attend``."""
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.h:
            x = checkpoint(block, x, attend, use_reentrant=False) if ckpt else block(x, attend)
        return self.ln_f(x)

    def _hidden(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        inputs_embeds: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """(hidden states, packed index) for a (B, L) batch: ``(B, L, C)`` and None without
        padding; ``(T, C)`` for the real tokens and their flat indices into ``B * L`` with."""
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if ref.dim() < 2:
            name = "input_ids" if input_ids is not None else "inputs_embeds"
            raise ValueError(f"{name} must be batched, (B, L[, C]), got shape {tuple(ref.shape)}")
        b, n = ref.shape[:2]
        by_positions = None
        if position_ids is None:
            # transformers' forward: arange(L) in every row, pads included
            position_ids = torch.arange(n, device=ref.device).unsqueeze(0)
        elif attention_mask is None:
            # several sequences per row, told apart by restarting positions
            by_positions = packing_from_positions(position_ids.expand(b, n))
        x = self.embed(input_ids, position_ids, inputs_embeds)
        if by_positions is not None:
            flat = torch.arange(b * n, device=x.device)
            packing = _Packing(
                by_positions.cu_seqlens, by_positions.max_seqlen, (flat, by_positions.segments)
            )
            h = self.run_blocks(x.flatten(0, 1), _packed_attention(packing, None))
            return h.unflatten(0, (b, n)), None, (b, n)
        if attention_mask is not None:
            if attention_mask.shape != (b, n):
                raise ValueError(
                    f"attention_mask must be (B, L) = {(b, n)}, got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.bool()
            if not bool(mask.all()):
                lengths = mask.sum(1, dtype=torch.int32)
                cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
                flat = mask.flatten().nonzero().squeeze(1)
                segments = mask.long() - 1  # 0 for tokens, -1 for padding
                packing = _Packing(cu, int(lengths.max()), (flat, segments))
                h = self.run_blocks(x.flatten(0, 1)[flat], _packed_attention(packing, None))
                return h, flat, (b, n)
        return self.run_blocks(x, _attend_dense), None, (b, n)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> BaseModelOutput:
        """``input_ids (B, L)`` int64 or ``inputs_embeds (B, L, n_embd)``; ``attention_mask
        (B, L)`` (1 = token, 0 = padding, anywhere); ``position_ids (B, L)`` (default
        ``arange(L)`` in every row, padding included, as transformers' forward; without a mask,
        positions that restart inside a row mark packed sequences, each attending only to
        itself: a position that is not the previous one + 1 starts a sequence). Returns
        ``last_hidden_state (B, L, n_embd)``, zeros at padding positions (which are skipped)."""
        h, flat, (b, n) = self._hidden(input_ids, attention_mask, position_ids, inputs_embeds)
        return BaseModelOutput(last_hidden_state=_unpack(h, flat, b, n))

    @classmethod
    def _convert_legacy_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A GPT2LMHeadModel checkpoint (``transformer.`` prefix, ``lm_head``) loads too; old
        mask buffers are dropped."""
        state = _strip_buffers(state)
        if any(k.startswith("transformer.") for k in state):
            state = {
                k[len("transformer.") :]: v
                for k, v in state.items()
                if k.startswith("transformer.")
            }
        return state


def _unpack(h: Tensor, flat: Tensor | None, b: int, n: int) -> Tensor:
    """Packed ``(T, C)`` rows back to ``(B, L, C)`` with zeros at the other positions."""
    if flat is None:
        return h
    out = h.new_zeros(b * n, h.shape[-1])
    return out.index_copy(0, flat, h).view(b, n, -1)


def locals_without_self(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in ("self", "__class__")}


class GPT2LMHeadModel(_GPT2ConfigMixin, GenerationMixin, nn.Module):
    """transformers' ``GPT2LMHeadModel``: :class:`GPT2Model` as ``transformer`` and ``lm_head``,
    tied to ``transformer.wte`` (unless ``tie_word_embeddings=False``). The ``state_dict`` holds
    both keys, as transformers'; a checkpoint without ``lm_head.weight`` (transformers saves tied
    weights once) or with ``GPT2Model``'s keys loads too. Args as :class:`GPT2Model`.

    Besides ``forward`` it has the causal-LM protocol of genext's generation:
    :meth:`kv_cache_spec`, :meth:`forward_packed`, :meth:`forward_decode`.
    """

    @accepts_config
    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        n_inner: int | None = None,
        activation_function: str = "gelu_new",
        resid_pdrop: float = 0.1,
        embd_pdrop: float = 0.1,
        attn_pdrop: float = 0.1,
        layer_norm_epsilon: float = 1e-5,
        scale_attn_weights: bool = True,
        scale_attn_by_inverse_layer_idx: bool = False,
        reorder_and_upcast_attn: bool = False,
        add_cross_attention: bool = False,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = 50256,
        eos_token_id: int | list[int] | None = 50256,
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__()
        fields = locals_without_self(locals())
        self._record_config(fields)
        self.transformer = GPT2Model(**fields)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def kv_cache_spec(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim): one :class:`genext.KVCache` per layer."""
        return self.transformer.kv_cache_spec()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> CausalLMOutput:
        """As :meth:`GPT2Model.forward`, then ``lm_head``: ``logits (B, L, vocab_size)`` (zeros
        at padding positions, which are skipped).

        ``labels (B, L)`` int64: the loss is transformers' shifted cross-entropy (the logits at
        position i predict ``labels[:, i + 1]``; -100 is ignored), averaged over the counted
        tokens, in the logits' dtype or float32, whichever is wider (transformers computes it in
        float32 also for float64 logits). A prediction made at a padding position is left out:
        its logits are not computed (transformers computes them from an attention row with no
        key to see, which carries no meaning). Where every label a padding position would predict
        is -100 (the pads' labels and, with left padding, each row's first real token), the loss
        is transformers'."""
        tr = self.transformer
        h, flat, (b, n) = tr._hidden(input_ids, attention_mask, position_ids, inputs_embeds)
        logits = _unpack(self.lm_head(h), flat, b, n)
        loss = None
        if labels is not None:
            if labels.shape != (b, n):
                raise ValueError(f"labels must be (B, L) = {(b, n)}, got {tuple(labels.shape)}")
            target = F.pad(labels, (0, 1), value=-100)[:, 1:]
            if flat is not None:
                target = target.masked_fill(~attention_mask.bool(), -100)
            dtype = torch.promote_types(logits.dtype, torch.float32)
            loss = F.cross_entropy(
                logits.to(dtype).flatten(0, 1), target.flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def forward_packed(
        self,
        input_ids: Tensor | None,
        position_ids: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        caches: list[KVCache] | None = None,
        inputs_embeds: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """The logits ``(T, vocab_size)`` of B sequences packed without padding (with
        ``last_only``, ``(B, vocab_size)``: each sequence's last token only, all a prefill needs).

        Args:
            input_ids: ``(T,)`` int64, sequence b's tokens at ``cu_seqlens[b]:cu_seqlens[b + 1]``
                (or None with ``inputs_embeds (T, n_embd)``).
            position_ids: ``(T,)`` int64, each token's position (0, 1, ... within its sequence
                for a prompt).
            cu_seqlens: int32 ``(B + 1,)`` on the model's device, from 0.
            max_seqlen: a bound on the lengths.
            caches: one :class:`genext.KVCache` per layer (``kv_cache_spec()``), B sequences
                each: a prefill, after which sequence b's cached keys/values are its tokens'.
        """
        if position_ids.dim() != 1:
            raise ValueError(f"position_ids must be (T,), got shape {tuple(position_ids.shape)}")
        self._check_caches(caches)
        tr = self.transformer
        x = tr.embed(input_ids, position_ids, inputs_embeds)
        h = tr.run_blocks(x, _packed_attention(_Packing(cu_seqlens, max_seqlen), caches))
        return self.lm_head(h[cu_seqlens[1:].long() - 1] if last_only else h)

    def forward_decode(
        self,
        input_ids: Tensor | None,
        position_ids: Tensor,
        caches: list[KVCache],
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """The logits ``(B, Lq, vocab_size)`` of ``input_ids (B, Lq)`` (usually Lq = 1) at
        ``position_ids (B, Lq)``, attending over each layer's cache, which they are appended
        to (:meth:`genext.KVCache.attend`). No gradient flows through the cache."""
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be (B, Lq), got shape {tuple(position_ids.shape)}")
        if caches is None:
            raise ValueError("forward_decode needs caches (one genext.KVCache per layer)")
        self._check_caches(caches)
        tr = self.transformer
        x = tr.embed(input_ids, position_ids, inputs_embeds)
        return self.lm_head(tr.run_blocks(x, _decode_attention(caches)))

    def _check_generate(self, max_length: int, cuda_graph: bool) -> None:
        """Called by generation before the prefill with the longest sequence it may build:
        GPT-2's learned positions end at ``n_positions``. (Decode steps are CUDA-graph safe:
        embedding lookups and :meth:`genext.KVCache.attend`, no host reads.)"""
        if max_length > self.config.n_positions:
            raise ValueError(
                f"generate: sequences of up to {max_length} tokens need positions past "
                f"n_positions = {self.config.n_positions} (GPT-2's learned position table)"
            )

    def _check_caches(self, caches: list[KVCache] | None) -> None:
        if caches is None:
            return
        n, hk, d = self.kv_cache_spec()
        if len(caches) != n:
            raise ValueError(f"caches must hold one KVCache per layer ({n}), got {len(caches)}")
        c = caches[0]
        if (c.num_kv_heads, c.head_dim) != (hk, d):
            raise ValueError(
                f"caches must have num_kv_heads={hk} and head_dim={d}, got "
                f"{c.num_kv_heads} and {c.head_dim}"
            )

    @classmethod
    def _convert_legacy_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """transformers' checkpoint variants: ``GPT2Model``'s keys (no ``transformer.``
        prefix, as the original GPT-2 checkpoints), old mask buffers (dropped), and no
        ``lm_head.weight`` when it is tied (transformers saves a tied weight once)."""
        state = _strip_buffers(state)
        if not any(k.startswith("transformer.") for k in state):
            state = {
                (k if k == "lm_head.weight" else f"transformer.{k}"): v for k, v in state.items()
            }
        if "lm_head.weight" not in state and "transformer.wte.weight" in state:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        return state
