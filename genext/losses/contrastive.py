"""Contrastive losses with open_clip's interface, on genext's tiled ops.

:class:`ClipLoss` and :class:`SigLipLoss` take the same constructor arguments and ``forward`` call
as ``open_clip.loss.ClipLoss`` / ``open_clip.loss.SigLipLoss`` and give the same values and
gradients. Each local computation is one call of :func:`genext.ops.clip_loss` or
:func:`genext.ops.siglip_loss`, so no N x N logits matrix is built; this module only moves
features between ranks with torch.distributed.

Distributed semantics (``world_size > 1``; every rank must hold the same number of rows, as
all_gather requires; ``rank``/``world_size`` are taken from the constructor, not from the process
group):

ClipLoss
    ``local_loss=False``: every rank computes the whole loss over the gathered features (N x N,
    both directions), so every rank returns the same value.
    ``local_loss=True``: a rank computes image->text for its own images against all texts and
    text->image for its own texts against all images (positives offset by ``n * rank``) and
    returns the average of the two; the mean over ranks is the global loss.
    ``gather_with_grad=True``: the gather carries gradients back to the rank that owns each row
    (torch.distributed.nn.all_gather, summed over ranks in backward).
    ``gather_with_grad=False``: the gathered copies are constants. With ``local_loss=False`` the
    rank's own slot is replaced by its live features, so a rank's features get the gradient of
    the global loss through every place they appear; with ``local_loss=True`` they get it only
    through their rows (images as queries of image->text, texts as queries of text->image).

SigLipLoss
    A rank's loss is the sigmoid loss of its images against its own texts (positives on the
    diagonal) plus, for every other rank's texts, the negative-only loss; each block is divided
    by the local batch size, so the mean over ranks is the loss of the concatenated batch.
    Texts travel with gradients: ``"bidir"`` exchanges with both neighbours at once (ceil of
    (world_size - 1) / 2 rounds), ``"shift"`` passes them around the ring (world_size - 1
    rounds), ``"reduce"`` sums one rank's texts at a time with all_reduce, ``"gather"`` all-gathers
    them at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import ops

__all__ = ["ClipLoss", "SigLipLoss"]

Scalar = Tensor | float


def _as_tensor(x: Scalar, like: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.tensor(float(x), dtype=like.dtype, device=like.device)


def _check_and_scalars(
    name: str,
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Scalar,
    logit_bias: Scalar | None,
):
    """Checks the features (matching pairs, (N, D) each) and returns logit_scale and logit_bias
    as tensors (bias None stays None)."""
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise ValueError(
            f"{name}: image_features and text_features must be (N, D), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"{name}: image_features and text_features must have the same number of rows "
            f"(the matching pairs), got {image_features.shape[0]} and {text_features.shape[0]}"
        )
    scale = _as_tensor(logit_scale, image_features)
    bias = _as_tensor(logit_bias, image_features) if logit_bias is not None else None
    return scale, bias


# ---- collectives -------------------------------------------------------------------------------


def _gather_constant(x: Tensor, world_size: int) -> list[Tensor]:
    """All ranks' copies of x, without a gradient path."""
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x)
    return parts


def _p2p(sends: list[tuple[Tensor, int]], recv_from: list[int], like: Tensor) -> list[Tensor]:
    """Post every send and receive at once, wait for all; returns the received tensors."""
    received = [torch.empty_like(like) for _ in recv_from]
    p2p_ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    p2p_ops += [dist.P2POp(dist.irecv, buf, peer) for buf, peer in zip(received, recv_from)]
    for req in dist.batch_isend_irecv(p2p_ops):
        req.wait()
    return received


