"""GroupNorm targets of ``genext.patch``: plain ``nn.GroupNorm``, a model's ``conv_norm_out`` +
``conv_act`` pair, and diffusers' ``ResnetBlock2D`` (both of its norms feed its SiLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import served_dtypes
from ..ops.group_norm_silu import group_norm_silu_unchecked
from ._swap import HOOKED, Patched, count_fallback, forward_replaced, has_hooks, runs_diffusers

_SERVED = served_dtypes("group_norm_silu")
# whether autocast is on for any device (one C call; torch.compile folds it)
_any_autocast = torch._C._is_any_autocast_enabled


def _device_kind(x: Tensor) -> str:
    """``x.device.type``, without building a device object for the common kinds."""
    return "cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type


def _why_not_served(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> str:
    """Why genext's kernel cannot compute this call exactly as ``nn.GroupNorm`` with ``weight``
    and ``bias`` would ('' if it can). Decided from shapes, dtypes and devices only, so
    torch.compile traces it; the common case costs a few attribute reads (it runs before every
    patched norm)."""
    kind = _device_kind(x)
    if x.dtype not in _SERVED.get(kind, ()):
        return f"{x.dtype} on {kind} not served"
    if not 3 <= x.dim() <= 5:
        return f"rank {x.dim()} input"
    if _any_autocast() and torch.is_autocast_enabled(kind):  # the cheap test first
        return "autocast (runs group_norm in float32)"
    for name, w in (("weight", weight), ("bias", bias)):
        if w is not None and (w.device != x.device or w.dtype not in (x.dtype, torch.float32)):
            return f"{name} {w.dtype} on {_device_kind(w)} with {x.dtype} input"
    if (weight is None) != (bias is None):
        return "a weight without a bias or a bias without a weight"
    return ""


def _param(norm: nn.GroupNorm, name: str) -> Tensor | None:
    """``norm.<name>`` for a registered parameter, read from the module's parameter dict (what
    ``nn.Module.__getattr__`` would find, without its cost); anything else (a parametrization's
    property, say) through the attribute."""
    params = norm._parameters
    return params[name] if name in params else getattr(norm, name)


def norm_act(norm: nn.GroupNorm, x: Tensor, silu: bool) -> Tensor:
    """``norm(x)``, followed by SiLU when ``silu``, in genext's fused kernel when it serves ``x``
    and in PyTorch's ops otherwise (counted as a per-call fallback of ``norm``)."""
    weight, bias = _param(norm, "weight"), _param(norm, "bias")
    why = _why_not_served(x, weight, bias)
    if not why:
        return group_norm_silu_unchecked(x, norm.num_groups, weight, bias, float(norm.eps), silu)
    count_fallback(norm, why)
    y = F.group_norm(x, norm.num_groups, weight, bias, norm.eps)
    return F.silu(y) if silu else y


def block_norm_act(norm: nn.GroupNorm, x: Tensor, act: nn.Module | None) -> Tensor:
    """``act(norm(x))`` (``norm(x)`` when ``act`` is None) for a norm a patched block calls
    itself: fused in genext's kernel, except when ``norm`` or ``act`` has hooks (offloading that
    loads the weights in a pre-hook, a user's hooks), where both run as modules so the hooks
    fire (counted as a per-call fallback of ``norm``)."""
    if has_hooks(norm) or (act is not None and has_hooks(act)):
        count_fallback(norm, "norm or its activation has hooks")
        y = norm(x)
        return y if act is None else act(y)
    return norm_act(norm, x, silu=act is not None)


class GroupNormForward(Patched):
    """``nn.GroupNorm`` on genext's kernel (activation=None)."""

    _genext_kind = "group_norm"

    def forward(self, x: Tensor) -> Tensor:
        return norm_act(self, x, silu=False)


class GroupNormSiLUForward(Patched):
    """``nn.GroupNorm`` whose output only ever feeds a SiLU: the SiLU runs here, fused."""

    _genext_kind = "group_norm_silu"

    def forward(self, x: Tensor) -> Tensor:
        return norm_act(self, x, silu=True)


class SiLUFusedAwayForward(Patched):
    """``nn.SiLU`` whose work the preceding norm does: passes its input through."""

    _genext_kind = "silu_fused_away"

    def forward(self, x: Tensor) -> Tensor:
        return x


def is_plain_group_norm(m: nn.Module) -> bool:
    """An ``nn.GroupNorm`` itself (a subclass may compute something else)."""
    return type(m) is nn.GroupNorm


# models whose forward calls ``conv_norm_out`` then ``conv_act`` on its result, and uses
# ``conv_act`` nowhere else (diffusers 0.42's source): (file under diffusers.models, class)
NORM_OUT_OWNERS = (
    ("unets.unet_2d", "UNet2DModel"),
    ("unets.unet_2d_condition", "UNet2DConditionModel"),
    ("autoencoders.vae", "Encoder"),
    ("autoencoders.vae", "Decoder"),
    ("autoencoders.vae", "MaskConditionDecoder"),
)


def norm_out_pair(m: nn.Module) -> str | None:
    """For a model of NORM_OUT_OWNERS: '' when its ``conv_norm_out`` + ``conv_act`` can be fused,
    else the reason; None for other modules."""
    if not any(runs_diffusers(m, w, q) for w, q in NORM_OUT_OWNERS):
        return None
    norm, act = getattr(m, "conv_norm_out", None), getattr(m, "conv_act", None)
    if norm is None:
        return None
    if isinstance(norm, GroupNormSiLUForward) and isinstance(act, SiLUFusedAwayForward):
        return ""
    for name, mod in (("conv_norm_out", norm), ("conv_act", act)):
        if forward_replaced(mod):
            return f"{name} {HOOKED}"
    # hooks there would see the fused output, or a pass-through
    if norm._forward_hooks or act._forward_pre_hooks or act._forward_hooks:
        return "forward hooks on conv_norm_out or conv_act"
    if not is_plain_group_norm(norm):
        return f"conv_norm_out is {type(norm).__name__}, not nn.GroupNorm"
    if type(act) is not nn.SiLU:
        return f"conv_act is {type(act).__name__}, not nn.SiLU"
    return ""
