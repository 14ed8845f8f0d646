"""genext.ops.vq_nearest and vq_ema_update against float64 references: random data, near ties
(duplicated codebook rows: the smallest index wins), odd sizes, K = 1, empty N, cosine, 16-bit
inputs, bad inputs, opcheck, compile; CUDA runs the same through the device fixture."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from genext import reference
from genext.ops import vq_ema_update, vq_nearest


def _ref(z: torch.Tensor, cb: torch.Tensor, metric: str):
    """float64 (indices, distances, scores): scores are squared distances (l2) or negated cosine
    similarities, smaller is nearer."""
    zd, cd = z.double(), cb.double()
    idx, dist = reference.vq_nearest(zd, cd, metric)
    return idx, dist, reference.vq_scores(zd, cd, metric)


def _check(idx, dist, z, cb, metric, tol):
    """idx must be the float64 argmin except where the two best float64 distances are within
    `tol` of each other; then it must be one of them."""
    ri, rd, score = _ref(z, cb, metric)
    assert idx.dtype == torch.int64 and idx.shape == z.shape[:-1]
    chosen = score.gather(-1, idx.cpu().view(-1, 1).to(score.device)).squeeze(-1)
    best = score.min(-1).values
    assert (chosen <= best + tol).all(), "picked a code that is not (near-)nearest"
    ok = (idx.cpu() == ri.cpu()) | ((chosen - best).cpu() <= tol)
    assert ok.all()
    assert torch.allclose(dist.double().cpu(), rd.cpu(), atol=10 * tol, rtol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "n,k,d", [(1000, 300, 72), (33, 65, 13), (7, 1, 5), (257, 129, 64), (64, 1024, 256)]
)
def test_matches_float64(metric, n, k, d, device):
    z = torch.randn(n, d, device=device)
    cb = torch.randn(k, d, device=device)
    idx, dist = vq_nearest(z, cb, metric)
    _check(idx, dist, z, cb, metric, tol=1e-4)


def test_exact_fp32_argmin_and_ties(device):
    cb = torch.randn(50, 24, device=device)
    cb = torch.cat([cb, cb[10:20]])  # rows 50..59 duplicate rows 10..19
    z = cb[torch.tensor([12, 55, 3, 19], device=device)] + 1e-3 * torch.randn(4, 24, device=device)
    idx, _ = vq_nearest(z, cb)
    assert idx.tolist()[0] == 12 and idx.tolist()[1] == 15 and idx.tolist()[3] == 19
    # exact fp32: the result equals the float64 argmin for random data (no near ties here)
    z = torch.randn(500, 24, device=device)
    idx, _ = vq_nearest(z, cb)
    assert torch.equal(idx.cpu(), _ref(z, cb, "l2")[0].cpu())


def test_leading_dims_and_empty(device):
    z = torch.randn(2, 5, 7, 16, device=device)
    cb = torch.randn(9, 16, device=device)
    idx, dist = vq_nearest(z, cb)
    assert idx.shape == (2, 5, 7) and dist.shape == (2, 5, 7)
    assert torch.equal(idx.reshape(-1), vq_nearest(z.reshape(-1, 16), cb)[0])
    e_idx, e_dist = vq_nearest(torch.empty(0, 16, device=device), cb)
    assert e_idx.shape == (0,) and e_dist.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs(dtype, device):
    z = torch.randn(300, 64, device=device).to(dtype)
    cb = torch.randn(100, 64, device=device).to(dtype)
    idx, dist = vq_nearest(z, cb)
    assert dist.dtype == torch.float32
    _check(idx, dist, z, cb, "l2", tol=1e-3)  # the rounded inputs, accumulated in fp32


def test_zero_vectors_cosine(device):
    z = torch.zeros(3, 8, device=device)
    cb = torch.randn(5, 8, device=device)
    idx, dist = vq_nearest(z, cb, "cosine")
    assert idx.tolist() == [0, 0, 0] and torch.allclose(dist.cpu(), torch.ones(3))


@pytest.mark.parametrize("deterministic", [False, True])
def test_ema_update(deterministic, device):
    z = torch.randn(1000, 33, device=device)
    idx = torch.randint(0, 50, (1000,), device=device)
    counts, sums = vq_ema_update(idx, z, 50, deterministic=deterministic)
    rc, rs = reference.vq_ema_update(idx.cpu(), z.double().cpu(), 50)
    assert torch.equal(counts.double().cpu(), rc)
    assert torch.allclose(sums.double().cpu(), rs, atol=1e-4)
    if deterministic:
        again = vq_ema_update(idx, z, 50, deterministic=True)
        assert torch.equal(again[0], counts) and torch.equal(again[1], sums)


def test_bad_inputs(device):
    z = torch.randn(10, 8, device=device)
    with pytest.raises(ValueError, match="share D"):
        vq_nearest(z, torch.randn(4, 9, device=device))
    with pytest.raises(TypeError, match="z must be"):
        vq_nearest(z.long(), torch.randn(4, 8, device=device).long())
    with pytest.raises(ValueError, match="K = 0"):
        vq_nearest(z, torch.randn(0, 8, device=device))
    with pytest.raises(TypeError, match="codebook must have z's dtype"):
        vq_nearest(z, torch.randn(4, 8, device=device).double())
    with pytest.raises(ValueError, match="metric must be"):
        vq_nearest(z, torch.randn(4, 8, device=device), "l1")
    with pytest.raises(ValueError, match="num_codes must be positive"):
        vq_ema_update(torch.zeros(10, dtype=torch.long, device=device), z, 0)
    if device == "cpu":
        with pytest.raises(ValueError, match="outside"):
            vq_ema_update(torch.full((10,), 7, device=device), z, 5)


def test_opcheck_and_compile():
    z = torch.randn(40, 12)
    cb = torch.randn(9, 12)
    torch.library.opcheck(torch.ops.genext.vq_nearest, (z, cb, False))
    torch.library.opcheck(torch.ops.genext.vq_nearest, (z, cb, True))
    idx = torch.randint(0, 9, (40,))
    torch.library.opcheck(torch.ops.genext.vq_ema_update, (idx, z, 9, True))
    f = torch.compile(lambda a, b: vq_nearest(a, b)[0], fullgraph=True)
    assert torch.equal(f(z, cb), vq_nearest(z, cb)[0])


def test_float64_cpu():
    z = torch.randn(100, 10, dtype=torch.float64)
    cb = torch.randn(20, 10, dtype=torch.float64)
    idx, dist = vq_nearest(z, cb)
    assert dist.dtype == torch.float64
    ri, rd, _ = _ref(z, cb, "l2")
    assert torch.equal(idx, ri) and torch.allclose(dist, rd, atol=1e-12)


# ---- devices, fake kernels, hostile inputs -------------------------------------------------------


@pytest.mark.parametrize("meta_arg", ["z", "codebook"])
def test_nearest_meta_beside_cpu_raises(meta_arg):
    # a meta tensor sends the dispatcher to the fake kernel, which must raise as the C++ does
    args = {"z": torch.randn(6, 4), "codebook": torch.randn(3, 4)}
    args[meta_arg] = args[meta_arg].to("meta")
    with pytest.raises(RuntimeError, match=f"vq_nearest: .*{meta_arg}.* is on meta"):
        vq_nearest(args["z"], args["codebook"])
    with pytest.raises(RuntimeError, match="is on meta"):
        torch.ops.genext.vq_nearest(args["z"], args["codebook"], False)


@pytest.mark.parametrize("meta_arg", ["indices", "z"])
def test_ema_meta_beside_cpu_raises(meta_arg):
    args = {"indices": torch.randint(0, 3, (6,)), "z": torch.randn(6, 4)}
    args[meta_arg] = args[meta_arg].to("meta")
    with pytest.raises(RuntimeError, match=f"vq_ema_update: .*{meta_arg}.* is on meta"):
        vq_ema_update(args["indices"], args["z"], 3)


def test_all_meta_and_fake_checks():
    z, cb = torch.empty(5, 7, 4, device="meta"), torch.empty(3, 4, device="meta")
    idx, dist = vq_nearest(z, cb)
    assert idx.shape == (5, 7) and idx.dtype == torch.int64 and dist.dtype == torch.float32
    counts, sums = vq_ema_update(torch.empty(5, 7, dtype=torch.int32, device="meta"), z, 9)
    assert counts.shape == (9,) and sums.shape == (9, 4) and sums.device.type == "meta"
    # the fake kernels raise what the C++ raises: types and messages
    with pytest.raises(ValueError, match="share D"):
        vq_nearest(z, torch.empty(3, 5, device="meta"))
    with pytest.raises(TypeError, match="codebook must have z's dtype"):
        vq_nearest(z, cb.half())
    with pytest.raises(TypeError, match="z must be float16"):
        vq_nearest(z.long(), cb.long())
    with pytest.raises(ValueError, match="K = 0"):
        vq_nearest(z, torch.empty(0, 4, device="meta"))
    with pytest.raises(TypeError, match="indices must be int64 or int32"):
        vq_ema_update(torch.empty(5, 7, device="meta"), z, 3)


def test_compile_dynamic_shapes():
    # the fake kernels' checks work on symbolic sizes
    f = torch.compile(
        lambda a, b: vq_nearest(a, b)[0] + vq_ema_update(vq_nearest(a, b)[0], a, 5)[0].sum(),
        fullgraph=True,
        dynamic=True,
    )
    for n in (7, 13):
        z, cb = torch.randn(n, 6), torch.randn(5, 6)
        want = vq_nearest(z, cb)[0] + n
        assert torch.equal(f(z, cb), want)


def test_hostile_sizes_and_types(device):
    z = torch.randn(4, 8, device=device)
    cb = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="vq_nearest: D must be positive"):
        vq_nearest(torch.empty(0, 0, device=device), torch.empty(3, 0, device=device))
    with pytest.raises(ValueError, match="vq_nearest: D must be positive"):
        vq_nearest(torch.empty(2, 0, device=device), torch.empty(3, 0, device=device))
    with pytest.raises(ValueError, match="vq_ema_update: D must be positive"):
        vq_ema_update(torch.zeros(0, dtype=torch.long, device=device), z[:0, :0], 3)
    with pytest.raises(ValueError, match=r"num_codes must be at most 2\*\*31 - 1"):
        vq_ema_update(torch.zeros(4, dtype=torch.long, device=device), z, 2**40)
    with pytest.raises(TypeError):
        vq_ema_update(torch.zeros(4, dtype=torch.long, device=device), z, 3.5)
    with pytest.raises(ValueError, match="leading shape"):  # same numel, other shape
        vq_ema_update(torch.zeros(2, 2, dtype=torch.long, device=device), z, 3)
    # non-contiguous, transposed and stride-0 inputs give the contiguous answer
    zt = torch.randn(8, 40, device=device).t()
    assert torch.equal(vq_nearest(zt, cb)[0], vq_nearest(zt.contiguous(), cb)[0])
    ze = z[:1].expand(5, 8)
    assert torch.equal(vq_nearest(ze, cb[:, ::1])[0], vq_nearest(ze.contiguous(), cb)[0])
    idx = torch.zeros(5, dtype=torch.long, device=device)
    counts, sums = vq_ema_update(idx, ze, 3, deterministic=True)
    assert counts.tolist() == [5, 0, 0] and torch.allclose(sums[0], 5 * z[0])


# ---- non-finite values ---------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nan_query_rows(metric, device):
    # a row with a NaN has only NaN scores: index 0 (torch.argmin of the float64 reference row)
    # and distance NaN; the other rows are untouched
    z = torch.randn(70, 9, device=device)
    cb = torch.randn(40, 9, device=device)
    z[[3, 41, 69], [0, 8, 4]] = float("nan")
    idx, dist = vq_nearest(z, cb, metric)
    ri, rd, _ = _ref(z, cb, metric)
    bad = torch.zeros(70, dtype=torch.bool)
    bad[[3, 41, 69]] = True
    assert idx.cpu()[bad].tolist() == ri.cpu()[bad].tolist() == [0, 0, 0]
    assert torch.isnan(dist.cpu()[bad]).all() and torch.isnan(rd.cpu()[bad]).all()
    assert torch.equal(idx.cpu()[~bad], ri.cpu()[~bad])
    assert torch.isfinite(dist[~bad.to(device)]).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nan_codebook_rows_never_picked(metric, device):
    z = torch.randn(200, 6, device=device)
    cb = torch.randn(37, 6, device=device)
    nan_rows = [0, 5, 36]
    cb[nan_rows, 2] = float("nan")
    idx, dist = vq_nearest(z, cb, metric)
    keep = torch.tensor([k for k in range(37) if k not in nan_rows])
    ri, rd, _ = _ref(z, cb[keep.to(device)], metric)
    assert torch.equal(idx.cpu(), keep[ri.cpu()])  # the nearest among the finite rows
    assert torch.allclose(dist.double().cpu(), rd.cpu(), atol=1e-4)
    # every code NaN: index 0, distance NaN
    idx, dist = vq_nearest(z[:3], torch.full((4, 6), float("nan"), device=device), metric)
    assert idx.tolist() == [0, 0, 0] and torch.isnan(dist).all()


def test_inf_rows_l2(device):
    # an infinite query row is infinitely far from every code: index 0, distance inf (as the
    # float64 reference); an infinite code is picked only when nothing finite exists
    z = torch.randn(4, 5, device=device)
    z[1, 3] = float("inf")
    cb = torch.randn(6, 5, device=device)
    cb[0, 0] = float("-inf")
    idx, dist = vq_nearest(z, cb)
    ri, rd, _ = _ref(z, cb, "l2")
    assert torch.equal(idx.cpu(), ri.cpu()) and dist[1].item() == float("inf")
    assert idx[1].item() == 0 and torch.isfinite(dist[[0, 2, 3]]).all()


def test_ema_update_num_codes_type_error_names_the_op():
    with pytest.raises(TypeError, match="vq_ema_update: num_codes must be an int, got float"):
        vq_ema_update(torch.zeros(3, dtype=torch.long), torch.randn(3, 2), 2.5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_vq_nearest_distance_is_what_the_docs_say(metric):
    """l2: the Euclidean distance of torch.cdist (not its square); cosine: 1 - cosine similarity."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(37, 12, generator=g, dtype=torch.float64) * 2
    cb = torch.randn(19, 12, generator=g, dtype=torch.float64)
    idx, dist = vq_nearest(z, cb, metric)
    if metric == "l2":
        want = torch.cdist(z, cb).min(dim=1)
    else:
        want = (1 - F.normalize(z, dim=-1) @ F.normalize(cb, dim=-1).T).min(dim=1)
    assert torch.equal(idx, want.indices)
    torch.testing.assert_close(dist, want.values, rtol=1e-12, atol=1e-12)