class _RingShift(torch.autograd.Function):
    """Send x to rank `dst`, return what rank `src` sent; backward sends the gradient the other
    way round."""

    @staticmethod
    def forward(ctx, x: Tensor, dst: int, src: int) -> Tensor:
        ctx.dst, ctx.src = dst, src
        return _p2p([(x, dst)], [src], x)[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        # the gradient of what we received belongs to `src`; ours comes back from `dst`
        return _p2p([(grad, ctx.src)], [ctx.dst], grad)[0], None, None


class _BidirShift(torch.autograd.Function):
    """Send to_left to rank `left` and to_right to rank `right` at once; returns
    (what `right` sent leftwards, what `left` sent rightwards)."""

    @staticmethod
    def forward(ctx, to_left: Tensor, to_right: Tensor, left: int, right: int):
        ctx.left, ctx.right = left, right
        from_right, from_left = _p2p([(to_right, right), (to_left, left)], [right, left], to_left)
        return from_right, from_left

    @staticmethod
    def backward(ctx, grad_from_right: Tensor, grad_from_left: Tensor):
        # each received tensor's gradient goes back to its sender; the neighbours do the same, so
        # `left` returns the gradient of to_left and `right` that of to_right
        grad_to_left, grad_to_right = _p2p(
            [(grad_from_right, ctx.right), (grad_from_left, ctx.left)],
            [ctx.left, ctx.right],
            grad_from_right,
        )
        return grad_to_left, grad_to_right, None, None


# ---- ClipLoss ----------------------------------------------------------------------------------


class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE loss, as ``open_clip.loss.ClipLoss``.

    forward(image_features (n, D), text_features (n, D), logit_scale (one-element tensor, already
    exponentiated), logit_bias (one-element tensor or None), output_dict) returns the 0-dim loss
    (or ``{"contrastive_loss": loss}``): the mean of the image->text and text->image
    cross-entropies over ``logit_scale * I T^T + logit_bias`` with the matching pairs as labels.
    fp32, fp16, bf16 (and fp64 where the op has a kernel). See the module docstring for the
    distributed modes. ``cache_labels`` is accepted for compatibility and has no effect (the op
    takes the label offset, no label tensor is built); horovod is not supported.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
    ) -> None:
        super().__init__()
        if use_horovod:
            raise NotImplementedError(
                "ClipLoss: use_horovod is not supported; use torch.distributed"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"ClipLoss: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod

    def _gather(self, x: Tensor) -> Tensor:
        if self.gather_with_grad:
            return torch.cat(torch.distributed.nn.all_gather(x), dim=0)
        parts = _gather_constant(x, self.world_size)
        if not self.local_loss:
            parts[self.rank] = x  # the live features in this rank's slot carry its gradient
        return torch.cat(parts, dim=0)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Scalar,
        logit_bias: Scalar | None = None,
        output_dict: bool = False,
    ):
        logit_scale, logit_bias = _check_and_scalars(
            "ClipLoss", image_features, text_features, logit_scale, logit_bias
        )

        if self.world_size == 1:
            loss = ops.clip_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            all_images = self._gather(image_features)
            all_texts = self._gather(text_features)
            if self.local_loss:
                offset = image_features.shape[0] * self.rank
                loss = 0.5 * (
                    ops.clip_loss(
                        image_features, all_texts, logit_scale, logit_bias, labels_offset=offset
                    )
                    + ops.clip_loss(
                        text_features, all_images, logit_scale, logit_bias, labels_offset=offset
                    )
                )
            else:
                loss = ops.clip_loss(all_images, all_texts, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


# ---- SigLipLoss --------------------------------------------------------------------------------


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss, as ``open_clip.loss.SigLipLoss``.

    forward(image_features (n, D), text_features (n, D), logit_scale (one-element tensor, already
    exponentiated), logit_bias (one-element tensor or None), output_dict) returns the 0-dim loss
    ``-sum_ij log sigmoid(z_ij * (logit_scale * I_i . T_j + logit_bias)) / n`` with z = +1 for the
    matching pairs and -1 otherwise (or ``{"contrastive_loss": loss}``). With ``world_size > 1``
    the negatives against every other rank's texts are added (see the module docstring).
    ``dist_impl`` None means "bidir", as in open_clip; ``cache_labels`` has no effect.
    """

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
    ) -> None:
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in self.DIST_IMPLS:
            raise ValueError(
                f"SigLipLoss: dist_impl must be one of {self.DIST_IMPLS}, got {dist_impl!r}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"SigLipLoss: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Scalar,
        logit_bias: Scalar | None = None,
        output_dict: bool = False,
    ):
        logit_scale, logit_bias = _check_and_scalars(
            "SigLipLoss", image_features, text_features, logit_scale, logit_bias
        )

        def negatives(texts: Tensor) -> Tensor:
            return ops.siglip_loss(
                image_features, texts, logit_scale, logit_bias, negative_only=True
            )

        if self.world_size == 1 or self.dist_impl != "reduce":
            loss = ops.siglip_loss(image_features, text_features, logit_scale, logit_bias)
        if self.world_size == 1:
            return {"contrastive_loss": loss} if output_dict else loss

        world, rank = self.world_size, self.rank
        right, left = (rank + 1) % world, (rank - 1) % world
        if self.dist_impl == "bidir":
            to_left = to_right = text_features
            rounds, odd = divmod(world - 1, 2)
            for _ in range(rounds):
                from_right, from_left = _BidirShift.apply(to_left, to_right, left, right)
                loss = loss + negatives(from_right) + negatives(from_left)
                to_left, to_right = from_right, from_left
            if odd:  # the one rank left over sits opposite: one more step to the right
                loss = loss + negatives(_RingShift.apply(to_right, right, left))
        elif self.dist_impl == "shift":
            texts = text_features
            for _ in range(world - 1):
                texts = _RingShift.apply(texts, right, left)
                loss = loss + negatives(texts)
        elif self.dist_impl == "reduce":
            # one round per owner: every rank contributes zeros except the owner. Every rank uses
            # every round's result (its own round for the positive block), so all ranks run the
            # backward all_reduce of every round.
            loss = None
            for owner in range(world):
                texts = torch.distributed.nn.all_reduce(text_features * float(owner == rank))
                block = (
                    ops.siglip_loss(image_features, texts, logit_scale, logit_bias)
                    if owner == rank
                    else negatives(texts)
                )
                loss = block if loss is None else loss + block
        else:  # gather
            all_texts = torch.distributed.nn.all_gather(text_features)
            for owner in range(world):
                if owner != rank:
                    loss = loss + negatives(all_texts[owner])
        return {"contrastive_loss": loss} if output_dict else loss
