"""Transformer blocks with diffusers' module names and ``state_dict`` keys
(``diffusers.models.attention``): the feed-forward, adaLN-Zero and ``BasicTransformerBlock`` in
the two configurations genext's models use, Stable Diffusion's (``norm_type="layer_norm"``:
self-attention, cross-attention, feed-forward) and DiT's (``norm_type="ada_norm_zero"``:
timestep- and class-modulated norms with gates). Attention is genext's :class:`Attention`
(genext's flash-attention kernel where it serves the shapes).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._blocks import Attention
from ._embeddings import CombinedTimestepLabelEmbeddings

__all__ = ["AdaLayerNormZero", "BasicTransformerBlock", "FeedForward", "GEGLU", "GELU"]


class GELU(nn.Module):
    """``gelu(proj(x))`` (``approximate="tanh"`` for the tanh form); key ``proj``."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class GEGLU(nn.Module):
    """Gated GELU: ``proj`` to twice ``dim_out``, then ``a * gelu(gate)`` of its two halves."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class ApproximateGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` of ``proj(x)`` (diffusers' ``"geglu-approximate"``)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return x * (1.702 * x).sigmoid()


_FF_ACTIVATIONS = ("gelu", "gelu-approximate", "geglu", "geglu-approximate")


class FeedForward(nn.Module):
    """diffusers' ``FeedForward``: ``net.0`` (projection in with its activation: GEGLU by
    default), ``net.1`` dropout, ``net.2`` projection out (``net.3`` a final dropout with
    ``final_dropout``). ``(..., dim)`` -> ``(..., dim_out or dim)``; hidden width
    ``inner_dim or dim * mult``."""

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        mult: int = 4,
        dropout: float = 0.0,
        activation_fn: str = "geglu",
        final_dropout: bool = False,
        inner_dim: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        inner = int(dim * mult) if inner_dim is None else inner_dim
        if activation_fn == "gelu":
            act: nn.Module = GELU(dim, inner, bias=bias)
        elif activation_fn == "gelu-approximate":
            act = GELU(dim, inner, approximate="tanh", bias=bias)
        elif activation_fn == "geglu":
            act = GEGLU(dim, inner, bias=bias)
        elif activation_fn == "geglu-approximate":
            act = ApproximateGELU(dim, inner, bias=bias)
        else:
            raise NotImplementedError(
                f"FeedForward: activation_fn must be one of {_FF_ACTIVATIONS}, got {activation_fn!r}"
            )
        layers = [act, nn.Dropout(dropout), nn.Linear(inner, dim_out or dim, bias=bias)]
        if final_dropout:
            layers.append(nn.Dropout(dropout))
        self.net = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class AdaLayerNormZero(nn.Module):
    """diffusers' ``AdaLayerNormZero`` (adaLN-Zero of DiT): from the conditioning ``emb``
    (``CombinedTimestepLabelEmbeddings`` of ``timestep`` and ``class_labels`` when
    ``num_embeddings`` is given), ``linear(silu(emb))`` gives six ``(B, dim)`` chunks: shift,
    scale and gate for the attention and for the feed-forward. ``x (B, L, dim)`` ->
    ``(norm(x) * (1 + scale) + shift, gate_msa, shift_mlp, scale_mlp, gate_mlp)``; the norm is
    an affine-free LayerNorm with eps 1e-6."""

    def __init__(
        self,
        embedding_dim: int,
        num_embeddings: int | None = None,
        norm_type: str = "layer_norm",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if norm_type != "layer_norm":
            raise NotImplementedError(
                f"AdaLayerNormZero: norm_type must be 'layer_norm', got {norm_type!r}"
            )
        self.emb = (
            CombinedTimestepLabelEmbeddings(num_embeddings, embedding_dim)
            if num_embeddings is not None
            else None
        )
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, 6 * embedding_dim, bias=bias)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False, eps=1e-6)

    def forward(
        self,
        x: Tensor,
        timestep: Tensor | None = None,
        class_labels: Tensor | None = None,
        hidden_dtype=None,
        emb: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        if self.emb is not None:
            emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
        if emb is None:
            raise ValueError("AdaLayerNormZero: emb is required when num_embeddings is None")
        chunks = self.linear(self.silu(emb)).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


_NORM_TYPES = ("layer_norm", "ada_norm_zero")


class BasicTransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock``: pre-norm self-attention (``norm1``, ``attn1``),
    cross-attention (``norm2``, ``attn2``; present with ``cross_attention_dim`` or
    ``double_self_attention``) and feed-forward (``norm3``, ``ff``), each added to the residual.

    ``norm_type="layer_norm"`` is Stable Diffusion's block; ``"ada_norm_zero"`` is DiT's, where
    ``norm1`` is :class:`AdaLayerNormZero` over ``num_embeds_ada_norm`` classes and the attention
    and feed-forward outputs are gated. ``only_cross_attention`` makes ``attn1`` attend to the
    encoder states too; ``double_self_attention`` makes ``attn2`` a self-attention.
    ``upcast_attention`` is accepted and has no effect (the attention kernels accumulate in
    float32 already).

    ``hidden_states (B, L, dim)``, ``encoder_hidden_states (B, Lk, cross_attention_dim)``;
    ``attention_mask`` / ``encoder_attention_mask`` as :class:`Attention` takes them (boolean,
    True = attend, or additive; ``(B, Lk)`` or ``(B, 1 or Lq, Lk)``) -> ``(B, L, dim)``.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        cross_attention_dim: int | None = None,
        activation_fn: str = "geglu",
        num_embeds_ada_norm: int | None = None,
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_type: str = "layer_norm",
        norm_eps: float = 1e-5,
        final_dropout: bool = False,
        attention_type: str = "default",
        positional_embeddings: str | None = None,
        num_positional_embeddings: int | None = None,
        ff_inner_dim: int | None = None,
        ff_bias: bool = True,
        attention_out_bias: bool = True,
    ) -> None:
        super().__init__()
        del upcast_attention, num_positional_embeddings
        if norm_type not in _NORM_TYPES:
            raise NotImplementedError(
                f"BasicTransformerBlock: norm_type must be one of {_NORM_TYPES}, got {norm_type!r}"
            )
        if attention_type != "default":
            raise NotImplementedError(
                f"BasicTransformerBlock: attention_type must be 'default', got {attention_type!r}"
            )
        if positional_embeddings is not None:
            raise NotImplementedError(
                "BasicTransformerBlock: positional_embeddings is not supported, got "
                f"{positional_embeddings!r}"
            )
        if norm_type == "ada_norm_zero" and num_embeds_ada_norm is None:
            raise ValueError(
                "BasicTransformerBlock: norm_type 'ada_norm_zero' needs num_embeds_ada_norm"
            )
        self.norm_type = norm_type
        self.only_cross_attention = only_cross_attention

        def attention(context_dim: int | None) -> Attention:
            return Attention(
                dim,
                cross_attention_dim=context_dim,
                heads=num_attention_heads,
                dim_head=attention_head_dim,
                dropout=dropout,
                bias=attention_bias,
                out_bias=attention_out_bias,
            )

        if norm_type == "ada_norm_zero":
            self.norm1: nn.Module = AdaLayerNormZero(dim, num_embeds_ada_norm)
        else:
            self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = attention(cross_attention_dim if only_cross_attention else None)
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
            self.attn2 = attention(None if double_self_attention else cross_attention_dim)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(
            dim,
            dropout=dropout,
            activation_fn=activation_fn,
            final_dropout=final_dropout,
            inner_dim=ff_inner_dim,
            bias=ff_bias,
        )

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        timestep: Tensor | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        x = hidden_states
        ada = self.norm_type == "ada_norm_zero"
        if ada:
            h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
                x, timestep, class_labels, hidden_dtype=x.dtype
            )
        else:
            h = self.norm1(x)
        h = self.attn1(
            h,
            encoder_hidden_states if self.only_cross_attention else None,
            attention_mask=attention_mask,
        )
        x = x + (gate_msa[:, None] * h if ada else h)
        if self.attn2 is not None:
            h = self.attn2(
                self.norm2(x), encoder_hidden_states, attention_mask=encoder_attention_mask
            )
            x = x + h
        h = self.norm3(x)
        if ada:
            h = h * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        h = self.ff(h)
        return x + (gate_mlp[:, None] * h if ada else h)
