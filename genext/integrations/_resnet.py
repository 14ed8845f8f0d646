"""diffusers' ``ResnetBlock2D`` with its GroupNorm + SiLU pairs fused (``genext.patch``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._norms import block_norm_act, is_plain_group_norm
from ._swap import HOOKED, Patched, forward_replaced, runs_diffusers


def resnet_block(m: nn.Module) -> str | None:
    """For a diffusers ``ResnetBlock2D``: '' when the genext forward reproduces it, else the
    reason; None for other modules."""
    if not runs_diffusers(m, "resnet", "ResnetBlock2D"):
        return None
    if forward_replaced(m):
        return HOOKED
    if type(m.nonlinearity) is not nn.SiLU:
        return f"nonlinearity is {type(m.nonlinearity).__name__}, not nn.SiLU"
    for name in ("norm1", "norm2"):
        if not is_plain_group_norm(getattr(m, name)):
            return f"{name} is {type(getattr(m, name)).__name__}, not nn.GroupNorm"
        if forward_replaced(getattr(m, name)):
            return f"{name} {HOOKED}"
    return ""


class ResnetBlock2DForward(Patched):
    """diffusers 0.42's ``ResnetBlock2D.forward`` with ``norm1`` + SiLU and ``norm2`` + SiLU in
    genext's fused kernel, except with time embedding norm "scale_shift", where the scale and
    shift sit between ``norm2`` and the SiLU, so ``norm2`` runs as plain genext GroupNorm (any
    other value, such as the VAE decoder's "group" without a time embedding, adds nothing there).
    The ``nonlinearity`` module keeps its other job, the SiLU on the time embedding. A norm with
    hooks (or a ``nonlinearity`` with hooks) runs unfused, through the modules, at that call."""

    _genext_kind = "resnet_block"

    def forward(self, input_tensor: Tensor, temb: Tensor | None, *args, **kwargs) -> Tensor:
        # (extra positional arguments and `scale` are deprecated by diffusers and ignored there)
        x = input_tensor
        h = block_norm_act(self.norm1, x, self.nonlinearity)
        if self.upsample is not None:
            if h.shape[0] >= 64:  # diffusers' guard for nearest upsampling of large batches
                x, h = x.contiguous(), h.contiguous()
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        h = self.conv1(h)

        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(
                    "ResnetBlock2D: temb must be given when time_embedding_norm is 'scale_shift'"
                )
            scale, shift = torch.chunk(temb, 2, dim=1)
            h = block_norm_act(self.norm2, h, None)
            h = self.nonlinearity(h * (1 + scale) + shift)
        else:
            if self.time_embedding_norm == "default" and temb is not None:
                h = h + temb
            h = block_norm_act(self.norm2, h, self.nonlinearity)

        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            # contiguous while training, as diffusers (DDP wants matching gradient strides)
            x = self.conv_shortcut(x.contiguous() if self.training else x)
        return (x + h) / self.output_scale_factor
