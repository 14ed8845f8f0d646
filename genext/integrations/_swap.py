"""Class swapping, the mechanism of ``genext.patch``: an instance's class becomes a small subclass
whose ``forward`` runs genext's kernels, so parameters, buffers, hooks and ``state_dict`` keys
stay exactly as they were, and unpatching sets the original class back."""

from __future__ import annotations

import copyreg
from collections import Counter
from weakref import WeakKeyDictionary

import torch
from torch import nn

# module -> per-call fallbacks (reason -> count) of its patched forward, outside torch.compile
CALL_FALLBACKS: WeakKeyDictionary[nn.Module, Counter] = WeakKeyDictionary()


class Patched:
    """Mixin of every swapped-in class; ``_genext_base`` is the class it was swapped from,
    ``_genext_mixin`` the mixin over it."""

    _genext_base: type
    _genext_mixin: type
    _genext_kind: str = ""  # what the report counts the module as

    def __reduce_ex__(self, protocol):
        # the swapped-in class is made at run time, so pickle (torch.save, deepcopy) names it by
        # its mixin and base, which are importable
        rv = super().__reduce_ex__(protocol)
        if rv[0] is copyreg.__newobj__ and rv[1][0] is type(self):
            cls = type(self)
            return (new_patched, (cls._genext_mixin, cls._genext_base, *rv[1][1:]), *rv[2:])
        return rv


_SUBCLASSES: dict[tuple[type, type], type] = {}


def subclass(mixin: type, base: type) -> type:
    """The class ``mixin`` over ``base`` (made once per pair)."""
    key = (mixin, base)
    if key not in _SUBCLASSES:
        name = mixin.__name__.removesuffix("Forward")
        attrs = {"_genext_base": base, "_genext_mixin": mixin, "__module__": mixin.__module__}
        _SUBCLASSES[key] = type(f"Genext{name}", (mixin, base), attrs)
    return _SUBCLASSES[key]


def new_patched(mixin: type, base: type, *args):
    """An empty instance of ``subclass(mixin, base)``, for unpickling."""
    cls = subclass(mixin, base)
    return cls.__new__(cls, *args)


def swap(module: nn.Module, mixin: type) -> None:
    """Makes ``module`` an instance of ``mixin`` over its own class (no-op when it already is)."""
    if not isinstance(module, Patched):
        module.__class__ = subclass(mixin, type(module))


def unswap(module: nn.Module) -> bool:
    """Sets a patched module's original class back; False when it was not patched."""
    if not isinstance(module, Patched):
        return False
    module.__class__ = type(module)._genext_base
    CALL_FALLBACKS.pop(module, None)
    return True


def count_fallback(module: nn.Module, reason: str) -> None:
    """Counts one call that ran PyTorch's op instead of genext's (not under torch.compile, where
    the count would be traced once rather than run per call)."""
    if not torch.compiler.is_compiling():
        CALL_FALLBACKS.setdefault(module, Counter())[reason] += 1


def defined_by(cls: type, attr: str) -> str:
    """``module.QualName`` of the class in ``cls``'s MRO that defines ``attr`` ('' if none)."""
    for c in cls.__mro__:
        if attr in c.__dict__:
            return f"{c.__module__}.{c.__qualname__}"
    return ""


def original_class(obj: object) -> type:
    """The class ``obj`` had before patching (its own class if it is not patched)."""
    return type(obj)._genext_base if isinstance(obj, Patched) else type(obj)


def runs_diffusers(obj: object, where: str, qualname: str) -> bool:
    """Whether ``obj``'s ``forward`` (``__call__`` for a non-module), before patching, is diffusers'
    own ``diffusers.models.<where>.<qualname>``'s: the code a patched forward reproduces (a
    subclass that overrides it is not)."""
    attr = "forward" if isinstance(obj, nn.Module) else "__call__"
    return defined_by(original_class(obj), attr) == f"diffusers.models.{where}.{qualname}"