# ---- the CPU's l2 screen (dot-form scores, candidates rescored exactly) ---------------------------


def _near_codes(n: int, k: int, d: int, dtype: torch.dtype, g: torch.Generator):
    """z far from the origin and k codes around it at distinct distances 1e-3 * (1 + j / k) in
    random directions: the dot form |e|^2 - 2 z.e cannot order them (its rounding, about
    u * |z|^2, exceeds the gaps between squared distances), the sums of squared differences can."""
    centre = 100 * torch.randn(d, generator=g, dtype=torch.float64)
    dirs = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=-1)
    radii = 1e-3 * (1 + torch.randperm(k, generator=g).double() / k)
    cb = centre + radii[:, None] * dirs
    z = centre + 1e-4 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return z.to(dtype), cb.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,d", [(100, 64), (37, 13)])
def test_l2_screen_rescores_near_ties_exactly(dtype, k, d):
    g = torch.Generator().manual_seed(1)
    z, cb = _near_codes(50, k, d, dtype, g)
    idx, dist = vq_nearest(z, cb)
    ri, rd, _ = _ref(z, cb, "l2")
    assert torch.equal(idx, ri)
    assert torch.allclose(dist.double(), rd, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l2_threads_bit_identical(dtype):
    # enough rows for a thread team; odd K and D for the tiles' tails
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3001, 67, generator=g, dtype=dtype)
    cb = torch.randn(301, 67, generator=g, dtype=dtype)
    cb[5] = z[10]  # an exact hit: distance 0
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = vq_nearest(z, cb)
        torch.set_num_threads(2)
        two = vq_nearest(z, cb)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert one[0][10].item() == 5 and one[1][10].item() == 0
    _check(one[0], one[1], z, cb, "l2", tol=1e-4)


