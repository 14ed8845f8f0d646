"""genext's flash attention as an attention implementation of transformers models.

After :func:`register`, ``model.set_attn_implementation("genext")``,
``from_pretrained(..., attn_implementation="genext")`` or ``config._attn_implementation =
"genext"`` before ``Model(config)`` runs a model's attention on genext's kernels. It serves the
models whose attention goes through transformers' ``AttentionInterface`` (Llama, Mistral, Qwen2,
GPT-2, CLIP, LLaVA, ...).

The masks are sdpa's: :func:`attention_mask` returns what transformers' ``sdpa_mask`` returns
(None, or a 4-D ``(B, 1, Lq, Lk)`` boolean mask), so models that post-process the mask (add a
bias, slice rows, concatenate masks) and callers that pass ``allow_is_causal_skip=False`` get
what they get under ``"sdpa"``. As in sdpa, a given 4-D mask alone decides the pattern, whatever
``module.is_causal`` says; without a mask the causal flag decides (``is_causal`` when given,
else ``module.is_causal``).

What runs on genext's kernel (:func:`genext.ops.flash_attention` or
:func:`genext.ops.flash_attention_varlen`):

- no mask, causal or not (causal is aligned to the bottom-right corner when ``Lq < Lk``, as in
  decoding with a KV cache and as transformers' flash-attention path assumes);
- a 4-D boolean mask whose values are a key mask broadcast over the queries (bidirectional:
  encoders, vision towers, cross-attention, a one-row mask sdpa broadcasts, a decode step) or a
  key mask under the bottom-right causal triangle (padding left or right or holes, with a
  dynamic, sliding-window or no cache, chunked prefill, a sliding window or chunk that hides
  nothing at these lengths). The mask's values are read once per mask tensor (the layers share
  it; an in-place change reads them again). The padded keys are dropped and the sequences run
  packed; under a causal mask the padded queries are dropped too and their output rows are 0
  (a query whose own key is masked counts as padding);
- sequences packed along a row by ``position_ids`` that restart (transformers' block-causal
  mask, checked element by element, run as varlen sequences);
- a ``(B, Lk)`` key mask passed directly (flash attention's convention: the causal flag decides);
- grouped-query attention without repeating K/V (Hk divides Hq), any ``scaling``, training with
  ``dropout == 0``.

A padded prefill thus builds sdpa's ``(B, 1, L, L)`` mask, as sdpa does, once per forward.

What goes to transformers' own ``sdpa`` function, with the mask given or, for no mask or a 2-D
one, a mask that means what genext's would (:func:`attention_backend` names the route,
:data:`calls` counts them):

- ``dropout > 0`` (training with attention dropout);
- any other 4-D mask: a sliding window or chunk that hides keys, image-token overlays, the
  prefill of a static cache (its top-left causal mask over the first keys), per-head masks,
  float (bias) masks, masks under tracing or torch.compile;
- ``sliding_window`` shorter than the keys, ``softcap`` (which transformers' sdpa rejects),
  ``position_bias``, ``output_attentions=True`` (sdpa returns no weights, as it would itself);
- shapes, dtypes or devices genext's kernel does not serve
  (:func:`genext.nn.functional.sdpa_backend`: e.g. a value head dim that differs from the
  query's, CUDA head dims not a multiple of 8), and causal attention with more queries than keys.

Attention sinks (``s_aux`` / ``sinks``) raise ``ValueError``: transformers' sdpa ignores them, so
falling back would compute something else. transformers is imported by :func:`register` and at
call time, never by ``import genext``.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.functional import sdpa_backend
from ..ops import flash_attention, flash_attention_varlen
from ..ops.flash_attention import cpu_forward_prefers_torch

__all__ = ["NAME", "attention_backend", "attention_forward", "attention_mask", "calls", "register"]

NAME = "genext"

#: How many attention calls each path took since the last ``calls.clear()``: ``"genext"`` (no
#: mask), ``"genext varlen"`` (padding), ``"sdpa: <reason>"``. Not counted under torch.compile.
calls: Counter = Counter()


def register() -> str:
    """Registers :func:`attention_forward` with transformers' ``AttentionInterface`` and
    :func:`attention_mask` with its ``AttentionMaskInterface`` under the name ``"genext"``
    (idempotent) and returns the name. Without the mask function transformers would build no
    padding mask for the name, and padding would be ignored."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)
    return NAME


def attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    **kwargs,
) -> Tensor | None:
    """transformers' mask function for ``"genext"``: what transformers' ``sdpa_mask`` returns for
    the same arguments (None, or the 4-D ``(B, 1, q_length, kv_length)`` boolean mask, True =
    attend), so a model that post-processes the mask (slices it, adds a bias to it, concatenates
    it) gets what it gets under ``"sdpa"``, and ``allow_is_causal_skip`` /
    ``allow_is_bidirectional_skip`` mean what they mean there.

    One exception, where sdpa's None would mean something else to genext: sdpa returns None for
    the prefill of a static cache (more keys than queries), meaning its top-left causal mask over
    the first ``q_length`` keys; genext reads None as bottom-right causal, so the mask is spelled
    out there. :func:`attention_forward` reads the pattern off the mask's values."""
    from transformers import masking_utils as mu

    args = dict(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function or mu.causal_mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
    )
    mask = mu.sdpa_mask(**args, **kwargs)
    if mask is None and q_length not in (1, kv_length):
        kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        mask = mu.sdpa_mask(**args, **kwargs)
    return mask


def _is_causal(module: torch.nn.Module, is_causal: bool | None) -> bool:
    # an explicit is_causal (CLIP's text model passes one) wins over the module's flag
    return bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))


#: The attribute under which _key_pattern keeps its reading of a 4-D mask, with the mask's
#: version counter: the layers of a model share one mask, so its values are read once, and an
#: in-place change to the mask makes them read again.
_MEMO = "_genext_key_pattern"


def _key_pattern(mask: Tensor, b: int, lq: int, lk: int) -> tuple[Tensor | None, bool] | None:
    """For a 4-D boolean mask ``(B or 1, 1, Lq or 1, Lk)`` that is a key mask broadcast over the
    queries (sdpa then attends bidirectionally to the kept keys) or a key mask under the causal
    triangle aligned bottom-right (the queries are the last Lq keys): ``(keep, causal)`` with
    ``keep`` the ``(B, Lk)`` key mask, None when it keeps every key. None for any other mask
    (the mask's own values decide, element by element), for non-boolean masks and under tracing."""
    from transformers.utils.import_utils import is_tracing

    if mask.dtype != torch.bool or mask.shape[1] != 1 or mask.shape[3] != lk:
        return None
    if mask.shape[0] not in (1, b) or mask.shape[2] not in (1, lq) or lq == 0 or lk == 0:
        return None
    if torch.compiler.is_compiling() or is_tracing(mask):
        return None
    # inference tensors keep no version counter: their values are read at every call
    version = None if mask.is_inference() else mask._version
    memo = getattr(mask, _MEMO, None)
    if version is not None and memo is not None and memo[:2] == (version, (b, lq)):
        return memo[2]
    rows = mask[:, 0]
    last = rows[:, -1]  # under the bottom-right causal triangle the last query sees every key
    if (
        mask.shape[2] == 1
        or mask.stride(2) == 0
        or torch.equal(rows, last.unsqueeze(1).expand_as(rows))
    ):
        found = last, False
    else:
        tri = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril(lk - lq)
        found = (last, True) if torch.equal(rows, tri & last.unsqueeze(1)) else None
    if found is not None:
        keep = found[0].expand(b, lk)
        found = (None if bool(keep.all()) else keep), found[1]
    if version is not None:
        setattr(mask, _MEMO, (version, (b, lq), found))
    return found


