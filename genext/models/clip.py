"""CLIP: transformers' ``CLIPModel`` (a ViT image tower and a causal text tower projected into one
embedding space) on genext's flash-attention kernels, plus conversion from open_clip and
zero-shot classification helpers.

The classes take transformers' configs (``CLIPConfig``, ``CLIPTextConfig``, ``CLIPVisionConfig``,
or dicts with their fields) and load transformers' ``state_dict`` with ``strict=True`` and no
renaming. transformers keeps ``position_ids`` as non-persistent buffers, so they are not in its
state dict; here positions are plain ``arange``s and older checkpoints' ``position_ids`` entries
are dropped on load, as are the ``text_model.`` / ``vision_model.`` prefixes that checkpoints of
the standalone towers carry from transformers 4. A standalone tower's ``from_pretrained`` also
reads a whole ``CLIPModel`` folder (its tower's config and weights), as transformers' does.
``save_pretrained`` writes transformers' layout (``config.json`` with ``model_type``,
``model.safetensors``).

Attention: the vision tower runs genext's flash attention (no mask); the text tower runs it
causal, and with a padding ``attention_mask`` it runs genext's varlen kernel on the real tokens
only (packed without the pads). A real token then sees exactly the real tokens before it, as in
transformers; the outputs at padded positions are not transformers' (its pad rows attend to the
real tokens before them; here their attention output is zero, as in a row of pads only) and
mean nothing in either. Where genext does not serve a shape or dtype, or attention dropout is
active, PyTorch's SDPA runs, with the same zero attention output at the pads.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..losses import ClipLoss
from ..nn.functional import scaled_dot_product_attention, sdpa_backend
from ..ops import flash_attention_varlen
from ._config import FrozenConfig, ModelOutput, PeerConfigMixin, transformers_config

__all__ = [
    "CLIPModel",
    "CLIPOutput",
    "CLIPTextModel",
    "CLIPTextModelOutput",
    "CLIPTextModelWithProjection",
    "CLIPTowerOutput",
    "CLIPVisionModel",
    "CLIPVisionModelOutput",
    "CLIPVisionModelWithProjection",
    "zero_shot_classifier",
    "zero_shot_logits",
    "zero_shot_predict",
]

# transformers' defaults (CLIPTextConfig, CLIPVisionConfig: the ViT-B/32 shapes); a tower config
# takes these fields and ignores the others (generic PretrainedConfig keys, initializer ranges)
_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    projection_dim=512,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    pad_token_id=1,
    bos_token_id=49406,
    eos_token_id=49407,
)
_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=512,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
)
_ACTIVATIONS = ("quick_gelu", "gelu")


def _as_dict(config: Any, name: str) -> dict[str, Any]:
    """A config as a plain dict: a mapping, or a transformers ``PretrainedConfig`` (its
    ``to_dict()``); None is empty."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise TypeError(f"{name} must be a dict or a transformers config, got {type(config).__name__}")


def _square(value: Any, field: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"vision_config.{field}: only square sizes are supported, got {value}")
        value = value[0]
    return int(value)


def _warn_unknown(overrides: Mapping[str, Any], known: Any, cls_name: str) -> None:
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        warnings.warn(f"{cls_name}: ignoring unknown config fields {unknown}", stacklevel=4)


def _tower_config(
    config: Any, overrides: Mapping[str, Any], defaults: Mapping[str, Any], name: str
) -> FrozenConfig:
    _warn_unknown(overrides, defaults, name)
    values = {**_as_dict(config, name), **overrides}
    out = {k: values.get(k, v) for k, v in defaults.items()}
    if out["hidden_act"] not in _ACTIVATIONS:
        raise ValueError(
            f"{name}.hidden_act: {out['hidden_act']!r} is not supported (only {_ACTIVATIONS})"
        )
    if out["hidden_size"] % out["num_attention_heads"] != 0:
        raise ValueError(
            f"{name}: hidden_size {out['hidden_size']} is not a multiple of "
            f"num_attention_heads {out['num_attention_heads']}"
        )
    if "eos_token_id" in out and not isinstance(out["eos_token_id"], int):
        raise ValueError(
            f"{name}.eos_token_id must be one int (the pooled token), got {out['eos_token_id']!r}"
        )
    if "image_size" in out:
        out["image_size"] = _square(out["image_size"], "image_size")
        out["patch_size"] = _square(out["patch_size"], "patch_size")
    return FrozenConfig(out)