def test_l2_huge_rows_take_the_exact_scan():
    # rows whose |z| is near fp32's range are not screened (a dot-form score could overflow)
    g = torch.Generator().manual_seed(3)
    cb = torch.randn(40, 8, generator=g)
    z = torch.randn(13, 8, generator=g)
    z[[2, 7]] *= 1e18
    cb[9] = z[7] * 1.0000001
    big = torch.full((8,), 1e20)  # |e|^2 overflows fp32: never nearer than a normal code
    cb = torch.cat([cb, big[None]])
    idx, dist = vq_nearest(z, cb)
    ri, rd, _ = _ref(z, cb, "l2")
    assert torch.equal(idx, ri) and idx[7].item() == 9
    assert torch.allclose(dist.double(), rd, rtol=1e-5)
    # a row at the overflowing code picks it (the exact scan)
    idx, _ = vq_nearest(torch.stack([big, z[0]]), cb)
    assert idx.tolist() == [40, ri[0].item()]


# The l2 kernel's distances are one fused multiply-add per term in order of d, on every path (the
# screen's rescoring, the exact scan, any thread count). These digests of (indices, distances) were
# computed once from the exact-scan kernel (every code scored that way, vectorised across codes) for
# the seeded inputs below; a change of rounding anywhere (an unfused multiply-add, a reordered sum)
# changes them. They hold where the CPU kernel runs its FMA builds (x86-64-v3 or v4).
_MAIN_DIGESTS = {
    (1, torch.float32, 0.0): "8a274b9ab65935ea",
    (1, torch.float32, 1e3): "09488ca4d26a1772",
    (1, torch.float64, 0.0): "e836c819db6a540c",
    (1, torch.float64, 1e3): "9a90208b738164f2",
    (3, torch.float32, 0.0): "0cdbef8801373390",
    (3, torch.float32, 1e3): "c420d792a97d5cba",
    (3, torch.float64, 0.0): "abfd32068a4a96e9",
    (3, torch.float64, 1e3): "2f4a68008c75afa0",
    (13, torch.float32, 0.0): "6c9a3eb9a7982ff0",
    (13, torch.float32, 1e3): "a54e23d1ce28df5a",
    (13, torch.float64, 0.0): "7bd4e810dbf8057b",
    (13, torch.float64, 1e3): "4f212b296d9ffc14",
    (64, torch.float32, 0.0): "766693e2b2802e20",
    (64, torch.float32, 1e3): "4d9a42abae63c676",
    (64, torch.float64, 0.0): "8f7d01aa444fbafb",
    (64, torch.float64, 1e3): "6e4e6501d972a258",
    (67, torch.float32, 0.0): "ef2c68a2e94e1bcc",
    (67, torch.float32, 1e3): "f2a001d283201920",
    (67, torch.float64, 0.0): "9a3fa592684922b4",
    (67, torch.float64, 1e3): "262f94ec3b5caa34",
    (257, torch.float32, 0.0): "9decdc27f436f1eb",
    (257, torch.float32, 1e3): "d1f8f79828ac05a9",
    (257, torch.float64, 0.0): "ed9b1ca7e282706a",
    (257, torch.float64, 1e3): "0507c0a318250ae3",
}
_fma_build = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="the digests are those of the CPU kernel's FMA builds",
)


