"""VectorQuantizer: nearest-codebook quantisation (VQ-VAE, VQGAN) on the genext VQ ops.

The lookup is ``genext.ops.vq_nearest`` (no N x K distance matrix); the per-code counts and sums of
the EMA codebook update are ``genext.ops.vq_ema_update``.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.vq import vq_ema_update, vq_nearest

__all__ = ["VectorQuantizer"]

_METRICS = ("l2", "cosine")
_PEER_PREFIX = "_codebook."  # where vector-quantize-pytorch's VectorQuantize keeps its codebook


class VectorQuantizer(nn.Module):
    """Maps each ``dim``-vector of the input to its nearest entry of a learned codebook.

    Args:
        dim: D, the size of the last input dimension (channels-last input ``(..., D)``).
        codebook_size: K, the number of codes.
        decay: EMA decay of the cluster sizes and code sums (``use_ema=True``), and of the
            cluster sizes used for dead-code detection.
        commitment_weight: weight of the commitment loss ``mse(z, sg(q))`` (``sg``: stop-gradient).
        use_ema: True: the codebook is a buffer learned by exponential moving averages of the
            vectors assigned to each code (van den Oord et al. 2017, appendix). False: the
            codebook is an ``nn.Parameter`` trained by the codebook loss ``mse(q, sg(z))``,
            which is added to the returned loss.
        metric: ``"l2"`` (Euclidean distance) or ``"cosine"``. With ``"cosine"`` both sides
            are L2-normalised: the input rows are normalised inside the autograd graph (the
            straight-through gradient flows through the normalisation back to the raw input),
            the codebook rows are stored normalised (at init, after every EMA update and after
            dead-code restarts; a learnable codebook is normalised where it is used), and the
            quantised output, the losses and the EMA statistics all use the normalised vectors.
            So the output has unit-norm rows, not the input's norm.
        dead_code_threshold: in training, codes whose EMA cluster size falls below this are
            replaced by random vectors of the current batch (0 disables restarts).
        epsilon: Laplace smoothing of the cluster sizes, ``(n_k + eps) / (n + K eps) * n``,
            which keeps the division that forms each code away from zero for unused codes.
        reset_cluster_size: the cluster size (and ``embed_avg = vector * size``) given to a
            restarted code; ``None`` means ``dead_code_threshold``.
        accept_image_fmap: input ``(B, D, H, W)``; quantised output in the same layout and
            indices ``(B, H, W)``.
        sync_ema: all-reduce the per-batch counts and sums across ranks before each update and
            restart dead codes identically on every rank. ``None``: whenever torch.distributed
            is initialised with more than one rank (checked at every training forward).
        deterministic: passed to ``vq_ema_update`` (the same bits every run on CUDA).
        device, dtype: of the codebook and its statistics (float32 by default).

    Forward: ``z (..., D)`` -> ``(quantized (..., D), indices (...) int64, loss ())``.
    ``quantized`` equals the selected codebook rows exactly in value (cast to z's dtype); its
    gradient with respect to z is the identity (straight-through estimator) and it carries no
    gradient to the codebook. ``loss`` is ``commitment_weight * mse(z, sg(q))`` plus, without EMA,
    ``mse(q, sg(z))`` (means over all elements; zero for an empty input), in eval mode too. In
    training mode the codebook statistics are updated from the batch after the output has been
    formed from the codebook as it was before the update; dead codes are then detected from the
    updated cluster sizes (one host synchronisation per step when restarts are enabled).
    16-bit z is compared with the codebook cast to z's dtype (the codes as they are output); the
    codebook and its statistics stay in their own dtype. Initial codes are standard normal
    (unit-norm rows for cosine), on the scale of normalised encoder outputs.

    Buffers: ``embed`` (K, D) the codebook (a Parameter without EMA), ``cluster_size`` (K,) the
    EMA count of vectors per code (initially 1), ``embed_avg`` (K, D) the EMA of their sums
    (initially ``embed``; only with EMA). ``last_counts`` (K,) holds the last training batch's
    counts (not saved). ``nonfinite_rows`` (0-dim int64, not saved) counts the input rows that
    training forwards left out of the statistics (see below). :meth:`load_state_dict` also takes the state of vector-quantize-pytorch's
    ``VectorQuantize`` for the matching configuration (see :meth:`from_vector_quantize_pytorch`).

    Non-finite input: a row of z with a NaN or inf is quantised by ``vq_nearest``'s rule (index
    0 for a row with NaN; its loss is NaN, as any torch loss of a NaN), but in training it is
    left out of the codebook statistics (counts, sums, ``last_counts``) and of the vectors that
    restart dead codes (without EMA, out of the codebook loss's gradient), and counted in
    ``nonfinite_rows``: one bad row cannot corrupt the codebook. Nothing is raised, to keep the forward free of host synchronisation; check
    ``nonfinite_rows`` (or the loss) to notice them. Constructor arguments are validated: ``dim``
    and ``codebook_size`` positive ints, ``decay`` in [0, 1], ``epsilon`` finite and > 0,
    ``commitment_weight``, ``dead_code_threshold`` and ``reset_cluster_size`` finite and >= 0,
    ``dtype`` floating point.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        use_ema: bool = True,
        metric: str = "l2",
        dead_code_threshold: float = 0.0,
        epsilon: float = 1e-5,
        reset_cluster_size: float | None = None,
        accept_image_fmap: bool = False,
        sync_ema: bool | None = None,
        deterministic: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dim = _positive_int("dim", dim)
        codebook_size = _positive_int("codebook_size", codebook_size)
        if metric not in _METRICS:
            raise ValueError(f"VectorQuantizer: metric must be 'l2' or 'cosine', got {metric!r}")
        if not 0.0 <= decay <= 1.0:  # also rejects NaN
            raise ValueError(f"VectorQuantizer: decay must be in [0, 1], got {decay}")
        _finite("commitment_weight", commitment_weight, positive=False)
        _finite("dead_code_threshold", dead_code_threshold, positive=False)
        # epsilon > 0: with epsilon 0 an unused code's smoothed size can reach 0 and its update
        # divides by it
        _finite("epsilon", epsilon, positive=True)
        if reset_cluster_size is not None:
            _finite("reset_cluster_size", reset_cluster_size, positive=False)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"VectorQuantizer: dtype must be a floating-point dtype, got {dtype}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.decay = float(decay)
        self.commitment_weight = float(commitment_weight)
        self.use_ema = use_ema
        self.metric = metric
        self.dead_code_threshold = float(dead_code_threshold)
        self.epsilon = float(epsilon)
        self.reset_cluster_size = float(
            dead_code_threshold if reset_cluster_size is None else reset_cluster_size
        )
        self.accept_image_fmap = accept_image_fmap
        self.sync_ema = sync_ema
        self.deterministic = deterministic

        factory = {"device": device, "dtype": dtype or torch.float32}
        embed = torch.randn(codebook_size, dim, **factory)
        if metric == "cosine":
            embed = F.normalize(embed, dim=-1)
        if use_ema:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_avg", embed.clone())
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("cluster_size", torch.ones(codebook_size, **factory))
        self.register_buffer("last_counts", torch.zeros(codebook_size, **factory), persistent=False)
        self.register_buffer(
            "nonfinite_rows", torch.zeros((), dtype=torch.int64, device=device), persistent=False
        )
        self.register_load_state_dict_pre_hook(_translate_peer_state)

    # ------------------------------------------------------------------------------------------
    @property
    def codebook(self) -> Tensor:
        """The codebook ``(K, D)`` as the forward uses it (rows normalised for the cosine
        metric; a learnable cosine codebook is stored unnormalised and normalised on use)."""
        return self._codes()

    def _codes(self) -> Tensor:
        if self.metric == "cosine" and not self.use_ema:
            return F.normalize(self.embed, dim=-1)
        return self.embed

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.accept_image_fmap:
            if z.dim() != 4 or z.shape[1] != self.dim:
                raise ValueError(
                    f"VectorQuantizer: with accept_image_fmap z must be (B, {self.dim}, H, W), "
                    f"got {tuple(z.shape)}"
                )
            z = z.permute(0, 2, 3, 1)
        elif z.dim() < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer: z must be (..., {self.dim}), got {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"VectorQuantizer: z must be a floating-point tensor, got {z.dtype}")
        lead = z.shape[:-1]
        flat = z.reshape(-1, self.dim)
        if self.metric == "cosine":
            flat = F.normalize(flat, dim=-1)

        embed = self._codes()
        indices, _ = vq_nearest(flat.detach(), embed.detach().to(flat.dtype), metric=self.metric)
        q = F.embedding(indices, embed).to(flat.dtype)  # differentiable in a Parameter codebook

        # Straight-through: the value is q exactly (flat - flat.detach() is 0), d out / d z = I.
        out = q.detach() + (flat - flat.detach())

        loss = flat.new_zeros(())
        if flat.shape[0] > 0:
            if self.commitment_weight != 0:
                loss = loss + self.commitment_weight * F.mse_loss(flat, q.detach())
            if not self.use_ema:
                # a non-finite row pulls no code: its target is the code itself (zero gradient)
                ok = torch.isfinite(flat).all(dim=-1, keepdim=True)
                loss = loss + F.mse_loss(q, torch.where(ok, flat, q).detach())

        if self.training:
            self._update(indices, flat.detach())

        out = out.reshape(z.shape)
        indices = indices.reshape(lead)
        if self.accept_image_fmap:
            out = out.permute(0, 3, 1, 2)
        return out, indices, loss

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Codebook rows for ``indices (...)``: ``(..., D)``, or ``(B, D, H, W)`` for
        ``(B, H, W)`` indices with ``accept_image_fmap``. In the codebook's dtype."""
        codes = F.embedding(indices, self._codes())
        if self.accept_image_fmap:
            if indices.dim() != 3:
                raise ValueError(
                    "VectorQuantizer.indices_to_codes: with accept_image_fmap indices must be "
                    f"(B, H, W), got {tuple(indices.shape)}"
                )
            codes = codes.permute(0, 3, 1, 2)
        return codes

    # ------------------------------------------------------------------------------------------
    # usage statistics
    def _counts(self, indices: Tensor | None) -> Tensor:
        if indices is None:
            return self.last_counts
        return torch.bincount(indices.reshape(-1), minlength=self.codebook_size).to(
            self.cluster_size.dtype
        )

    def perplexity(self, indices: Tensor | None = None) -> Tensor:
        """``exp(entropy)`` of the code distribution of ``indices`` (default: the last training
        batch, all ranks together): K when all codes are used equally, 1 when one code takes
        everything (and 1 for no vectors at all)."""
        counts = self._counts(indices)
        p = counts / counts.sum().clamp(min=1)
        return torch.exp(-torch.special.xlogy(p, p).sum())

    def usage(self, indices: Tensor | None = None) -> Tensor:
        """Fraction of the K codes chosen at least once in ``indices`` (default: the last
        training batch). The running (EMA) usage per code is the ``cluster_size`` buffer."""
        counts = self._counts(indices)
        return (counts > 0).sum().to(counts.dtype) / self.codebook_size

    # ------------------------------------------------------------------------------------------
    # training-mode updates
    def _sync(self) -> bool:
        if self.sync_ema is not None:
            return self.sync_ema
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @torch.no_grad()
    def _update(self, indices: Tensor, flat: Tensor) -> None:
        sync = self._sync()
        k = self.codebook_size
        # Rows with a NaN or inf go to an extra code K whose statistics are dropped: they never
        # reach the codebook, and no host synchronisation is needed to find them.
        finite = torch.isfinite(flat).all(dim=1)
        counts, sums = vq_ema_update(
            torch.where(finite, indices, k), flat, k + 1, deterministic=self.deterministic
        )
        self.nonfinite_rows.add_(counts[k].to(torch.int64))
        counts, sums = counts[:k].to(self.cluster_size.dtype), sums[:k]
        if sync:
            if self.use_ema:
                # one all-reduce: counts as an extra column of the sums
                both = torch.cat([sums.to(counts.dtype), counts[:, None]], dim=1)
                dist.all_reduce(both)
                sums, counts = both[:, :-1], both[:, -1].contiguous()
            else:
                dist.all_reduce(counts)
        self.last_counts.copy_(counts)
        weight = 1.0 - self.decay
        self.cluster_size.lerp_(counts, weight)
        if self.use_ema:
            self.embed_avg.lerp_(sums.to(self.embed_avg.dtype), weight)
            n = self.cluster_size.sum()
            k_eps = self.codebook_size * self.epsilon
            smoothed = (self.cluster_size + self.epsilon) / (n + k_eps) * n
            new = self.embed_avg / smoothed[:, None]
            if self.metric == "cosine":
                new = F.normalize(new, dim=-1)
            self.embed.copy_(new)
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat[finite], sync)  # restart only with finite rows

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor, sync: bool) -> None:
        """Codes whose EMA cluster size is below the threshold get random distinct rows of this
        batch (of rank 0's part of it when synchronised, broadcast so that all ranks agree); with
        more dead codes than rows, a random subset of them is restarted now, the rest later."""
        dead = (self.cluster_size < self.dead_code_threshold).nonzero().squeeze(1)
        num_dead, n = dead.numel(), flat.shape[0]
        if sync:
            # cluster_size is the same on every rank; rank 0 chooses, the others receive.
            num = torch.tensor([min(num_dead, n)], device=flat.device)
            dist.broadcast(num, src=0)
            num = int(num.item())
            if num == 0:
                return
            if dist.get_rank() == 0:
                codes, vectors = self._choose_restarts(dead, flat)
            else:
                codes = dead.new_empty(num)
                vectors = flat.new_empty(num, self.dim)
            dist.broadcast(codes, src=0)
            dist.broadcast(vectors, src=0)
        else:
            if num_dead == 0 or n == 0:
                return
            codes, vectors = self._choose_restarts(dead, flat)
        vectors = vectors.to(self.embed.dtype)
        self.embed[codes] = vectors
        self.cluster_size[codes] = self.reset_cluster_size
        if self.use_ema:
            self.embed_avg[codes] = vectors * self.reset_cluster_size

    def _choose_restarts(self, dead: Tensor, flat: Tensor) -> tuple[Tensor, Tensor]:
        num = min(dead.numel(), flat.shape[0])
        if num < dead.numel():
            dead = dead[torch.randperm(dead.numel(), device=dead.device)[:num]]
        rows = torch.randperm(flat.shape[0], device=flat.device)[:num]
        return dead.contiguous(), flat[rows].contiguous()

    # ------------------------------------------------------------------------------------------
    # vector-quantize-pytorch interop
    @classmethod
    def from_vector_quantize_pytorch(cls, module: nn.Module) -> VectorQuantizer:
        """A VectorQuantizer with the configuration and state of vector-quantize-pytorch's
        ``VectorQuantize`` ``module``, on its device.

        Supported: one head without projections (``codebook_dim == dim``), Euclidean or cosine
        distance, EMA or a learnable codebook, ``decay``, ``eps``, ``commitment_weight``,
        ``threshold_ema_dead_code`` (and its reset size), ``accept_image_fmap``, a codebook
        already initialised. In eval mode the indices and quantised output are the same (up to
        the rare inputs whose two nearest codes are within fp32 rounding of each other: the peer
        computes distances as ``|x|^2 - 2 x.e + |e|^2``, genext from the differences); in
        training mode the EMA statistics and codebook are the same up to summation order. Not
        the same: the gradient (the peer uses the rotation trick by default, this module the
        straight-through estimator; the forward values agree), which batch vectors restart dead
        codes (random draws), and the loss in eval mode (the peer returns 0, this module the
        commitment loss).
        """
        unsupported = _peer_unsupported(module)
        if unsupported:
            raise ValueError(
                "VectorQuantizer.from_vector_quantize_pytorch: unsupported VectorQuantize "
                "configuration: " + ", ".join(unsupported)
            )
        cb = module._codebook
        embed = cb.embed
        out = cls(
            dim=embed.shape[-1],
            codebook_size=module.codebook_size,
            decay=cb.decay,
            commitment_weight=module.commitment_weight if module.has_commitment_loss else 0.0,
            use_ema=bool(cb.ema_update),
            metric="cosine" if cb.use_cosine_sim else "l2",
            dead_code_threshold=cb.threshold_ema_dead_code,
            epsilon=cb.eps,
            reset_cluster_size=cb.reset_cluster_size,
            accept_image_fmap=module.accept_image_fmap,
            device=embed.device,
            dtype=embed.dtype,
        )
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        return out


