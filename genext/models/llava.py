"""LlavaForConditionalGeneration: transformers' LLaVA (a CLIP vision tower, a two-layer projector
and a Llama-family language model) on genext's CLIP and Llama modules.

Takes transformers' ``LlavaConfig`` (the object or its dict) and loads transformers 5's
``state_dict`` with no renaming; the older layout of published checkpoints (transformers 4's
``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.vision_model.*``,
``multi_modal_projector.*``) is renamed on load.

The image features (the selected hidden states of the vision tower, without the CLS token under
the ``"default"`` strategy, through the projector) replace the embeddings of the image tokens;
the language model then runs on the merged embeddings. ``generate`` prefills those embeddings
through genext's varlen attention and decodes plain tokens through :class:`genext.KVCache`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import KVCache
from ._config import (
    TRANSFORMERS_GENERIC_KEYS,
    PeerConfigMixin,
    accepts_config,
    transformers_config,
)
from ._generation import GenerationMixin
from .clip import CLIPVisionModel
from .llama import CausalLMOutput, LlamaForCausalLM, LlamaModel

__all__ = ["LlavaForConditionalGeneration", "LlavaModel", "LlavaMultiModalProjector"]

_PROJECTOR_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}
_TEXT_TYPES = ("llama", "mistral", "qwen2")
_STRATEGIES = ("default", "full")
# keys of transformers 4's checkpoints -> transformers 5's, first match wins
_OLD_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
# transformers' generic fields, and LLaVA's bookkeeping ones (model_type is checked apart)
_GENERIC_KEYS = TRANSFORMERS_GENERIC_KEYS | {"model_type", "ignore_index", "pad_token_id"}


def _as_dict(config: Any, name: str) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if callable(getattr(config, "to_dict", None)):
        return config.to_dict()
    raise TypeError(f"{name} must be a dict or a transformers config, got {type(config).__name__}")


class LlavaMultiModalProjector(nn.Module):
    """``linear_2(act(linear_1(features)))``: ``(..., vision_hidden * n_layers) -> (..., text_hidden)``."""

    def __init__(self, in_features: int, hidden: int, act: str, bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden, bias=bias)
        self.act = _PROJECTOR_ACTIVATIONS[act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class LlavaModel(nn.Module):
    """transformers' ``LlavaModel`` keys: ``vision_tower`` (genext's :class:`CLIPVisionModel`),
    ``multi_modal_projector``, ``language_model`` (the Llama decoder without its head)."""

    def __init__(
        self,
        vision_tower: CLIPVisionModel,
        projector: LlavaMultiModalProjector,
        language_model: LlamaModel,
    ) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.multi_modal_projector = projector
        self.language_model = language_model


class LlavaForConditionalGeneration(PeerConfigMixin, GenerationMixin, nn.Module):
    """transformers' ``LlavaForConditionalGeneration``; the keyword arguments are ``LlavaConfig``'s
    fields (build from a config with :meth:`from_config`).

    ``vision_config``: a CLIP vision config (``model_type`` ``clip_vision_model``; other towers
    are refused). ``text_config``: a Llama, Mistral or Qwen2 config (others are refused).
    ``vision_feature_layer``: an index into the tower's hidden states (0 = embeddings after
    ``pre_layrnorm``, -1 = the last layer's output), or a list of them whose features are
    concatenated. ``vision_feature_select_strategy``: ``"default"`` drops the CLS token,
    ``"full"`` keeps it.

    State dict (transformers 5's layout): ``model.vision_tower.*``,
    ``model.multi_modal_projector.linear_{1,2}.*``, ``model.language_model.*`` (embed_tokens,
    layers, norm) and ``lm_head.weight``. transformers 4's names load too (renamed by a
    load-state-dict hook).
    """

    _weights_name = "model"  # save_pretrained writes transformers' model.safetensors

    @accepts_config
    def __init__(
        self,
        vision_config: Any = None,
        text_config: Any = None,
        image_token_index: int = 32000,
        image_seq_length: int = 576,
        projector_hidden_act: str = "gelu",
        vision_feature_select_strategy: str = "default",
        vision_feature_layer: int | Sequence[int] = -2,
        multimodal_projector_bias: bool = True,
        tie_word_embeddings: bool = False,
        image_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if image_token_id is not None:
            image_token_index = image_token_id
        if vision_feature_select_strategy not in _STRATEGIES:
            raise ValueError(
                f"LlavaForConditionalGeneration: vision_feature_select_strategy must be one of "
                f"{_STRATEGIES}, got {vision_feature_select_strategy!r}"
            )
        if projector_hidden_act not in _PROJECTOR_ACTIVATIONS:
            raise ValueError(
                f"LlavaForConditionalGeneration: projector_hidden_act must be one of "
                f"{sorted(_PROJECTOR_ACTIVATIONS)}, got {projector_hidden_act!r}"
            )
        vision = _as_dict(vision_config, "vision_config")
        text = _as_dict(text_config, "text_config")
        vision_type = vision.get("model_type", "clip_vision_model")
        if vision_type not in ("clip_vision_model", "clip"):
            raise ValueError(
                f"LlavaForConditionalGeneration: vision_config.model_type must be "
                f"'clip_vision_model' (genext's CLIPVisionModel), got {vision_type!r}"
            )
        if vision_type == "clip" and "vision_config" in vision:
            vision = _as_dict(vision["vision_config"], "vision_config.vision_config")
        text_type = text.get("model_type", "llama")
        if text_type not in _TEXT_TYPES:
            raise ValueError(
                f"LlavaForConditionalGeneration: text_config.model_type must be one of "
                f"{_TEXT_TYPES} (genext's LlamaForCausalLM), got {text_type!r}"
            )
        tie = bool(tie_word_embeddings or text.get("tie_word_embeddings", False))
        lm = LlamaForCausalLM.from_config(
            {**text, "model_type": text_type}, tie_word_embeddings=tie
        )
        tower = CLIPVisionModel(vision)
        layers = (
            [int(vision_feature_layer)]
            if isinstance(vision_feature_layer, int)
            else [int(i) for i in vision_feature_layer]
        )
        n_states = tower.config.num_hidden_layers + 1
        if not layers or any(not -n_states <= i < n_states for i in layers):
            raise ValueError(
                f"LlavaForConditionalGeneration: vision_feature_layer must index the vision "
                f"tower's {n_states} hidden states, got {vision_feature_layer!r}"
            )
        projector = LlavaMultiModalProjector(
            tower.config.hidden_size * len(layers),
            lm.config.hidden_size,
            projector_hidden_act,
            multimodal_projector_bias,
        )
        self.model = LlavaModel(tower, projector, lm.model)
        self.lm_head = lm.lm_head
        # the language model's methods (forward, the generation protocol) run on the modules
        # registered above; the wrapper itself stays out of the module tree so that the
        # state_dict keys are transformers'
        nn.Module.__setattr__(self, "_lm", [lm])
        self.feature_layers = layers
        self.register_load_state_dict_pre_hook(self._rename_old_keys)
        self._record_config(
            dict(
                vision_config=dict(tower.config),
                text_config=dict(lm.config),
                image_token_index=int(image_token_index),
                image_seq_length=image_seq_length,
                projector_hidden_act=projector_hidden_act,
                vision_feature_select_strategy=vision_feature_select_strategy,
                vision_feature_layer=vision_feature_layer,
                multimodal_projector_bias=multimodal_projector_bias,
                tie_word_embeddings=tie,
                image_token_id=None,
            )
        )

    # ---- config and loading -----------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> LlavaForConditionalGeneration:
        """A model with random weights from transformers' ``LlavaConfig`` (or any object with
        ``to_dict()``) or a dict of its fields; ``overrides`` replace single fields.
        transformers' generic fields are ignored."""
        return cls(**cls._fields_of(config, overrides))

    @classmethod
    def _fields_of(cls, config: Any, overrides: Mapping[str, Any]) -> dict:
        config = _as_dict(config, "config")
        if config.get("model_type", "llava") != "llava":
            raise ValueError(
                f"{cls.__name__}: config.model_type must be 'llava', got {config['model_type']!r}"
            )
        config = {k: v for k, v in config.items() if k not in _GENERIC_KEYS}
        return cls._config_kwargs(config, overrides)

    def _saved_config(self) -> dict[str, Any]:
        fields = dict(self.config)
        fields["vision_config"] = {**fields["vision_config"], "model_type": "clip_vision_model"}
        fields["text_config"] = {
            **fields["text_config"],
            "model_type": self.language_model.config.model_type,
        }
        fields.pop("image_token_id", None)
        return transformers_config(fields, "llava", "LlavaForConditionalGeneration", self.dtype)

    @classmethod
    def _convert_legacy_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return state  # the load hook renames what needs renaming

    @property
    def language_model(self) -> LlamaForCausalLM:
        """The Llama-family causal LM (its decoder is ``model.language_model``, its head
        ``lm_head``)."""
        return self._lm[0]

    @property
    def vision_tower(self) -> CLIPVisionModel:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> LlavaMultiModalProjector:
        return self.model.multi_modal_projector

    def _rename_old_keys(self, module, state_dict, prefix, *args) -> None:
        """transformers 4's key names to transformers 5's; a tied head without its own key
        takes the embeddings."""
        for key in list(state_dict):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            for old, new in _OLD_PREFIXES:
                if rest.startswith(old) and not rest.startswith(new):
                    state_dict[prefix + new + rest[len(old) :]] = state_dict.pop(key)
                    break
        state_dict.pop(f"{prefix}model.vision_tower.embeddings.position_ids", None)
        head, embed = f"{prefix}lm_head.weight", f"{prefix}model.language_model.embed_tokens.weight"
        if self.config.tie_word_embeddings and head not in state_dict and embed in state_dict:
            state_dict[head] = state_dict[embed]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens

    # ---- images -----------------------------------------------------------------------------

    def get_image_features(
        self,
        pixel_values: Tensor,
        vision_feature_layer: int | Sequence[int] | None = None,
        vision_feature_select_strategy: str | None = None,
    ) -> Tensor:
        """``pixel_values (N, 3, S, S)`` -> projected features ``(N, P, text_hidden)``: ``P`` =
        (S / patch)^2 patches (+1 with the ``"full"`` strategy, the CLS token first)."""
        layers = self.feature_layers
        if vision_feature_layer is not None:
            layers = (
                [vision_feature_layer]
                if isinstance(vision_feature_layer, int)
                else list(vision_feature_layer)
            )
        if len(layers) != len(self.feature_layers):
            raise ValueError(
                f"vision_feature_layer: the projector takes {len(self.feature_layers)} layer(s), "
                f"got {vision_feature_layer!r}"
            )
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        if strategy not in _STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy must be one of {_STRATEGIES}, got {strategy!r}"
            )
        states = self.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        picked = [states[i] for i in layers]
        if strategy == "default":
            picked = [s[:, 1:] for s in picked]
        features = picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)
        return self.model.multi_modal_projector(features)

    def merge_image_features(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        vision_feature_layer: int | Sequence[int] | None = None,
        vision_feature_select_strategy: str | None = None,
    ) -> Tensor:
        """The token embeddings of ``input_ids (B, L)`` with the image features written, in
        order, at the positions of ``image_token_index`` -> ``(B, L, text_hidden)``. The number
        of image tokens must equal the number of features (images x features per image)."""
        embeds = self.get_input_embeddings()(input_ids)
        is_image = input_ids == self.config.image_token_index
        n_tokens = int(is_image.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(
                    f"input_ids hold {n_tokens} image tokens (id {self.config.image_token_index}) "
                    "but no pixel_values were given"
                )
            return embeds
        features = self.get_image_features(
            pixel_values, vision_feature_layer, vision_feature_select_strategy
        )
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        if n_tokens != features.shape[0]:
            raise ValueError(
                f"image features and image tokens do not match: input_ids hold {n_tokens} image "
                f"tokens (id {self.config.image_token_index}), pixel_values give "
                f"{pixel_values.shape[0]} image(s) x {features.shape[0] // pixel_values.shape[0]} "
                f"features = {features.shape[0]}"
            )
        return embeds.index_put(is_image.nonzero(as_tuple=True), features)

    # ---- forward ----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        vision_feature_layer: int | Sequence[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> CausalLMOutput:
        """transformers' forward.

        Args:
            input_ids: ``(B, L)`` int64 with ``image_token_index`` where the image features go
                (one per feature), or ``inputs_embeds (B, L, text_hidden)`` already merged.
            pixel_values: ``(N, 3, S, S)``, the images in the order of their tokens.
            attention_mask, position_ids, labels, num_items_in_batch: as
                :meth:`LlamaForCausalLM.forward` (padding either side; logits at padded
                positions are 0; predictions made at padding do not count in the loss).

        Returns:
            :class:`CausalLMOutput` with ``logits (B, L, vocab)`` and ``loss``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("forward: give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.merge_image_features(
                input_ids, pixel_values, vision_feature_layer, vision_feature_select_strategy
            )
        elif pixel_values is not None:
            raise ValueError("forward: pixel_values cannot be merged into given inputs_embeds")
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            num_items_in_batch=num_items_in_batch,
        )

    # ---- the generation protocol (the language model's) --------------------------------------

    def kv_cache_spec(self) -> tuple[int, int, int]:
        return self.language_model.kv_cache_spec()

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
        """The language model's :meth:`LlamaForCausalLM.forward_packed` (images already merged
        into ``inputs_embeds (T, text_hidden)``)."""
        return self.language_model.forward_packed(
            input_ids, position_ids, cu_seqlens, max_seqlen, caches, inputs_embeds, last_only
        )

    def forward_decode(
        self,
        input_ids: Tensor | None,
        position_ids: Tensor,
        caches: Sequence[KVCache],
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """The language model's :meth:`LlamaForCausalLM.forward_decode`."""
        return self.language_model.forward_decode(input_ids, position_ids, caches, inputs_embeds)

    def _check_generate(self, max_length: int, cuda_graph: bool) -> None:
        self.language_model._check_generate(max_length, cuda_graph)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        vision_feature_layer: int | Sequence[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """:meth:`GenerationMixin.generate` with images: ``input_ids (B, L)`` holding the image
        tokens, ``pixel_values (N, 3, S, S)``; the prefill runs on the merged embeddings, the
        decode steps on plain tokens. ``kwargs`` are ``GenerationMixin.generate``'s
        (``max_new_tokens``, ``do_sample``, ...); ``eos_token_id``/``pad_token_id`` default to
        the text config's. Returns ``(B, L + n)`` int64 as transformers'."""
        if input_ids is None:
            raise ValueError("generate: input_ids (B, L) with the image tokens is required")
        text = self.language_model.config
        kwargs.setdefault("eos_token_id", text.get("eos_token_id"))
        if kwargs.get("pad_token_id") is None:
            kwargs["pad_token_id"] = text.get("pad_token_id")
        embeds = self.merge_image_features(
            input_ids, pixel_values, vision_feature_layer, vision_feature_select_strategy
        )
        return GenerationMixin.generate(
            self, input_ids, attention_mask=attention_mask, inputs_embeds=embeds, **kwargs
        )
