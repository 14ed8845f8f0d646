"""What every fuzz case shares: the hypothesis profile, tensors with hostile layouts and values,
and the properties each case must satisfy.

A case is an op call with arguments drawn at random, and a verdict known in advance: ``valid``
(the op must return, and match the float64 reference), ``"structural"`` (a wrong shape, dtype or
flag: the op must raise, and so must its fake kernel on meta tensors) or ``"value"`` (a wrong
value inside a tensor, e.g. a length past the capacity: the op must raise; meta tensors carry no
values, so the fake kernel may not). A raise must be a ValueError, TypeError, RuntimeError,
IndexError or NotImplementedError whose message names the public function; anything else (an
exception of another type, a raise on a valid case, a silent return on an invalid one, a NaN
where the reference is finite or a finite number where it is NaN) fails the case.

Runs in a subprocess of tests/fuzz/test_fuzz.py, so that a crash fails one test with the case
that caused it (written to $GENEXT_FUZZ_LAST before each call) instead of killing pytest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_map

from genext.ops import served_dtypes

# GENEXT_FUZZ_DEVICE=cuda: every tensor of every case on the GPU (the default device), compared
# against the float64 reference there. GENEXT_FUZZ_VALID_ONLY=1: no invalid cases (for a torch
# build whose C++ ValueError kills the process, as the GPU machine's did).
DEVICE = os.environ.get("GENEXT_FUZZ_DEVICE", "cpu")
VALID_ONLY = os.environ.get("GENEXT_FUZZ_VALID_ONLY") == "1"
if DEVICE != "cpu":
    torch.set_default_device(DEVICE)

# GENEXT_FUZZ_EXAMPLES: examples per property. By default a fixed, derandomised set: 25 in the
# full test profile (GENEXT_TESTS=full, as CI runs), 5 in the quick one; a count above 25 draws
# fresh random examples each run, for the long profile.
_CI_EXAMPLES = 25
_DEFAULT_EXAMPLES = _CI_EXAMPLES if os.environ.get("GENEXT_TESTS") == "full" else 5
EXAMPLES = int(os.environ.get("GENEXT_FUZZ_EXAMPLES", _DEFAULT_EXAMPLES))
settings.register_profile(
    "genext-fuzz",
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= _CI_EXAMPLES,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("genext-fuzz")

ACCEPTED = (ValueError, TypeError, RuntimeError, IndexError, NotImplementedError)
VALID, STRUCTURAL, VALUE = None, "structural", "value"
# a case the op may either serve (matching the reference) or reject with a clean error, e.g. a
# head dim of 0; its fake kernel must then do the same
EITHER = "either"

# elementwise tolerance against the float64 reference, relative to the reference's largest
# finite magnitude (and at least 1): outputs here are O(1) by construction
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}

NON_FINITE = (float("nan"), float("inf"), float("-inf"))


def floats(op: str) -> tuple[torch.dtype, ...]:
    """The floating dtypes ``genext::op`` serves on the fuzzed device."""
    return served_dtypes(op)[torch.device(DEVICE).type]


def mutations(*names: str, weight: int = 6):
    """Which invalid variant of a case to draw: "none" (a valid case) weight times as often as
    each of ``names``; always "none" with GENEXT_FUZZ_VALID_ONLY=1."""
    if VALID_ONLY:
        return st.just("none")
    return st.sampled_from(("none",) * weight + names)


def record(desc: str) -> None:
    """Write the case about to run where the parent test reads it if this process dies."""
    path = os.environ.get("GENEXT_FUZZ_LAST")
    if path:
        with open(path, "w") as f:
            f.write(desc)


# ---- tensors ------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "strided", "transposed", "expanded")


def reseed(draw) -> None:
    """Seed torch's generator from a drawn integer: the tensors of a case then follow from the
    drawn data alone, so hypothesis can replay and shrink it (and the values vary case to case)."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))