def _positive_int(name: str, value: Any) -> int:
    """``value`` as an int (an integer type: not a bool, not a float), checked positive."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"VectorQuantizer: {name} must be an int, got {value!r}") from None
    if v < 1:
        raise ValueError(f"VectorQuantizer: {name} must be positive, got {v}")
    return v


def _finite(name: str, value: float, positive: bool) -> None:
    """Raise ValueError unless ``value`` is a finite number >= 0 (> 0 when ``positive``)."""
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(
            f"VectorQuantizer: {name} must be a finite number {'>' if positive else '>='} 0, "
            f"got {value}"
        )


def _peer_unsupported(module: nn.Module) -> list[str]:
    """Options of a vector-quantize-pytorch VectorQuantize that this module does not reproduce."""
    cb = getattr(module, "_codebook", None)
    if cb is None or not hasattr(cb, "embed"):
        return ["not a vector_quantize_pytorch.VectorQuantize"]
    bad = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            bad.append(what)

    check(getattr(module, "heads", 1) == 1, "heads > 1")
    check(not getattr(module, "has_projections", False), "codebook_dim != dim (projections)")
    check(getattr(cb, "num_codebooks", 1) == 1, "separate codebooks per head")
    check(not getattr(module, "accept_3d_fmap", False), "accept_3d_fmap")
    check(
        getattr(module, "channel_last", True) or getattr(module, "accept_image_fmap", False),
        "channel_last=False",
    )
    check(not getattr(cb, "affine_param", False), "affine_param")
    check(bool(getattr(cb, "initted", True)), "k-means initialisation not yet run")
    check(not getattr(module, "directional_reparam", False), "directional_reparam")
    check(getattr(cb, "vq_bridge", None) is None, "vq_bridge")
    check(not getattr(cb, "manual_ema_update", False), "manual_ema_update")
    check(
        getattr(module, "in_place_codebook_optimizer", None) is None, "in_place_codebook_optimizer"
    )
    check(getattr(module, "sync_update_v", 0.0) == 0.0, "sync_update_v")
    check(
        not getattr(module, "commitment_use_cross_entropy_loss", False),
        "commitment_use_cross_entropy_loss",
    )
    check(not getattr(module, "has_codebook_orthogonal_loss", False), "orthogonal_reg_weight")
    check(
        not getattr(module, "has_codebook_diversity_loss", False), "codebook_diversity_loss_weight"
    )
    sample = getattr(cb, "gumbel_sample", None)
    keywords = getattr(sample, "keywords", {}) or {}
    check(not keywords.get("stochastic", False), "stochastic_sample_codes")
    check(not keywords.get("straight_through", False), "straight_through (Gumbel)")
    learnable = isinstance(cb.embed, nn.Parameter)
    check(
        learnable != bool(getattr(cb, "ema_update", True)), "EMA and a learnable codebook together"
    )
    return bad


def _translate_peer_state(
    module: VectorQuantizer,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load-state pre-hook: rewrites vector-quantize-pytorch's ``_codebook.{embed, cluster_size,
    embed_avg}`` (with a leading codebook dimension of 1) to this module's keys and drops its
    ``_codebook.initted`` flag (an uninitialised peer codebook is an error)."""
    peer = prefix + _PEER_PREFIX
    if peer + "embed" not in state_dict:
        return
    initted = state_dict.pop(peer + "initted", None)
    if initted is not None and not bool(initted):
        error_msgs.append(
            "vector-quantize-pytorch state with an uninitialised (k-means) codebook: run one "
            "forward in training mode first"
        )
    for name in ("embed", "cluster_size", "embed_avg"):
        value = state_dict.pop(peer + name, None)
        if value is None:
            continue
        if value.shape[0] != 1:
            error_msgs.append(
                f"vector-quantize-pytorch state {peer + name} has {value.shape[0]} codebooks; "
                "only one is supported"
            )
            continue
        if name == "embed_avg" and not module.use_ema:
            continue  # the peer keeps it even without EMA
        state_dict[prefix + name] = value[0]
