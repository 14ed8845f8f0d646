"""``genext.patch``: genext's kernels inside the diffusers models users already have.

``patch(model)`` walks a model (or a pipeline's modules) in place and routes

- each diffusers ``ResnetBlock2D``'s ``norm1`` + SiLU and ``norm2`` + SiLU, and a UNet's or VAE
  encoder's/decoder's ``conv_norm_out`` + ``conv_act``, to genext's fused GroupNorm + SiLU;
- every other ``nn.GroupNorm`` to genext's GroupNorm (the same kernel without the SiLU);
- every diffusers ``Attention`` that uses ``AttnProcessor2_0`` to :class:`GenextAttnProcessor`,
  which calls genext's flash attention.

Modules change class (to a subclass with a genext ``forward``) or processor, nothing else:
parameters, buffers and ``state_dict`` keys are untouched. ``unpatch`` sets the original classes
and processors back; ``patch_report`` says what was routed and what was not, and why. A module
whose ``forward`` a hook wrapper replaced (diffusers' or accelerate's offloading) is left as it
is, since a class swap would not reach it; ``unpatch`` refuses while hooks installed after
``patch`` wrap a patched forward.
diffusers is never imported here: its classes are recognised by the module and name of the class
that defines their ``forward``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TypeVar

from torch import nn

from ._attention import GenextAttnProcessor, attention
from ._norms import (
    GroupNormForward,
    GroupNormSiLUForward,
    SiLUFusedAwayForward,
    is_plain_group_norm,
    norm_out_pair,
)
from ._resnet import ResnetBlock2DForward, resnet_block
from ._swap import (
    CALL_FALLBACKS,
    HOOKED,
    Patched,
    drop_own_forward,
    forward_replaced,
    holds_patched_forward,
    original_class,
    swap,
    unswap,
)

__all__ = ["GenextAttnProcessor", "PatchReport", "patch", "patch_report", "unpatch"]

T = TypeVar("T")


def _roots(model: object, fn: str) -> list[tuple[str, nn.Module]]:
    """(prefix, module) for a module, or for each module a pipeline holds (its ``components``,
    else its attributes)."""
    if isinstance(model, nn.Module):
        return [("", model)]
    held = getattr(model, "components", None)
    if not isinstance(held, dict):
        held = vars(model) if hasattr(model, "__dict__") else {}
    roots = [(f"{k}.", v) for k, v in held.items() if isinstance(v, nn.Module)]
    if not roots:
        raise TypeError(
            f"genext.{fn}: model must be a torch.nn.Module or an object holding modules (a "
            f"diffusers pipeline), got {type(model).__name__} holding none"
        )
    return roots


def _modules(model: object, fn: str):
    """(qualified name, module) of every module under ``model``, each once."""
    seen: set[int] = set()
    for prefix, root in _roots(model, fn):
        for name, m in root.named_modules():
            if id(m) not in seen:
                seen.add(id(m))
                yield (prefix + name).rstrip(".") or original_class(root).__name__, m


def patch(model: T) -> T:
    """Routes ``model``'s GroupNorm(+SiLU) and attention to genext's kernels, in place; returns
    ``model`` (as ``Module.to`` does). ``model``: a ``torch.nn.Module`` (``UNet2DModel``,
    ``UNet2DConditionModel``, ``AutoencoderKL``, ``VQModel``, or any module holding them) or a
    pipeline (its ``components``). Patching a patched model changes nothing. What could not be
    routed is left as it was; :func:`patch_report` lists it."""
    mods = list(_modules(model, "patch"))
    claimed: set[int] = set()  # norms a patched forward calls through genext itself
    for _, m in mods:
        drop_own_forward(m)  # left by removed hooks; the same forward, but it reads as a hook
    for _, m in mods:
        if resnet_block(m) == "":
            swap(m, ResnetBlock2DForward)
            claimed |= {id(m.norm1), id(m.norm2)}
        elif norm_out_pair(m) == "":
            swap(m.conv_norm_out, GroupNormSiLUForward)
            swap(m.conv_act, SiLUFusedAwayForward)
            claimed.add(id(m.conv_norm_out))
        elif attention(m) == "" and not isinstance(m.processor, GenextAttnProcessor):
            m.set_processor(GenextAttnProcessor(m.processor))
    for _, m in mods:
        if is_plain_group_norm(m) and id(m) not in claimed and not forward_replaced(m):
            swap(m, GroupNormForward)
    return model


def unpatch(model: T) -> T:
    """Sets back the classes and attention processors :func:`patch` replaced; returns ``model``.
    A model that was never patched is returned unchanged.

    Raises ``RuntimeError``, changing nothing, when a hook installed after patching (group or
    sequential offloading enabled later) wraps a patched module's forward: the hook would keep
    calling genext's forward after the class is set back, and a fused ``conv_norm_out`` would
    apply the SiLU that the restored ``conv_act`` applies again. Remove the hooks, unpatch, then
    install them again."""
    mods = list(_modules(model, "unpatch"))
    held = [name for name, m in mods if holds_patched_forward(m)]
    if held:
        raise RuntimeError(
            "genext.unpatch: hooks installed after genext.patch (offloading?) wrap the patched "
            f"forward of {', '.join(held)}; remove the hooks first (diffusers' "
            "HookRegistry.remove_hook, accelerate's remove_hook_from_module), then unpatch"
        )
    for _, m in mods:
        unswap(m)
        CALL_FALLBACKS.pop(m, None)  # the counts of norms a patched ResNet block called
        proc = getattr(m, "processor", None)
        if isinstance(proc, GenextAttnProcessor):
            m.set_processor(proc.original)
        # the processors diffusers' fuse_qkv_projections saved for unfuse_qkv_projections
        saved = getattr(m, "original_attn_processors", None)
        if isinstance(saved, dict):
            for k, p in saved.items():
                if isinstance(p, GenextAttnProcessor):
                    saved[k] = p.original
    return model


@dataclass
class Fallback:
    """A module (or a call of it) that runs diffusers'/PyTorch's code, and why."""

    name: str
    kind: str
    reason: str
    calls: int = 0  # for per-call fallbacks: how many calls


@dataclass
class PatchReport:
    """What :func:`patch` routed to genext and what it left to PyTorch.

    ``routed``: counts per kind: ``group_norm_silu`` (GroupNorm + SiLU pairs fused),
    ``group_norm`` (GroupNorms without SiLU), ``attention`` (attention modules on genext's
    processor). ``fallbacks``: modules left as they were, with the reason. ``calls``: outcomes of
    the calls made so far, outside torch.compile: attention calls served by genext and by
    PyTorch (with the reason), GroupNorm calls PyTorch served (with the reason);
    ``call_fallbacks`` names the modules behind the PyTorch ones."""

    routed: Counter = field(default_factory=Counter)
    fallbacks: list[Fallback] = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)
    call_fallbacks: list[Fallback] = field(default_factory=list)

    def __str__(self) -> str:
        lines = ["genext.patch report"]
        kinds = ("group_norm_silu", "group_norm", "attention")
        lines += [f"  routed {k}: {self.routed[k]}" for k in kinds]
        lines.append(f"  fallbacks: {len(self.fallbacks)}")
        lines += [f"    {f.name} ({f.kind}): {f.reason}" for f in self.fallbacks]
        if self.calls:
            lines.append("  calls so far:")
            lines += [f"    {k}: {n}" for k, n in sorted(self.calls.items())]
            lines += [
                f"    {f.name} ({f.kind}): {f.reason} x{f.calls}" for f in self.call_fallbacks
            ]
        return "\n".join(lines)


def _resnet_counts(m: nn.Module) -> Counter:
    fused_norm2 = m.time_embedding_norm != "scale_shift"
    return Counter(group_norm_silu=1 + fused_norm2, group_norm=int(not fused_norm2))


def patch_report(model: object) -> PatchReport:
    """What :func:`patch` routed in ``model`` (a module or pipeline) and what it did not."""
    rep = PatchReport()
    mods = list(_modules(model, "patch_report"))
    claimed: set[int] = set()
    for name, m in mods:
        why = resnet_block(m)
        if isinstance(m, ResnetBlock2DForward):
            rep.routed += _resnet_counts(m)
            claimed |= {id(m.norm1), id(m.norm2)}
        elif why:
            rep.fallbacks.append(Fallback(name, "resnet_block", why))
        why = norm_out_pair(m)
        if why:
            rep.fallbacks.append(Fallback(name, "conv_norm_out+conv_act", why))
        why = attention(m)
        if why is not None:
            proc = m.processor
            if isinstance(proc, GenextAttnProcessor):
                rep.routed["attention"] += 1
                rep.calls += Counter({f"attention {k}": n for k, n in proc.calls.items()})
                rep.call_fallbacks += [
                    Fallback(name, "attention call", k, n)
                    for k, n in proc.calls.items()
                    if k != "genext"
                ]
            else:
                rep.fallbacks.append(Fallback(name, "attention", why or "not patched"))
        if isinstance(m, Patched) and m._genext_kind in ("group_norm", "group_norm_silu"):
            rep.routed[m._genext_kind] += 1
        elif isinstance(m, nn.GroupNorm) and not isinstance(m, Patched):
            reason = "not patched" if is_plain_group_norm(m) else "subclass of nn.GroupNorm"
            reason = HOOKED if reason == "not patched" and forward_replaced(m) else reason
            if id(m) not in claimed:
                rep.fallbacks.append(Fallback(name, "group_norm", reason))
        for reason, n in CALL_FALLBACKS.get(m, {}).items():
            rep.calls[f"group_norm torch: {reason}"] += n
            rep.call_fallbacks.append(Fallback(name, "group_norm call", reason, n))
    return rep