class CLIPTowerOutput(ModelOutput):
    """A tower's output: ``last_hidden_state (B, L, C)``; ``pooler_output (B, C)`` (the text
    tower's EOS token after ``final_layer_norm``, the vision tower's CLS token after
    ``post_layernorm``; not projected); ``hidden_states`` (with ``output_hidden_states``: the
    encoder's input, then every layer's output, ``num_hidden_layers + 1`` tensors of
    ``(B, L, C)``)."""

    _fields = ("last_hidden_state", "pooler_output", "hidden_states")


class CLIPTextModelOutput(ModelOutput):
    """``text_embeds (B, P)`` (projected, not normalised), ``last_hidden_state``,
    ``hidden_states``."""

    _fields = ("text_embeds", "last_hidden_state", "hidden_states")


class CLIPVisionModelOutput(ModelOutput):
    """``image_embeds (B, P)`` (projected, not normalised), ``last_hidden_state``,
    ``hidden_states``."""

    _fields = ("image_embeds", "last_hidden_state", "hidden_states")


class CLIPOutput(ModelOutput):
    """``loss`` (with ``return_loss``), ``logits_per_image (Bi, Bt)``, ``logits_per_text
    (Bt, Bi)``, ``text_embeds (Bt, P)`` and ``image_embeds (Bi, P)`` (L2-normalised), and the
    towers' :class:`CLIPTowerOutput` (``text_model_output``, ``vision_model_output``)."""

    _fields = (
        "loss",
        "logits_per_image",
        "logits_per_text",
        "text_embeds",
        "image_embeds",
        "text_model_output",
        "vision_model_output",
    )


class _Packing(NamedTuple):
    """Where a padded text batch's real tokens are: ``keep (B, L)`` bool, ``index (N,)`` their
    rows in the flattened ``(B * L)`` batch, ``cu_seqlens (B + 1,)`` int32 and the longest
    sequence, as :func:`genext.ops.flash_attention_varlen` takes them."""

    keep: Tensor
    index: Tensor
    cu_seqlens: Tensor
    max_len: int


