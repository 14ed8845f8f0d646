"""What the models that mirror a peer share: a read-only config with attribute access, output
records that behave like the peer's, building from the peer's config, and loading the peer's
on-disk layout (``config.json`` + weights) from a local folder. Nothing is downloaded."""

from __future__ import annotations

import functools
import inspect
import json
import numbers
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._blocks import rename_legacy_attention_keys

__all__ = [
    "FrozenConfig",
    "ModelOutput",
    "PeerConfigMixin",
    "accepts_config",
    "transformers_config",
]


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
    # diffusers' names and transformers' names (model.safetensors, pytorch_model.bin)
    suffix = f".{variant}" if variant else ""
    names = [
        f"{stem}{suffix}.{ext}"
        for ext in ("safetensors", "bin")
        for stem in ("diffusion_pytorch_model", "model", "pytorch_model")
    ]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"no weights in {folder} (looked for {', '.join(names)}; sharded checkpoints are not read)"
    )


def _state_dtype(state: Mapping[str, Tensor]) -> torch.dtype | None:
    """The floating dtype of a checkpoint's tensors when they all share one, else None."""
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def accepts_config(init: Callable[..., None]) -> Callable[..., None]:
    """Decorates a keyword-field ``__init__`` so that, as transformers' ``Model(config)``, its
    first positional argument may also be a whole config: a transformers ``PretrainedConfig``
    (anything with ``to_dict()``) or a mapping of its fields, filtered as ``from_config`` filters
    them (``cls._fields_of(config, overrides)``), the keyword arguments replacing single fields.
    ``config=`` as a keyword works too. An int in that position stays the first field
    (``vocab_size``); anything else raises a TypeError. The wrapped signature is kept, so
    ``self.config`` records the fields as before."""
    first = next(n for n in inspect.signature(init).parameters if n != "self")

    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.pop("config", None)
        if args and not isinstance(args[0], numbers.Integral):
            if config is not None:
                raise TypeError(f"{type(self).__name__}: config given twice")
            config, args = args[0], args[1:]
            if args:
                raise TypeError(
                    f"{type(self).__name__}(config, ...): fields after a config must be keyword "
                    f"arguments, got {len(args)} more positional"
                )
        if config is None:
            return init(self, *args, **kwargs)
        if args:
            raise TypeError(f"{type(self).__name__}: give a config or positional fields, not both")
        if not isinstance(config, Mapping) and not callable(getattr(config, "to_dict", None)):
            raise TypeError(
                f"{type(self).__name__}: the first argument must be a config (a transformers "
                f"config or a dict of its fields) or {first} (an int), got {type(config).__name__}"
            )
        return init(self, **type(self)._fields_of(config, kwargs))

    return wrapper


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


# fields every transformers config carries that say nothing about a model's architecture
TRANSFORMERS_GENERIC_KEYS = frozenset(
    {
        "transformers_version",
        "architectures",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "dtype",
        "torch_dtype",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
        "initializer_range",
        "use_cache",
    }
)


def transformers_config(
    fields: Mapping[str, Any], model_type: str, architecture: str | None, dtype: torch.dtype
) -> dict[str, Any]:
    """A ``config.json`` as transformers writes one: the fields, ``model_type``,
    ``architectures`` and ``dtype`` (its name without ``torch.``)."""
    out = {k: (dict(v) if isinstance(v, FrozenConfig) else v) for k, v in fields.items()}
    out["model_type"] = model_type
    if architecture is not None:
        out["architectures"] = [architecture]
    out["dtype"] = str(dtype).removeprefix("torch.")
    return out


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
    def _fields_of(cls, config: Any, overrides: Mapping[str, Any]) -> dict:
        """The ``__init__`` keyword arguments of ``config`` with ``overrides`` (what
        :meth:`from_config` and :func:`accepts_config` build from); the transformers peers
        extend it to config objects and their generic fields."""
        return cls._config_kwargs(config, overrides)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any):
        """A model with randomly initialised weights built from ``config`` (a dict, diffusers'
        ``FrozenDict`` or ``model.config``), with ``overrides`` replacing single fields."""
        return cls(**cls._fields_of(config, overrides))

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
        """The model saved in ``folder``: ``config.json`` beside the weights in diffusers' layout
        (``diffusion_pytorch_model.safetensors`` or ``.bin``) or transformers' (``model.safetensors``
        or ``pytorch_model.bin``); ``subfolder`` for a pipeline's component (``"vae"``). A local
        path only: nothing is downloaded. The model is built in ``torch_dtype`` and the weights
        load strictly into it, so a float64 checkpoint loaded as float64 stays exact. Without
        ``torch_dtype``: float32 for diffusers' models (as diffusers), the checkpoint's dtype for
        transformers' (as transformers 5's ``dtype="auto"``). ``device`` moves it after loading.
        diffusers' other loading options (``use_safetensors``, ``low_cpu_mem_usage``, ...) are
        accepted with a warning and have no effect. Checkpoints with the old attention names
        (``query``, ``key``, ``value``, ``proj_attn``) are renamed on load, as diffusers does."""
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
        state = read_state_dict(_weights_path(root, variant))
        dtype = torch_dtype
        if dtype is None and cls._weights_name != "diffusion_pytorch_model":
            dtype = _state_dtype(state)
        model = cls._from_saved_config(config)
        if dtype is not None:
            model.to(dtype)
        model.load_state_dict(cls._convert_legacy_state(state), strict=True)
        if device is not None:
            model.to(device=device)
        return model.eval()

    @classmethod
    def _from_saved_config(cls, config: dict[str, Any]):
        """The model a saved ``config.json`` describes (random weights)."""
        return cls.from_config(config)

    # transformers' peers set these: the weights file's stem, and the config.json that
    # transformers' from_pretrained reads (model_type, architectures)
    _weights_name = "diffusion_pytorch_model"

    def _saved_config(self) -> dict[str, Any]:
        """The content of ``config.json``: diffusers' layout (the fields and ``_class_name``)."""
        return {"_class_name": type(self).__name__, **self.config}

    def save_pretrained(self, folder: str | os.PathLike, safe_serialization: bool = True) -> None:
        """Writes ``config.json`` and the weights in the peer's layout, readable by this class's
        and by the peer's ``from_pretrained``: diffusers' (``diffusion_pytorch_model.safetensors``)
        for diffusers' models, transformers' (``model.safetensors``, a ``config.json`` with
        ``model_type`` and ``architectures``, a tied weight saved once) for transformers'."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self._saved_config(), indent=2, sort_keys=True) + "\n"
        (root / "config.json").write_text(text)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        transformers_layout = self._weights_name != "diffusion_pytorch_model"
        if transformers_layout:
            # a tied weight (lm_head = embedding) is saved once, under its first name, as
            # transformers saves it; the loaders tie it back
            seen: set[int] = set()
            for key, param in list(self.state_dict(keep_vars=True).items()):
                if id(param) in seen:
                    del state[key]
                seen.add(id(param))
        if safe_serialization:
            from safetensors.torch import save_file

            # a module registered under two names (Downsample2D's conv) shares storage: clone
            save_file(
                {k: v.clone() for k, v in state.items()},
                str(root / f"{self._weights_name}.safetensors"),
                metadata={"format": "pt"} if transformers_layout else None,
            )
        else:
            stem = "pytorch_model" if transformers_layout else self._weights_name
            torch.save(state, root / f"{stem}.bin")

    @classmethod
    def _convert_legacy_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Renames keys of older checkpoints: the attention blocks' old names."""
        return rename_legacy_attention_keys(state)
