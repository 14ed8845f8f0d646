"""What the models that mirror a peer share: a read-only config with attribute access, output
records that behave like the peer's, building from the peer's config, and loading the peer's
on-disk layout (``config.json`` + weights) from a local folder. Nothing is downloaded."""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._blocks import rename_legacy_attention_keys

__all__ = ["FrozenConfig", "ModelOutput", "PeerConfigMixin"]


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes (``config.scaling_factor``), as diffusers'
    ``FrozenDict``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("the config is read-only; build a new model with from_config(...)")

    __setitem__ = __delitem__ = __ior__ = update = pop = popitem = setdefault = clear = _readonly  # type: ignore[assignment]
    __setattr__ = _readonly  # type: ignore[assignment]

    def __reduce__(self):  # copy and pickle through the constructor, not item assignment
        return (type(self), (dict(self),))


class ModelOutput(OrderedDict):
    """A record of named outputs, as diffusers' ``BaseOutput``: an ordered dict of the fields that
    are not None, whose fields are also attributes (``out.sample``, None when unset) and whose
    integer index counts over the set fields (``out[0]``, ``out.to_tuple()``)."""

    _fields: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        if len(args) > len(self._fields):
            raise TypeError(f"{type(self).__name__} takes at most {len(self._fields)} values")
        values = dict(zip(self._fields, args))
        for k, v in kwargs.items():
            if k not in self._fields or k in values:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated field {k!r}")
            values[k] = v
        for f in self._fields:
            v = values.get(f)
            object.__setattr__(self, f, v)
            if v is not None:
                super().__setitem__(f, v)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def __reduce__(self):
        return (type(self), (), None, None, iter(self.items()))

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        object.__setattr__(self, key, value)

    def __repr__(self) -> str:
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({inner})"


def _config_path(folder: Path) -> Path:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    return path


def _weights_path(folder: Path, variant: str | None) -> Path:
    stem = "diffusion_pytorch_model"
    suffix = f".{variant}" if variant else ""
    for name in (
        f"{stem}{suffix}.safetensors",
        f"model{suffix}.safetensors",
        f"{stem}{suffix}.bin",
    ):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"no weights in {folder} (looked for {stem}{suffix}.safetensors, model{suffix}.safetensors "
        f"and {stem}{suffix}.bin; sharded checkpoints are not read)"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file (needs the ``safetensors`` package) or of a
    PyTorch ``.bin``/``.pt`` file (loaded with ``weights_only=True``), on the CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(
                "reading .safetensors weights needs the safetensors package: pip install safetensors"
            ) from e
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class PeerConfigMixin:
    """Construction from a peer's config and loading of the peer's on-disk layout.

    The class's ``__init__`` keyword arguments are the peer's config fields; ``self.config`` is
    the read-only record of the values used. Keys of a peer config that start with ``_``
    (``_class_name``, ``_diffusers_version``) are bookkeeping and ignored; other unknown keys
    warn and are ignored, as diffusers does.
    """

    config: FrozenConfig

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first parameter (diffusers' ``model.dtype``)."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (diffusers' ``model.device``)."""
        return next(self.parameters()).device

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the blocks' activations in the backward instead of storing them, in every
        submodule that supports it (those with a ``gradient_checkpointing`` flag)."""
        self._set_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        self._set_checkpointing(False)

    def _set_checkpointing(self, on: bool) -> None:
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = on

    def _record_config(self, values: Mapping[str, Any]) -> None:
        sig = inspect.signature(type(self).__init__)
        full = {name: p.default for name, p in sig.parameters.items() if name != "self"}
        full.update(values)
        full = {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}
        nn.Module.__setattr__(self, "config", FrozenConfig(full))

    @classmethod
    def _config_kwargs(cls, config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
        if not isinstance(config, Mapping):
            raise TypeError(
                f"config must be a mapping (dict or FrozenDict), got {type(config).__name__}"
            )
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        merged = {**config, **overrides}
        unknown = sorted(k for k in merged if k not in params and not k.startswith("_"))
        if unknown:
            warnings.warn(
                f"{cls.__name__}.from_config: ignoring config keys this model does not use: {unknown}",
                stacklevel=3,
            )
        return {k: v for k, v in merged.items() if k in params}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any):
        """A model with randomly initialised weights built from ``config`` (a dict, diffusers'
        ``FrozenDict`` or ``model.config``), with ``overrides`` replacing single fields."""
        return cls(**cls._config_kwargs(config, overrides))

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        variant: str | None = None,
        **ignored: Any,
    ):
        """The model saved in ``folder`` in diffusers' layout: ``config.json`` beside
        ``diffusion_pytorch_model.safetensors`` (or ``.bin``); ``subfolder`` for a pipeline's
        component (``"vae"``). A local path only: nothing is downloaded. The weights load
        strictly; ``torch_dtype`` and ``device`` move the model after loading. diffusers' other
        loading options (``use_safetensors``, ``low_cpu_mem_usage``, ...) are accepted with a
        warning and have no effect. Checkpoints with the old attention names (``query``,
        ``key``, ``value``, ``proj_attn``) are renamed on load, as diffusers does."""
        if ignored:
            warnings.warn(
                f"{cls.__name__}.from_pretrained: ignoring {sorted(ignored)} (local folders only)",
                stacklevel=2,
            )
        root = Path(folder)
        if subfolder:
            root = root / subfolder
        if not root.is_dir():
            raise FileNotFoundError(
                f"{cls.__name__}.from_pretrained: {root} is not a folder (only local folders are "
                "read; download the weights first, e.g. with huggingface_hub.snapshot_download)"
            )
        config = json.loads(_config_path(root).read_text())
        model = cls.from_config(config)
        state = read_state_dict(_weights_path(root, variant))
        model.load_state_dict(cls._convert_legacy_state(state), strict=True)
        if torch_dtype is not None or device is not None:
            model.to(device=device, dtype=torch_dtype)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike, safe_serialization: bool = True) -> None:
        """Writes ``config.json`` and the weights in diffusers' layout, readable by this class's
        and by the peer's ``from_pretrained``."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, **self.config}
        (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if safe_serialization:
            from safetensors.torch import save_file

            # a module registered under two names (Downsample2D's conv) shares storage: clone
            save_file(
                {k: v.clone() for k, v in state.items()},
                str(root / "diffusion_pytorch_model.safetensors"),
            )
        else:
            torch.save(state, root / "diffusion_pytorch_model.bin")

    @classmethod
    def _convert_legacy_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Renames keys of older checkpoints: the attention blocks' old names."""
        return rename_legacy_attention_keys(state)