def _packed(mask: Tensor, lq: int, lk: int, kwargs: dict) -> tuple[Tensor, int] | None:
    """For transformers' 4-D boolean mask of sequences packed along each batch row (causal within
    each run of ``position_ids`` that count up by one, nothing across runs): the int32 cu_seqlens
    of the runs over the ``B * L`` flattened rows, and the longest run. None for any other mask
    (checked element by element against the mask itself)."""
    pos = kwargs.get("position_ids")
    b = mask.shape[0]
    if not isinstance(pos, Tensor) or mask.dtype != torch.bool or lq != lk:
        return None
    if tuple(mask.shape[1:]) != (1, lq, lk) or pos.dim() != 2 or pos.shape[1] != lq:
        return None
    if pos.shape[0] not in (1, b) or torch.compiler.is_compiling():
        return None
    pos = pos.to(mask.device).expand(b, lq)
    start = torch.ones(b, lq, dtype=torch.bool, device=mask.device)
    start[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    run = start.cumsum(dim=1)
    tri = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
    if not torch.equal(mask[:, 0], (run.unsqueeze(2) == run.unsqueeze(1)) & tri):
        return None
    first = start.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([first, first.new_full((1,), b * lq)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _plan(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
    """(route, key mask or None, causal, cu_seqlens and longest run of packed sequences or None);
    see attention_backend."""
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"genext attention: {name} (attention sinks) is not supported, and transformers' "
                "sdpa would ignore it; use attn_implementation='eager' or a flash-attention one"
            )
    b, lq, lk = query.shape[0], query.shape[2], key.shape[2]
    mask = attention_mask
    if isinstance(mask, Tensor) and mask.dim() == 2:
        if mask.is_floating_point():
            raise ValueError(
                "genext attention: a 2-D attention_mask must be a boolean or integer key mask "
                f"(nonzero = attend), got {mask.dtype}"
            )
        if tuple(mask.shape) != (b, lk):
            raise ValueError(
                f"genext attention: a 2-D attention_mask must be (batch, keys) = "
                f"{(b, lk)}, got {tuple(mask.shape)}"
            )
    # no mask or a 2-D key mask (flash-attention's convention): the causal flag decides; a 4-D
    # mask (sdpa's convention): the mask alone decides, as in sdpa, whatever the module says
    causal = _is_causal(module, is_causal)
    keep = mask
    if isinstance(keep, Tensor) and keep.dim() == 2 and keep.dtype != torch.bool:
        keep = keep != 0

    def sdpa(reason):
        return f"sdpa: {reason}", keep, causal, None

    if dropout and dropout > 0:
        return sdpa("dropout > 0")
    if kwargs.get("output_attentions"):
        return sdpa("output_attentions")
    if kwargs.get("softcap") is not None:
        return sdpa("softcap")
    if kwargs.get("position_bias") is not None:
        return sdpa("position_bias")
    window = kwargs.get("sliding_window")
    if window is not None and lk > window:
        return sdpa("sliding window")
    # the drop-in also hands some CPU calls to PyTorch where PyTorch's is the faster kernel
    # (cpu_forward_prefers_torch); genext's ops make that choice themselves, so such calls are
    # served here
    served = sdpa_backend(query, key, value, is_causal=causal, enable_gqa=True) == "genext"
    if not served and not cpu_forward_prefers_torch(query, key, value, causal=causal):
        return sdpa("shapes, dtype or device not served")
    if mask is not None and (not isinstance(mask, Tensor) or mask.dim() not in (2, 4)):
        return sdpa("mask is not a tensor of 2 or 4 dims")
    packed = None
    if isinstance(mask, Tensor) and mask.dim() == 4:
        pattern = _key_pattern(mask, b, lq, lk)
        if pattern is not None:
            keep, causal = pattern
        elif (packed := _packed(mask, lq, lk, kwargs)) is not None:
            keep, causal = None, True
        else:
            return sdpa("4-D mask")
    if causal and lq > lk:
        return sdpa("causal with more queries than keys")
    if packed is not None:
        return "genext packed", None, True, packed
    return ("genext" if keep is None else "genext varlen"), keep, causal, None


def attention_backend(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> str:
    """Which path :func:`attention_forward` takes for these arguments (the same ones): genext's
    kernel with no mask (``"genext"``), over unpadded sequences (``"genext varlen"``) or over
    sequences packed by ``position_ids`` (``"genext packed"``), or transformers' sdpa
    (``"sdpa: <reason>"``). Raises ``ValueError`` for what neither serves."""
    return _plan(module, query, key, value, attention_mask, dropout, is_causal, kwargs)[0]


def _count(what: str) -> None:
    if not torch.compiler.is_compiling():
        calls[what] += 1


def _dense_mask(keep: Tensor | None, lq: int, lk: int, causal: bool, device) -> Tensor | None:
    """The ``(B or 1, 1, Lq, Lk)`` boolean mask meaning what genext computes for a key mask (or
    None) and causal attention aligned bottom-right; None where sdpa's own reading of the inputs
    means the same (no mask and ``Lq >= Lk``: sdpa's top-left ``is_causal``)."""
    if causal and lq > 1:
        i = torch.arange(lq, device=device).unsqueeze(1)
        j = torch.arange(lk, device=device).unsqueeze(0)
        tri = (j <= i + (lk - lq)).view(1, 1, lq, lk)
        if keep is None:
            return tri if lq < lk else None
        return tri & keep[:, None, None, :]
    return None if keep is None else keep[:, None, None, :]


def _pack(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Rows of ``x`` ``(B, L, H, D)`` where ``keep`` ``(B, L)``: (packed ``(total, H, D)``, their
    flat indices, int32 cu_seqlens ``(B + 1,)``, the longest sequence)."""
    b, n = keep.shape
    idx = keep.reshape(-1).nonzero().squeeze(1)
    lengths = keep.sum(dim=1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    packed = x.reshape(b * n, *x.shape[2:]).index_select(0, idx)
    return packed, idx, cu, int(lengths.max()) if b else 0


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention function for ``"genext"``.

    Args:
        module: the model's attention module (its ``is_causal`` is used unless ``is_causal`` is
            given, and only when the mask is None or 2-D).
        query: ``(B, Hq, Lq, D)``; key, value: ``(B, Hk, Lk, D)`` with Hk dividing Hq.
        attention_mask: None (causal or not by the flag, bottom-right aligned), a 4-D mask as
            sdpa takes it (``(B or 1, 1, Lq or 1, Lk)`` boolean, True = attend, or float),
            whose values alone decide the pattern, as in sdpa; or, as flash attention takes
            it, a ``(B, Lk)`` boolean or integer (nonzero = attend) key mask with the causal
            flag deciding.
        dropout, scaling, is_causal, kwargs: as transformers passes them.

    Returns:
        ``(out (B, Lq, Hq, D), None)``. With a padding mask and causal attention, a query whose
        own key is masked is padding and its output row is 0 (sdpa leaves values there that no
        real position uses).
    """
    route, keep, causal, packed = _plan(
        module, query, key, value, attention_mask, dropout, is_causal, kwargs
    )
    _count(route)
    lq, lk = query.shape[2], key.shape[2]
    if not route.startswith("genext"):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        mask = attention_mask
        if mask is None or (isinstance(mask, Tensor) and mask.dim() == 2):
            mask = _dense_mask(keep, lq, lk, causal, query.device)
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )

    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    b, hq, d = q.shape[0], q.shape[2], q.shape[3]
    if route == "genext":
        return flash_attention(q, k, v, causal=causal, scale=scaling, layout="blhd"), None
    if route == "genext packed":
        cu, longest = packed
        out = flash_attention_varlen(
            q.reshape(b * lq, hq, d),
            k.reshape(b * lk, *k.shape[2:]),
            v.reshape(b * lk, *v.shape[2:]),
            cu,
            cu,
            longest,
            longest,
            causal=True,
            scale=scaling,
        )
        return out.view(b, lq, hq, d), None

    kp, idx_k, cu_k, max_k = _pack(k, keep)
    vp = v.reshape(b * lk, *v.shape[2:]).index_select(0, idx_k)
    if causal:
        # the queries are the last Lq keys: a padded one is dropped, so that within each packed
        # sequence the bottom-right alignment still lets a query see exactly the real keys up to
        # its own position
        qp, idx_q, cu_q, max_q = _pack(q, keep[:, lk - lq :])
    else:
        # every query sees its batch entry's real keys (cross-attention too)
        qp = q.reshape(b * lq, hq, d)
        cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
        idx_q, max_q = None, lq
    out = flash_attention_varlen(qp, kp, vp, cu_q, cu_k, max_q, max_k, causal=causal, scale=scaling)
    if idx_q is not None:
        out = out.new_zeros(b * lq, hq, d).index_copy(0, idx_q, out)
    return out.view(b, lq, hq, d), None