def _packing(attention_mask: Tensor | None, input_shape: torch.Size) -> _Packing | None:
    """The packing of ``attention_mask`` (B, L) (1 = real token, 0 = pad), None without pads."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {tuple(input_shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    keep = attention_mask.reshape(-1, input_shape[-1]).bool()
    if bool(keep.all()):
        return None
    lengths = keep.sum(dim=1)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    index = keep.flatten().nonzero().squeeze(1)
    return _Packing(keep, index, cu, int(lengths.max()))


class CLIPAttention(nn.Module):
    """Multi-head self-attention with transformers' ``q_proj``/``k_proj``/``v_proj``/``out_proj``.
    ``(B, L, C) -> (B, L, C)``; ``causal`` for the text tower, ``packing`` for its pads."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, causal: bool = False, packing: _Packing | None = None) -> Tensor:
        b, n, c = x.shape
        shape = (b, n, self.heads, self.head_dim)
        q, k, v = (p(x).view(shape) for p in (self.q_proj, self.k_proj, self.v_proj))
        p = self.dropout if self.training else 0.0
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if (
            packing is not None
            and p == 0.0
            and sdpa_backend(qt, kt, vt, is_causal=True) == "genext"
        ):
            out = self._varlen(q, k, v, packing)
        else:
            mask = None
            if packing is not None:
                # causal and key padding; a pad row sees itself too (no row without a key: no
                # NaN), and its output is zeroed below, as the varlen path leaves it
                tril = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
                eye = torch.eye(n, dtype=torch.bool, device=x.device)
                mask = ((tril & packing.keep[:, None, None, :]) | eye).reshape(b, 1, n, n)
            out = scaled_dot_product_attention(
                qt,
                kt,
                vt,
                attn_mask=mask,
                dropout_p=p,
                is_causal=causal and mask is None,
                scale=self.scale,
            ).transpose(1, 2)
            if packing is not None:
                out = out * packing.keep.view(b, n, 1, 1).to(out.dtype)
        return self.out_proj(out.reshape(b, n, c))

    def _varlen(self, q: Tensor, k: Tensor, v: Tensor, packing: _Packing) -> Tensor:
        """Causal attention over the real tokens only: ``(B, L, H, D)`` in and out, zeros at
        the pads."""
        b, n, h, d = q.shape
        rows = [t.reshape(b * n, h, d).index_select(0, packing.index) for t in (q, k, v)]
        cu, m = packing.cu_seqlens, packing.max_len
        out = flash_attention_varlen(*rows, cu, cu, m, m, causal=True, scale=self.scale)
        return out.new_zeros(b * n, h, d).index_copy(0, packing.index, out).view(b, n, h, d)


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))``; ``act`` quick_gelu (``x * sigmoid(1.702 x)``) or exact gelu."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.act == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: ``x + attn(layer_norm1(x))``, then ``x + mlp(layer_norm2(x))``."""

    def __init__(self, config: FrozenConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.self_attn = CLIPAttention(dim, config.num_attention_heads, config.attention_dropout)
        self.layer_norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(dim, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, causal: bool = False, packing: _Packing | None = None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal, packing)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` :class:`CLIPEncoderLayer` s (key ``layers``). Returns the output and,
    with ``output_hidden_states``, the input followed by every layer's output."""

    def __init__(self, config: FrozenConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        x: Tensor,
        causal: bool = False,
        packing: _Packing | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        states = [x] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, causal, packing, use_reentrant=False)
            else:
                x = layer(x, causal, packing)
            if states is not None:
                states.append(x)
        return x, tuple(states) if states is not None else None


class CLIPTextEmbeddings(nn.Module):
    """``token_embedding(ids) + position_embedding(positions)``: ``(B, L) -> (B, L, C)``."""

    def __init__(self, vocab_size: int, max_positions: int, dim: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_positions, dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.01)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        n = input_ids.shape[-1]
        limit = self.position_embedding.num_embeddings
        if n > limit:
            raise ValueError(
                f"input_ids: sequence length {n} exceeds max_position_embeddings {limit}"
            )
        pos = (
            self.position_embedding.weight[:n]
            if position_ids is None
            else self.position_embedding(position_ids)
        )
        return self.token_embedding(input_ids) + pos


class CLIPVisionEmbeddings(nn.Module):
    """Patches (``patch_embedding``, a strided conv without bias) after ``class_embedding``,
    plus ``position_embedding``: ``(B, 3, S, S) -> (B, 1 + (S / patch)^2, C)``."""

    def __init__(self, config: FrozenConfig) -> None:
        super().__init__()
        dim, patch = config.hidden_size, config.patch_size
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.randn(dim) * dim**-0.5)
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding((config.image_size // patch) ** 2 + 1, dim)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, pixel_values: Tensor) -> Tensor:
        b, _, h, w = pixel_values.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"pixel_values: image size {h}x{w} does not match the model's "
                f"{self.image_size}x{self.image_size} (interpolated positions are not supported)"
            )
        w_patch = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w_patch.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


def _peer_key_hook(prefix_name: str) -> Callable[..., None]:
    """A load-state-dict pre-hook that accepts transformers 4's keys of a standalone tower
    (``text_model.*`` / ``vision_model.*``) and drops the ``position_ids`` buffers that older
    checkpoints saved."""

    def hook(module, state_dict, prefix, *args) -> None:
        old = f"{prefix}{prefix_name}."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + key[len(old) :]] = state_dict.pop(key)
        state_dict.pop(f"{prefix}embeddings.position_ids", None)

    return hook


class _CLIPBase(PeerConfigMixin, nn.Module):
    """Config handling shared by the CLIP classes: ``Cls(config, **overrides)`` as transformers'
    ``Cls(config)``, and ``from_config``/``from_pretrained`` through it; ``save_pretrained``
    in transformers' layout.

    A standalone tower (``_tower`` "text" or "vision") reads a whole ``CLIPModel`` folder too:
    the tower's sub-config, and of the weights only its own (``_tower_prefixes``)."""

    _weights_name = "model"  # save_pretrained writes transformers' model.safetensors
    _tower: str | None = None
    _tower_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Any, **overrides: Any):
        """A model with random weights from ``config`` (transformers' config, a dict of its
        fields or ``model.config``), ``overrides`` replacing single fields."""
        return cls(config, **overrides)

    @classmethod
    def _from_saved_config(cls, config: dict[str, Any]):
        sub = f"{cls._tower}_config"
        if cls._tower is not None and isinstance(config.get(sub), Mapping):
            # a CLIPModel's config.json: the tower's part, projected to the model's width (what
            # its text_projection / visual_projection weights have)
            width = config.get("projection_dim")
            config = {**config[sub], **({} if width is None else {"projection_dim": width})}
        return cls.from_config(config)

    @classmethod
    def _convert_legacy_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        # the load hooks rename what needs renaming; a whole CLIPModel's weights (both towers
        # with their prefixes) are cut to this tower's
        if cls._tower is not None and any(k.startswith(f"{cls._tower}_model.") for k in state):
            state = {k: v for k, v in state.items() if k.startswith(cls._tower_prefixes)}
        return state

    def _saved_config(self) -> dict[str, Any]:
        model_type = {"text": "clip_text_model", "vision": "clip_vision_model"}[self._tower]
        return transformers_config(self.config, model_type, type(self).__name__, self.dtype)


class CLIPTextModel(_CLIPBase):
    """transformers' ``CLIPTextModel``: ``embeddings``, causal ``encoder``, ``final_layer_norm``;
    pooled at the EOS token.

    ``forward(input_ids (B, L), attention_mask (B, L) or None, position_ids, output_hidden_states)``
    returns :class:`CLIPTowerOutput`. Pooling is transformers': with the legacy
    ``eos_token_id == 2`` the position of the largest id (CLIP's end token has the largest id),
    otherwise the first position of ``eos_token_id``.
    """

    _tower, _tower_prefixes = "text", ("text_model.",)

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__()
        cfg = _tower_config(config, overrides, _TEXT_DEFAULTS, "text_config")
        nn.Module.__setattr__(self, "config", cfg)
        self.embeddings = CLIPTextEmbeddings(
            cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size
        )
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.register_load_state_dict_pre_hook(_peer_key_hook("text_model"))

    def eos_positions(self, input_ids: Tensor) -> Tensor:
        """The pooled position of each sequence, ``(B, L) -> (B,)``."""
        if self.config.eos_token_id == 2:
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTowerOutput:
        if input_ids is None:
            raise ValueError("CLIPTextModel: input_ids is required")
        input_ids = input_ids.reshape(-1, input_ids.shape[-1])
        packing = _packing(attention_mask, input_ids.shape) if attention_mask is not None else None
        x = self.embeddings(input_ids, position_ids)
        x, states = self.encoder(x, True, packing, output_hidden_states)
        x = self.final_layer_norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eos_positions(input_ids)]
        return CLIPTowerOutput(x, pooled, states)


class CLIPVisionModel(_CLIPBase):
    """transformers' ``CLIPVisionModel``: ``embeddings``, ``pre_layrnorm`` (transformers'
    spelling), ``encoder``, ``post_layernorm`` on the CLS token.

    ``forward(pixel_values (B, C, S, S), output_hidden_states)`` returns :class:`CLIPTowerOutput`;
    ``hidden_states[0]`` is the embeddings after ``pre_layrnorm``, then each layer's output
    (a LLaVA projector takes ``hidden_states[-2]``).
    """

    _tower, _tower_prefixes = "vision", ("vision_model.",)

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__()
        cfg = _tower_config(config, overrides, _VISION_DEFAULTS, "vision_config")
        nn.Module.__setattr__(self, "config", cfg)
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.register_load_state_dict_pre_hook(_peer_key_hook("vision_model"))

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> CLIPTowerOutput:
        if interpolate_pos_encoding:
            raise NotImplementedError(
                "CLIPVisionModel: interpolate_pos_encoding=True is not supported"
            )
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x, states = self.encoder(x, False, None, output_hidden_states)
        return CLIPTowerOutput(x, self.post_layernorm(x[:, 0]), states)


class CLIPTextModelWithProjection(_CLIPBase):
    """transformers' ``CLIPTextModelWithProjection``: ``text_model`` and ``text_projection``
    (no bias) to the text config's ``projection_dim``; returns :class:`CLIPTextModelOutput`."""

    _tower, _tower_prefixes = "text", ("text_model.", "text_projection.")

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__()
        self.text_model = CLIPTextModel(config, **overrides)
        cfg = self.text_model.config
        nn.Module.__setattr__(self, "config", cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextModelOutput:
        out = self.text_model(input_ids, attention_mask, position_ids, output_hidden_states)
        return CLIPTextModelOutput(
            self.text_projection(out.pooler_output), out.last_hidden_state, out.hidden_states
        )


class CLIPVisionModelWithProjection(_CLIPBase):
    """transformers' ``CLIPVisionModelWithProjection``: ``vision_model`` and
    ``visual_projection`` (no bias); returns :class:`CLIPVisionModelOutput`."""

    _tower, _tower_prefixes = "vision", ("vision_model.", "visual_projection.")

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__()
        self.vision_model = CLIPVisionModel(config, **overrides)
        cfg = self.vision_model.config
        nn.Module.__setattr__(self, "config", cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(
        self, pixel_values: Tensor, output_hidden_states: bool = False
    ) -> CLIPVisionModelOutput:
        out = self.vision_model(pixel_values, output_hidden_states)
        return CLIPVisionModelOutput(
            self.visual_projection(out.pooler_output), out.last_hidden_state, out.hidden_states
        )


class CLIPModel(_CLIPBase):
    """transformers' ``CLIPModel``: ``text_model``, ``vision_model``, ``text_projection`` and
    ``visual_projection`` (no bias) to ``projection_dim``, and ``logit_scale`` (the log of the
    logits' temperature inverse).

    ``config``: transformers' ``CLIPConfig`` or a dict with its fields (``text_config``,
    ``vision_config``, ``projection_dim``, ``logit_scale_init_value``); other keys are ignored.
    ``model.config`` holds the values used (the towers' configs reduced to the fields they use).
    """

    _FIELDS = ("text_config", "vision_config", "projection_dim", "logit_scale_init_value")

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__()
        _warn_unknown(overrides, self._FIELDS, type(self).__name__)
        values = {**_as_dict(config, "config"), **overrides}
        self.text_model = CLIPTextModel(values.get("text_config"))
        self.vision_model = CLIPVisionModel(values.get("vision_config"))
        cfg = FrozenConfig(
            text_config=self.text_model.config,
            vision_config=self.vision_model.config,
            projection_dim=int(values.get("projection_dim", 512)),
            logit_scale_init_value=float(values.get("logit_scale_init_value", 2.6592)),
        )
        nn.Module.__setattr__(self, "config", cfg)
        text_dim = cfg.text_config.hidden_size
        vision_dim = cfg.vision_config.hidden_size
        self.visual_projection = nn.Linear(vision_dim, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(text_dim, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init_value))

    def _saved_config(self) -> dict[str, Any]:
        return transformers_config(self.config, "clip", "CLIPModel", self.dtype)

    def get_text_features(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """The projected (not normalised) text embeddings ``(B, P)``, as transformers 4 returned
        them (transformers 5 returns an output whose ``pooler_output`` is this tensor)."""
        pooled = self.text_model(input_ids, attention_mask, position_ids).pooler_output
        return self.text_projection(pooled)

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """The projected (not normalised) image embeddings ``(B, P)`` (see
        :meth:`get_text_features`)."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        return_loss: bool = False,
        output_hidden_states: bool = False,
    ) -> CLIPOutput:
        """``input_ids (Bt, L)``, ``pixel_values (Bi, C, S, S)`` -> :class:`CLIPOutput`.
        ``return_loss`` (needs ``Bt == Bi``): CLIP's symmetric contrastive loss (the mean of the
        image->text and text->image cross-entropies), computed by :class:`genext.losses.ClipLoss`;
        the towers' outputs' ``pooler_output`` are the unprojected pooled tokens."""
        vision = self.vision_model(pixel_values, output_hidden_states)
        text = self.text_model(input_ids, attention_mask, position_ids, output_hidden_states)
        image_embeds = F.normalize(self.visual_projection(vision.pooler_output), dim=-1, eps=0.0)
        text_embeds = F.normalize(self.text_projection(text.pooler_output), dim=-1, eps=0.0)
        scale = self.logit_scale.exp()
        logits_per_text = text_embeds @ image_embeds.t() * scale
        loss = None
        if return_loss:
            if image_embeds.shape[0] != text_embeds.shape[0]:
                raise ValueError(
                    "return_loss needs as many texts as images, got "
                    f"{text_embeds.shape[0]} texts and {image_embeds.shape[0]} images"
                )
            loss = ClipLoss()(image_embeds, text_embeds, scale)
        return CLIPOutput(
            loss,
            logits_per_text.t(),
            logits_per_text,
            text_embeds,
            image_embeds,
            text,
            vision,
        )

    @classmethod
    def from_open_clip(cls, model: nn.Module) -> CLIPModel:
        """A genext CLIPModel with the weights of ``model``, an ``open_clip.CLIP`` with a
        standard ViT image tower and open_clip's own text tower (quick_gelu or exact gelu; text
        pooling ``argmax`` or ``eos``). Refused, with the option named: ResNet/timm image towers,
        attentional pooling, average pooling, no ``ln_pre``, patch dropout, layer scale, custom
        attention blocks, custom (Hugging Face) text towers, no causal mask, text projections
        with a bias, and ``logit_bias``. The fused ``in_proj_weight`` is split into q/k/v; the
        ``(width, out)`` projections are transposed into ``Linear`` weights."""
        config = _open_clip_config(model)
        # in the source's dtype before loading, so that float64 weights stay float64
        ours = cls(config).to(model.logit_scale.dtype)
        ours.load_state_dict(_open_clip_state(model), strict=True)
        return ours


# ---- open_clip conversion -------------------------------------------------------------------


def _refuse(option: str) -> None:
    raise ValueError(f"CLIPModel.from_open_clip: {option} is not supported")


def _open_clip_blocks(transformer: nn.Module, tower: str) -> tuple[str, float]:
    """Checks a tower's residual blocks; returns (hidden_act, layer-norm eps)."""
    blocks = list(transformer.resblocks)
    if not blocks:
        _refuse(f"a {tower} tower without layers")
    acts, eps = set(), set()
    for block in blocks:
        if type(block).__name__ != "ResidualAttentionBlock":
            _refuse(
                f"{tower} block type {type(block).__name__} (block_type='custom': qk_norm, "
                "scaled cosine attention, scale_heads, scale_attn, scale_fc)"
            )
        if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
            _refuse(f"{tower} ls_init_value (layer scale)")
        if hasattr(block, "ln_1_kv"):
            _refuse(f"{tower} cross-attention blocks")
        if block.attn.in_proj_bias is None or block.attn.in_proj_weight is None:
            _refuse(f"{tower} attention without a fused biased in_proj")
        act = block.mlp.gelu
        if type(act).__name__ == "QuickGELU":
            acts.add("quick_gelu")
        elif isinstance(act, nn.GELU) and act.approximate == "none":
            acts.add("gelu")
        else:
            _refuse(f"{tower} activation {act!r} (act_kwargs; only QuickGELU and exact GELU)")
        eps.update({block.ln_1.eps, block.ln_2.eps})
    if len(acts) != 1:
        _refuse(f"{tower} blocks with different activations")
    return acts.pop(), _one_eps(eps, tower)


def _one_eps(eps: set[float], tower: str) -> float:
    if len(eps) != 1:
        _refuse(f"{tower} layer norms with different eps {sorted(eps)} (norm_kwargs)")
    return next(iter(eps))


def _open_clip_config(model: nn.Module) -> dict[str, Any]:
    if getattr(model, "logit_bias", None) is not None:
        _refuse("logit_bias (SigLIP-style models)")
    if hasattr(model, "text") or not hasattr(model, "token_embedding"):
        _refuse("a custom text tower (CustomTextCLIP, e.g. a Hugging Face text encoder)")
    visual = model.visual
    if type(visual).__name__ != "VisionTransformer":
        _refuse(f"image tower {type(visual).__name__} (only open_clip's VisionTransformer)")
    if getattr(visual, "attn_pool", None) is not None:
        _refuse("attentional_pool")
    if visual.pool_type != "tok":
        _refuse(f"vision pool_type {visual.pool_type!r} (only 'tok', the CLS token)")
    if isinstance(visual.ln_pre, nn.Identity):
        _refuse("no_ln_pre")
    if not isinstance(visual.patch_dropout, nn.Identity):
        _refuse("patch_dropout")
    if visual.proj is None:
        _refuse("an image tower without a projection")
    if model.text_projection is None or (
        isinstance(model.text_projection, nn.Linear) and model.text_projection.bias is not None
    ):
        _refuse("text proj_type 'none' or proj_bias")
    if model.attn_mask is None:
        _refuse("no_causal_mask")

    v_act, v_eps = _open_clip_blocks(visual.transformer, "vision")
    t_act, t_eps = _open_clip_blocks(model.transformer, "text")
    v_eps = _one_eps({v_eps, visual.ln_pre.eps, visual.ln_post.eps}, "vision")
    t_eps = _one_eps({t_eps, model.ln_final.eps}, "text")

    pool = getattr(model, "text_pool_type", "argmax")
    if pool == "argmax":
        eos = 2  # transformers' legacy value: pool at the largest token id
    elif pool == "eos":
        eos = int(model.text_eos_id)
        if eos == 2:
            _refuse("text pool_type 'eos' with eos_id 2 (transformers reads 2 as argmax pooling)")
    else:
        _refuse(f"text pool_type {pool!r} (only 'argmax' and 'eos')")

    conv = visual.conv1
    v_block, t_block = visual.transformer.resblocks[0], model.transformer.resblocks[0]
    image_size = visual.image_size
    patch = conv.kernel_size
    vision_config = dict(
        hidden_size=conv.out_channels,
        intermediate_size=v_block.mlp.c_fc.out_features,
        projection_dim=visual.proj.shape[1],
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=v_block.attn.num_heads,
        num_channels=conv.in_channels,
        image_size=list(image_size) if isinstance(image_size, tuple) else image_size,
        patch_size=list(patch),
        hidden_act=v_act,
        layer_norm_eps=v_eps,
    )
    proj = model.text_projection
    text_out = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
    text_config = dict(
        vocab_size=model.token_embedding.num_embeddings,
        hidden_size=model.token_embedding.embedding_dim,
        intermediate_size=t_block.mlp.c_fc.out_features,
        projection_dim=text_out,
        num_hidden_layers=len(model.transformer.resblocks),
        num_attention_heads=t_block.attn.num_heads,
        max_position_embeddings=model.positional_embedding.shape[0],
        hidden_act=t_act,
        layer_norm_eps=t_eps,
        eos_token_id=eos,
    )
    if text_out != vision_config["projection_dim"]:
        _refuse(
            f"text and image embeddings of different widths ({text_out}, {vision_config['projection_dim']})"
        )
    return dict(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=text_out,
        logit_scale_init_value=float(model.logit_scale.detach().reshape(-1)[0]),
    )


def _open_clip_layers(transformer: nn.Module, prefix: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for i, block in enumerate(transformer.resblocks):
        p = f"{prefix}.encoder.layers.{i}."
        attn = block.attn
        for name, w, b in zip(
            ("q_proj", "k_proj", "v_proj"),
            attn.in_proj_weight.chunk(3),
            attn.in_proj_bias.chunk(3),
        ):
            out[p + f"self_attn.{name}.weight"] = w
            out[p + f"self_attn.{name}.bias"] = b
        pairs = {
            "self_attn.out_proj": attn.out_proj,
            "layer_norm1": block.ln_1,
            "layer_norm2": block.ln_2,
            "mlp.fc1": block.mlp.c_fc,
            "mlp.fc2": block.mlp.c_proj,
        }
        for name, module in pairs.items():
            out[p + name + ".weight"] = module.weight
            out[p + name + ".bias"] = module.bias
    return out


def _open_clip_state(model: nn.Module) -> dict[str, Tensor]:
    visual = model.visual
    proj = model.text_projection
    state = {
        "logit_scale": model.logit_scale.reshape(()),
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight,
        "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
        "vision_model.post_layernorm.weight": visual.ln_post.weight,
        "vision_model.post_layernorm.bias": visual.ln_post.bias,
        "visual_projection.weight": visual.proj.t(),
        "text_model.embeddings.token_embedding.weight": model.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": model.positional_embedding,
        "text_model.final_layer_norm.weight": model.ln_final.weight,
        "text_model.final_layer_norm.bias": model.ln_final.bias,
        "text_projection.weight": proj.weight if isinstance(proj, nn.Linear) else proj.t(),
        **_open_clip_layers(visual.transformer, "vision_model"),
        **_open_clip_layers(model.transformer, "text_model"),
    }
    return {k: v.detach() for k, v in state.items()}


# ---- zero-shot classification ---------------------------------------------------------------


def _tokenize(tokenizer: Callable[[list[str]], Any], texts: list[str], device) -> tuple:
    """(input_ids, attention_mask or None) from a tokenizer returning ids or a mapping."""
    out = tokenizer(texts)
    mask = None
    if isinstance(out, Mapping):
        ids, mask = out["input_ids"], out.get("attention_mask")
    else:
        ids = out
    ids = torch.as_tensor(ids, device=device)
    if mask is not None:
        mask = torch.as_tensor(mask, device=device)
    return ids, mask


@torch.no_grad()
def zero_shot_classifier(
    model: CLIPModel,
    tokenizer: Callable[[list[str]], Any],
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    device: str | torch.device | None = None,
) -> Tensor:
    """Class embeddings for zero-shot classification, ``(num_classes, P)``, L2-normalised: for
    each class, the mean of its templates' normalised text embeddings, renormalised (open_clip's
    ``build_zero_shot_classifier``, which returns the transpose).

    ``tokenizer``: a callable from a list of texts to ``(N, L)`` ids, or to a mapping with
    ``input_ids`` (and ``attention_mask``), e.g. ``open_clip.get_tokenizer("ViT-B-32")`` or
    ``functools.partial(hf_tokenizer, padding=True, return_tensors="pt")``. ``templates``:
    format strings with one ``{}`` or callables of the class name. ``device``: where the tokens
    go (the model's device by default).
    """
    if not classnames or not templates:
        raise ValueError("zero_shot_classifier: classnames and templates must not be empty")
    device = model.device if device is None else torch.device(device)
    rows = []
    for name in classnames:
        texts = [t.format(name) if isinstance(t, str) else t(name) for t in templates]
        ids, mask = _tokenize(tokenizer, texts, device)
        emb = F.normalize(model.get_text_features(ids, mask), dim=-1)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)


def zero_shot_logits(model: CLIPModel, pixel_values: Tensor, classifier: Tensor) -> Tensor:
    """``logit_scale.exp() * normalize(image features) @ classifier.T``: ``(B, num_classes)``
    for ``pixel_values (B, C, S, S)`` and a :func:`zero_shot_classifier` ``(num_classes, P)``."""
    image = F.normalize(model.get_image_features(pixel_values), dim=-1)
    return model.logit_scale.exp() * image @ classifier.to(image.dtype).t()


def zero_shot_predict(model: CLIPModel, pixel_values: Tensor, classifier: Tensor) -> Tensor:
    """The predicted class of each image, ``(B,)`` int64."""
    return zero_shot_logits(model, pixel_values, classifier).argmax(dim=-1)