def _digest(idx: torch.Tensor, dist: torch.Tensor) -> str:
    return hashlib.sha256(idx.numpy().tobytes() + dist.numpy().tobytes()).hexdigest()[:16]


@_fma_build
@pytest.mark.parametrize("key", list(_MAIN_DIGESTS), ids=lambda k: f"D{k[0]}-{k[1]}-off{k[2]:g}")
def test_l2_bits_are_the_exact_scans(key):
    d, dtype, offset = key
    g = torch.Generator().manual_seed(d)
    z = offset + torch.randn(67, d, generator=g, dtype=torch.float64)
    cb = offset + torch.randn(45, d, generator=g, dtype=torch.float64)
    assert _digest(*vq_nearest(z.to(dtype), cb.to(dtype))) == _MAIN_DIGESTS[key]


@_fma_build
@pytest.mark.parametrize(
    "dtype,digest,head",
    [
        (torch.float32, "14c671736b9e74cf", [16, 25, 105, 164, 181, 75, 154, 121]),
        (torch.float64, "e627b2ad96424112", [145, 82, 5, 16, 199, 103, 188, 94]),
    ],
)
def test_l2_near_ties_pick_the_exact_scans_code(dtype, digest, head):
    # codes on a sphere of radius 1e3 (radii differing by ~1e-7) and z near its centre: every code
    # is at nearly the same distance, the pick rests on the last bits of the exact distances
    g = torch.Generator().manual_seed(5)
    for want in (torch.float32, torch.float64):  # the same draws for both dtypes
        dirs = F.normalize(torch.randn(200, 64, generator=g, dtype=torch.float64), dim=-1)
        cb = 1e3 * dirs * (1 + 1e-7 * torch.randn(200, 1, generator=g, dtype=torch.float64))
        z = 1e-3 * torch.randn(30, 64, generator=g, dtype=torch.float64)
        if want == dtype:
            break
    idx, dist = vq_nearest(z.to(dtype), cb.to(dtype))
    assert idx.tolist()[:8] == head
    assert _digest(idx, dist) == digest


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [3, 64, 67])
def test_l2_far_from_origin_scan_matches_rescoring(dtype, d):
    # far from the origin every code is a screen candidate and the block takes the vectorised exact
    # scan; one code alone is always rescored by the scalar loop: the two give the same bits
    g = torch.Generator().manual_seed(4)
    z = (1e4 + torch.randn(40, d, generator=g, dtype=torch.float64)).to(dtype)
    cb = (1e4 + torch.randn(70, d, generator=g, dtype=torch.float64)).to(dtype)
    idx, dist = vq_nearest(z, cb)
    for r in range(z.shape[0]):
        _, one = vq_nearest(z[r : r + 1], cb[idx[r] : idx[r] + 1])
        assert one.item() == dist[r].item()
    per_code = torch.stack([vq_nearest(z, cb[k : k + 1])[1] for k in range(cb.shape[0])], 1)
    assert torch.equal(idx, per_code.argmin(1))  # first of equal ones, as the kernel
