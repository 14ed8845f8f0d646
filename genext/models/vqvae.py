"""VQModel: diffusers' VQ-VAE (the VQGAN-style autoencoder of latent diffusion) on genext's kernels,
with the nearest-code search of :func:`genext.ops.vq_nearest` (no N x K distance matrix).

Same config, ``state_dict`` keys (``quantize.embedding.weight`` included) and outputs as
diffusers' ``VQModel``; token ids in and out (:meth:`VQModel.encode_to_indices`,
:meth:`VQModel.decode_indices`) for autoregressive models over the codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..ops.vq import vq_nearest
from ._config import ModelOutput, PeerConfigMixin
from .vae import Decoder, DecoderOutput, Encoder

__all__ = ["CodebookQuantizer", "VQEncoderOutput", "VQModel"]


class VQEncoderOutput(ModelOutput):
    """``latents (B, vq_embed_dim, h, w)``: the encoder's output before quantisation."""

    _fields = ("latents",)


class CodebookQuantizer(nn.Module):
    """diffusers' VQ-VAE quantiser (``VectorQuantizer`` of ``diffusers.models.autoencoders.vae``,
    without index remapping): a learned ``embedding`` (``nn.Embedding(n_e, vq_embed_dim)``) and
    the nearest code of every position by Euclidean distance, found by genext's ``vq_nearest``.

    ``forward(z (B, D, h, w)) -> (z_q (B, D, h, w), loss (), (None, None, indices (B*h*w,)))``:
    ``z_q`` carries the straight-through gradient to ``z``; ``loss`` is diffusers' (``legacy``:
    ``mse(sg(z_q), z) + beta * mse(z_q, sg(z))``, otherwise beta on the first term), so the
    codebook learns from it.
    """

    def __init__(self, n_e: int, vq_embed_dim: int, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.n_e, self.vq_embed_dim, self.beta, self.legacy = n_e, vq_embed_dim, beta, legacy
        self.embedding = nn.Embedding(n_e, vq_embed_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / n_e, 1.0 / n_e)

    def nearest(self, z: Tensor) -> Tensor:
        """Indices ``(B, h, w)`` of the nearest codes of ``z (B, D, h, w)``."""
        codebook = self.embedding.weight.detach().to(z.dtype)
        idx, _ = vq_nearest(z.detach().permute(0, 2, 3, 1).contiguous(), codebook)
        return idx

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, tuple[None, None, Tensor]]:
        idx = self.nearest(z)
        zl = z.permute(0, 2, 3, 1)
        zq = self.embedding(idx)
        commit = torch.mean((zq.detach() - zl) ** 2)
        codebook = torch.mean((zq - zl.detach()) ** 2)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        zq = zl + (zq - zl).detach()
        return zq.permute(0, 3, 1, 2).contiguous(), loss, (None, None, idx.reshape(-1))

    def get_codebook_entry(self, indices: Tensor, shape: Sequence[int] | None) -> Tensor:
        """The codes of ``indices``; with ``shape = (B, h, w, D)`` as an image ``(B, D, h, w)``."""
        zq = self.embedding(indices)
        if shape is not None:
            zq = zq.view(*shape).permute(0, 3, 1, 2).contiguous()
        return zq


class VQModel(PeerConfigMixin, nn.Module):
    """diffusers' ``VQModel`` (same constructor arguments, config fields and ``state_dict`` keys)
    with genext's GroupNorm+SiLU, attention and nearest-code kernels.

    ``encode(x (B, in_channels, H, W)).latents`` is ``(B, vq_embed_dim, H / f, W / f)`` before
    quantisation, ``f = 2 ** (len(block_out_channels) - 1)``; ``decode(h)`` quantises (unless
    ``force_not_quantize``) and decodes, returning ``.sample`` and ``.commit_loss``;
    ``forward(x)`` does both. ``encode_to_indices`` / ``decode_indices`` map images to code ids
    ``(B, h, w)`` and back. Only ``norm_type="group"`` (not MoVQ's spatial norm).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 3,
        sample_size: int = 32,
        num_vq_embeddings: int = 256,
        norm_num_groups: int = 32,
        vq_embed_dim: int | None = None,
        scaling_factor: float = 0.18215,
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
        lookup_from_codebook: bool = False,
        force_upcast: bool = False,
    ) -> None:
        super().__init__()
        self._record_config({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.encoder = Encoder(
            in_channels,
            latent_channels,
            down_block_types,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            act_fn,
            double_z=False,
            mid_block_add_attention=mid_block_add_attention,
        )
        dim = vq_embed_dim if vq_embed_dim is not None else latent_channels
        self.quant_conv = nn.Conv2d(latent_channels, dim, 1)
        self.quantize = CodebookQuantizer(num_vq_embeddings, dim, beta=0.25)
        self.post_quant_conv = nn.Conv2d(dim, latent_channels, 1)
        self.decoder = Decoder(
            latent_channels,
            out_channels,
            up_block_types,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            act_fn,
            norm_type=norm_type,
            mid_block_add_attention=mid_block_add_attention,
        )

    def encode(self, x: Tensor, return_dict: bool = True):
        """``VQEncoderOutput(latents=...)`` (or ``(latents,)``): the pre-quantisation latents."""
        h = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents=h) if return_dict else (h,)

    def decode(
        self,
        h: Tensor,
        force_not_quantize: bool = False,
        return_dict: bool = True,
        shape: Sequence[int] | None = None,
    ):
        """Quantise ``h`` (unless ``force_not_quantize``) and decode: ``DecoderOutput(sample,
        commit_loss)`` or ``(sample, commit_loss)``. With ``force_not_quantize`` and
        ``config.lookup_from_codebook``, ``h`` holds code indices and ``shape`` is
        ``(B, h, w, D)``, as in diffusers."""
        if not force_not_quantize:
            quant, commit_loss, _ = self.quantize(h)
        else:
            if self.config.lookup_from_codebook:
                quant = self.quantize.get_codebook_entry(h, shape)
            else:
                quant = h
            # h's dtype, as diffusers has it (int64 when h holds code indices)
            commit_loss = torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)
        dec = self.decoder(self.post_quant_conv(quant))
        return (
            DecoderOutput(sample=dec, commit_loss=commit_loss)
            if return_dict
            else (dec, commit_loss)
        )

    def forward(self, sample: Tensor, return_dict: bool = True):
        """Encode, quantise and decode ``sample``: ``DecoderOutput(sample, commit_loss)``."""
        out = self.decode(self.encode(sample).latents)
        return out if return_dict else (out.sample, out.commit_loss)

    @torch.no_grad()
    def encode_to_indices(self, x: Tensor) -> Tensor:
        """Code ids ``(B, h, w)`` int64 of images ``x (B, in_channels, H, W)``."""
        return self.quantize.nearest(self.encode(x).latents)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Images ``(B, out_channels, H, W)`` of code ids ``(B, h, w)``."""
        quant = self.quantize.embedding(indices).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(quant))