@st.composite
def sizes(draw, n: int, lo: int = 0, hi: int = 5) -> tuple[int, ...]:
    """n sizes, 0 and 1 drawn often."""
    return tuple(
        draw(st.one_of(st.sampled_from([0, 1, 1, 2]), st.integers(lo, hi))) for _ in range(n)
    )


def make(
    shape: Sequence[int],
    dtype: torch.dtype,
    layout: str = "contiguous",
    keep_last: bool = False,
    gen: torch.Generator | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Random normal values of ``shape`` in ``dtype`` (drawn in float64, then rounded), laid out as
    ``layout``: contiguous; ``strided`` (every other element of a larger buffer along the first
    dim of size > 1 that keep_last allows); ``transposed`` (dims 0 and -1 swapped in memory, or
    0 and -2 with keep_last); ``expanded`` (stride 0 along the first dim, every row equal)."""
    shape = tuple(shape)
    if dtype.is_floating_point:

        def draw_values(s):
            return (torch.randn(s, dtype=torch.float64, generator=gen) * scale).to(dtype)
    else:

        def draw_values(s):
            return torch.randint(-3, 4, s, generator=gen).to(dtype)

    if layout == "expanded" and len(shape) >= 1:
        return draw_values((1, *shape[1:])).expand(shape)
    if layout == "strided" and len(shape) >= 1:
        dims = range(len(shape) - 1 if keep_last else len(shape))
        for d in dims:
            big = list(shape)
            big[d] = 2 * shape[d]
            return draw_values(tuple(big)).narrow(d, 0, 2 * shape[d])[
                (slice(None),) * d + (slice(None, None, 2),)
            ]
    if layout == "transposed" and len(shape) >= 2:
        a, b = (0, len(shape) - 2) if keep_last else (0, len(shape) - 1)
        if a != b:
            perm = list(range(len(shape)))
            perm[a], perm[b] = perm[b], perm[a]
            return draw_values(tuple(shape[p] for p in perm)).permute(perm)
    return draw_values(shape)


@st.composite
def non_finite(
    draw, t: torch.Tensor, p: float = 0.15, values: tuple[float, ...] = NON_FINITE
) -> torch.Tensor:
    """t, or (with probability p) a copy with a few NaN/inf entries at drawn positions (drawn
    from ``values``)."""
    if t.numel() == 0 or not t.dtype.is_floating_point or not draw(st.floats(0, 1)) < p:
        return t
    out = t.clone()
    flat = out.view(-1) if out.is_contiguous() else None
    if flat is None:
        out = out.contiguous()
        flat = out.view(-1)
    for _ in range(draw(st.integers(1, 3))):
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(values))
    return out


# ---- properties ---------------------------------------------------------------------------------


def call(name: str, fn: Callable[[], Any], verdict: str | None, desc: str = "") -> Any:
    """Run ``fn``; return its result for a valid case, None after an accepted raise on an
    invalid one; fail otherwise."""
    record(f"{name}: {desc}")
    try:
        out = fn()
    except ACCEPTED as e:
        msg = str(e)
        assert verdict is not VALID, (
            f"{name} raised on a valid case ({desc}): {type(e).__name__}: {msg}"
        )
        assert name in msg, f"{name}'s error does not name it ({desc}): {type(e).__name__}: {msg}"
        return None
    assert verdict in (VALID, EITHER), f"{name} accepted an invalid ({verdict}) case: {desc}"
    return out


def assert_matches(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    extra_nan: bool = False,
    loosen: float = 1.0,
) -> None:
    """out equals the float64 reference ref: same shape, NaN exactly where ref is NaN, the same
    infinities, and finite values within TOL[dtype] of ref's largest finite magnitude.
    ``extra_nan``: out may also be NaN where ref is not (a documented limit; never finite where
    ref is NaN); those entries are not compared. ``loosen``: a factor on the tolerance, for a
    computation whose rounding error the inputs amplify (a large softmax scale)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    on, rn = o.isnan(), r.isnan()
    if extra_nan:
        assert on[rn].all(), f"{what}: finite where the reference is NaN"
        o, r = o[~on], r[~on]
        on, rn = o.isnan(), r.isnan()
    assert torch.equal(on, rn), (
        f"{what}: NaN at {on.nonzero()[:4].tolist()} vs reference {rn.nonzero()[:4].tolist()}"
    )
    oi, ri = o.isinf(), r.isinf()
    assert torch.equal(oi, ri), (
        f"{what}: inf at {oi.nonzero()[:4].tolist()} vs reference {ri.nonzero()[:4].tolist()}"
    )
    assert torch.equal(o[oi], r[ri]), f"{what}: infinities of different signs"
    fin = ~(rn | ri)
    if fin.any():
        big = max(r[fin].abs().max().item(), 1.0)
        err = (o[fin] - r[fin]).abs().max().item()
        tol = TOL[dtype] * loosen
        assert err <= tol * big, f"{what}: max error {err:.3g} > {tol:.3g} * {big:.3g}"


def _to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def check_meta(
    name: str,
    fn: Callable[..., Any],
    args: Sequence[Any],
    verdict: str | None,
    cpu_out: Any,
    desc: str = "",
) -> None:
    """The fake kernels agree with the real ones.

    All arguments on meta: a valid case gives outputs of the real shapes and dtypes; a structural
    error raises the same exception type. Each tensor argument alone on meta beside real ones
    (the dispatcher then picks the fake kernel): a valid case must raise, naming ``name``.
    ``args`` are positional; a list or tuple of tensors inside counts as one argument per tensor.
    """
    record(f"{name} (meta): {desc}")
    meta_args = tree_map(_to_meta, list(args))
    try:
        meta_out = fn(*meta_args)
        raised = None
    except ACCEPTED as e:
        raised = e
    if verdict == EITHER:
        verdict = STRUCTURAL if cpu_out is None else VALID
    if verdict is VALID:
        assert raised is None, f"{name} on meta raised on a valid case ({desc}): {raised!r}"
        flat_cpu = [t for t in _flatten(cpu_out)]
        flat_meta = [t for t in _flatten(meta_out)]
        assert len(flat_cpu) == len(flat_meta), f"{name}: meta returns {len(flat_meta)} tensors"
        for c, m in zip(flat_cpu, flat_meta):
            assert m.device.type == "meta", f"{name}: meta call returned a {m.device} tensor"
            assert (c.shape, c.dtype) == (m.shape, m.dtype), (
                f"{name}: meta output {tuple(m.shape)} {m.dtype} != real {tuple(c.shape)} {c.dtype}"
            )
    elif verdict == STRUCTURAL:
        assert raised is not None, f"{name} on meta accepted a structural error ({desc})"
        assert name in str(raised), f"{name} on meta: error does not name it: {raised!r}"
    paths = _tensor_paths(args)
    if verdict is not VALID or len(paths) < 2:
        return
    for path, _ in paths:
        mixed = _replace(list(args), path, _to_meta)
        record(f"{name} (one meta tensor at {path}): {desc}")
        try:
            fn(*mixed)
        except ACCEPTED as e:
            assert name in str(e), f"{name}, one tensor on meta: error does not name it: {e!r}"
            continue
        raise AssertionError(f"{name} accepted argument {path} on meta beside cpu tensors ({desc})")


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    return []


def _tensor_paths(args) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    paths = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            paths.append(((i,), a))
        elif isinstance(a, (list, tuple)):
            paths += [((i, j), t) for j, t in enumerate(a) if isinstance(t, torch.Tensor)]
    return paths


def _replace(args: list, path: tuple[int, ...], f) -> list:
    if len(path) == 1:
        args[path[0]] = f(args[path[0]])
    else:
        inner = list(args[path[0]])
        inner[path[1]] = f(inner[path[1]])
        args[path[0]] = inner
    return args
