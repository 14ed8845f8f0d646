"""Class swapping, the mechanism of ``genext.patch``: an instance's class becomes a small subclass
whose ``forward`` runs genext's kernels, so parameters, buffers, hooks and ``state_dict`` keys
stay exactly as they were, and unpatching sets the original class back."""

from __future__ import annotations

import copyreg
import functools
from collections import Counter
from weakref import WeakKeyDictionary

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

# the reason a module whose forward a hook wrapper replaced is left unpatched
HOOKED = "forward replaced by a hook (offloading?)"

# module -> per-call fallbacks (reason -> count) of its patched forward, outside torch.compile
CALL_FALLBACKS: WeakKeyDictionary[nn.Module, Counter] = WeakKeyDictionary()


# the ``forward`` functions of the patched classes, to recognise them inside hook wrappers
_PATCHED_FORWARDS: list = []


class Patched:
    """Mixin of every swapped-in class; ``_genext_base`` is the class it was swapped from,
    ``_genext_mixin`` the mixin over it."""

    _genext_base: type
    _genext_mixin: type
    _genext_kind: str = ""  # what the report counts the module as

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            _PATCHED_FORWARDS.append(cls.__dict__["forward"])

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


def drop_own_forward(module: nn.Module) -> None:
    """Deletes an instance ``forward`` that is only the module's own class ``forward`` bound to it
    (what removing diffusers' hooks leaves behind), so the class's forward is the one that runs."""
    f = vars(module).get("forward")
    if f is not None and _is_own_forward(module, f):
        del module.forward


def _is_own_forward(module: nn.Module, f: object) -> bool:
    own = getattr(type(module), "forward", None)
    return getattr(f, "__self__", None) is module and getattr(f, "__func__", None) is own


def swap(module: nn.Module, mixin: type) -> None:
    """Makes ``module`` an instance of ``mixin`` over its own class (no-op when it already is)."""
    if not isinstance(module, Patched):
        drop_own_forward(module)
        module.__class__ = subclass(mixin, type(module))


def unswap(module: nn.Module) -> bool:
    """Sets a patched module's original class back; False when it was not patched."""
    if not isinstance(module, Patched):
        return False
    drop_own_forward(module)
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


def forward_replaced(module: nn.Module) -> bool:
    """Whether a hook wrapper replaced ``module``'s forward on the instance (diffusers' and
    accelerate's hooks, group and sequential offloading): a class swap would not reach it. A
    diffusers hook registry with no hooks left, or an instance ``forward`` that is only the
    class's own bound to the module, does not count."""
    f = vars(module).get("forward")
    registry = vars(module).get("_diffusers_hook")
    return (
        (f is not None and not _is_own_forward(module, f))
        or hasattr(module, "_hf_hook")
        or bool(getattr(registry, "hooks", registry is not None))
    )


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's ``forward``: forward (pre-)hooks of
    its own or global ones, or a forward replaced on the instance. Dict checks only, so
    torch.compile traces it."""
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or _global_forward_pre_hooks
        or _global_forward_hooks
        or "forward" in module.__dict__
    )


def holds_patched_forward(module: nn.Module) -> bool:
    """Whether a hook wrapper on ``module``'s instance holds a patched class's ``forward`` (it
    was installed after patching), looking through bound methods, ``functools.partial``,
    ``__wrapped__``, closures and accelerate's ``_old_forward``."""
    f = vars(module).get("forward")
    todo = [None if _is_own_forward(module, f) else f, vars(module).get("_old_forward")]
    seen: set[int] = set()
    while todo and len(seen) < 256:
        f = todo.pop()
        if f is None or isinstance(f, nn.Module) or id(f) in seen:
            continue
        seen.add(id(f))
        if any(f is g for g in _PATCHED_FORWARDS):
            return True
        todo += [getattr(f, "__func__", None), getattr(f, "__wrapped__", None)]
        if isinstance(f, functools.partial):
            todo += [f.func, *f.args, *f.keywords.values()]
        for cell in getattr(f, "__closure__", None) or ():
            try:
                todo.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        if not callable(f) and hasattr(f, "__dict__"):
            # an object a wrapper reads the forward from (diffusers keeps it in one)
            todo += [v for v in vars(f).values() if callable(v)]
    return False
