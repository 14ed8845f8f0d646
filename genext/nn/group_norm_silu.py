"""GroupNormSiLU: ``nn.GroupNorm`` followed by ``nn.SiLU``, fused into one genext op."""

from __future__ import annotations

import operator

import torch
from torch import Tensor, nn

from ..ops.group_norm_silu import group_norm_silu


class GroupNormSiLU(nn.GroupNorm):
    """A drop-in for ``nn.Sequential(nn.GroupNorm(...), nn.SiLU())`` in one kernel.

    Same constructor arguments and ``state_dict`` keys (``weight``, ``bias``) as ``nn.GroupNorm``,
    so a GroupNorm's state loads into it directly. ``activation=None`` gives plain GroupNorm.
    Input ``(N, C, *)`` of any rank from 2, as ``nn.GroupNorm`` takes: the kernel sees 1 to 3
    spatial dims (contiguous or channels-last); a rank-2 ``(N, C)`` input is one position per
    channel, and more than 3 spatial dims are flattened into one (statistics are over whole
    groups, so the result is the same).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        activation: str | None = "silu",
    ) -> None:
        if activation not in ("silu", None):
            raise ValueError(
                f"GroupNormSiLU: activation must be 'silu' or None, got {activation!r}"
            )
        # checked here, not left to nn.GroupNorm: it divides by zero for 0 groups and accepts a
        # negative count or eps, which would fail only at the first forward
        try:
            if isinstance(num_groups, bool):
                raise TypeError
            num_groups = operator.index(num_groups)  # ints and numpy integers, as nn.GroupNorm
        except TypeError:
            raise TypeError(
                f"GroupNormSiLU: num_groups must be an int, got {type(num_groups).__name__}"
            ) from None
        if num_groups < 1:
            raise ValueError(f"GroupNormSiLU: num_groups must be positive, got {num_groups}")
        if not eps >= 0:
            raise ValueError(f"GroupNormSiLU: eps must be non-negative, got {eps}")
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm, activation: str | None = "silu") -> GroupNormSiLU:
        """A GroupNormSiLU with ``gn``'s configuration, device, dtype and parameters."""
        p = gn.weight if gn.affine else None
        out = cls(
            gn.num_groups,
            gn.num_channels,
            gn.eps,
            gn.affine,
            device=p.device if p is not None else None,
            dtype=p.dtype if p is not None else None,
            activation=activation,
        )
        out.load_state_dict(gn.state_dict())
        return out

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2 or x.dim() > 5:
            flat = x.reshape(x.shape[0], x.shape[1], -1) if x.dim() > 2 else x.unsqueeze(-1)
            return self._fused(flat).reshape(x.shape)
        return self._fused(x)

    def _fused(self, x: Tensor) -> Tensor:
        return group_norm_silu(
            x, self.num_groups, self.weight, self.bias, self.eps, self.activation
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"
