"""genext.models.DiT against diffusers' DiTTransformer2DModel with the same (perturbed random)
weights: outputs, gradients of every parameter and of the input, timestep forms, classifier-free
guidance, label dropout in training, loading and saving in diffusers' layout, torch.compile, and
that genext's attention kernel ran. genext.models.VideoDiT (no peer) against a plain-PyTorch
reference written out below, and against the image model at one frame."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import genext
from genext.models import DiT, DiTTransformer2DModel, VideoDiT
from genext.models import dit as dit_module
from genext.models._embeddings import get_2d_sincos_pos_embed
from genext.nn.functional import sdpa_backend

from peer_parity import assert_grads_match, grads_after, op_names, perturb_, rel

diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import get_3d_sincos_pos_embed as peer_3d_pos  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]

# diffusers' own tiny test config (tests/models/transformers/test_models_dit_transformer2d.py,
# prepare_init_args_and_inputs_for_common): batch 4 of (4, 8, 8), learned sigma (8 outputs)
TINY = dict(
    in_channels=4,
    out_channels=8,
    activation_fn="gelu-approximate",
    num_attention_heads=2,
    attention_head_dim=4,
    attention_bias=True,
    num_layers=1,
    norm_type="ada_norm_zero",
    num_embeds_ada_norm=8,
    patch_size=2,
    sample_size=8,
)
# two blocks (the final layer reads the first block's embedding, not the last one's), affine
# feed-forward norms, a class count that is not a power of two, out_channels left to default
TWO_LAYERS = dict(
    in_channels=3,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_embeds_ada_norm=10,
    patch_size=2,
    sample_size=8,
    norm_elementwise_affine=True,
    norm_eps=1e-6,
)
CONFIGS = {"tiny": TINY, "two_layers": TWO_LAYERS}


def _pair(config: dict, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    peer = diffusers.DiTTransformer2DModel(**config)
    fixed = peer.pos_embed.pos_embed.clone()
    perturb_(peer, seed=seed)
    # the position embedding is a buffer computed from the config, outside the state_dict
    peer.pos_embed.pos_embed.copy_(fixed)
    peer = peer.to(dtype).eval()
    ours = DiT.from_config(peer.config).to(dtype).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


def _inputs(config: dict, dtype: torch.dtype, batch: int = 4, size: int | None = None):
    g = torch.Generator().manual_seed(1)
    size = size or config["sample_size"]
    x = torch.randn(batch, config["in_channels"], size, size, dtype=dtype, generator=g)
    t = torch.tensor([0, 17, 500, 999][:batch])
    classes = config["num_embeds_ada_norm"]
    y = torch.tensor([0, classes - 1, 3, classes][:batch])  # the last: the "no class" row
    return x, t, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_and_gradients_match_diffusers(name, dtype):
    config = CONFIGS[name]
    ours, peer = _pair(config, dtype)
    x, t, y = _inputs(config, dtype)
    tol = TOL[dtype]
    with torch.no_grad():
        a, b = ours(x, t, y).sample, peer(x, t, y).sample
    out_channels = config.get("out_channels", config["in_channels"])
    assert a.shape == b.shape == (4, out_channels, 8, 8)
    assert rel(a, b) < tol, rel(a, b)
    w = torch.randn(b.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    go = grads_after(ours, lambda m: (m(xo, t, y).sample * w).sum())
    gp = grads_after(peer, lambda m: (m(xp, t, y).sample * w).sum())
    assert len(go) == len(list(peer.parameters()))
    assert_grads_match(go, gp, tol)
    assert rel(xo.grad, xp.grad) < tol


@pytest.mark.parametrize("size", [4, 12])  # grids other than the configured 4x4
def test_other_sizes_match_diffusers(size):
    ours, peer = _pair(TINY, torch.float64)
    x, t, y = _inputs(TINY, torch.float64, batch=2, size=size)
    with torch.no_grad():
        assert rel(ours(x, t, y).sample, peer(x, t, y).sample) < 1e-10


def test_timestep_and_label_forms():
    """A number, a 0-d tensor, a one-element tensor or a (B,) tensor; diffusers takes (B,)."""
    ours, peer = _pair(TINY, torch.float64)
    x, _, _ = _inputs(TINY, torch.float64, batch=3)
    with torch.no_grad():
        ref = peer(x, torch.full((3,), 250), torch.full((3,), 5)).sample
        for t in (250, torch.tensor(250), torch.tensor([250]), torch.full((3,), 250)):
            for y in (5, torch.tensor(5), torch.full((3,), 5)):
                assert rel(ours(x, t, y).sample, ref) < 1e-10
        # fractional timesteps (a continuous-time sampler)
        tf = torch.tensor([0.5, 10.25, 999.75])
        y = torch.tensor([1, 2, 8])
        assert rel(ours(x, tf, y).sample, peer(x, tf, y).sample) < 1e-10
        assert rel(ours(x, 0.5, y).sample, peer(x, torch.full((3,), 0.5), y).sample) < 1e-10
        (out,) = ours(x, 250, 5, return_dict=False)
        assert torch.equal(out, ours(x, 250, 5).sample)
    with pytest.raises(ValueError, match="timestep must be"):
        ours(x, torch.zeros(2), 5)
    with pytest.raises(ValueError, match="class_labels must be"):
        ours(x, 3, torch.zeros(3, 1, dtype=torch.long))


def test_training_label_dropout_matches_diffusers():
    """In training mode each block's class embedding drops labels on its own draw, in diffusers'
    order: the same seed gives the same output."""
    ours, peer = _pair(TWO_LAYERS)
    ours.train(), peer.train()
    x, t, y = _inputs(TWO_LAYERS, torch.float32, batch=4)
    x, t, y = x.repeat(4, 1, 1, 1), t.repeat(4), y.repeat(4)
    with torch.no_grad():
        torch.manual_seed(7)
        a = ours(x, t, y).sample
        torch.manual_seed(7)
        b = peer(x, t, y).sample
        assert rel(a, b) < 1e-5
        ours.eval()
        assert rel(a, ours(x, t, y).sample) > 1e-3  # some labels were dropped


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    ours, peer = _pair(TWO_LAYERS, torch.float64)
    x, t, y = _inputs(TWO_LAYERS, torch.float64)

    def loss(m):
        return m(x, t, y).sample.square().sum()

    plain = grads_after(ours, loss)
    ours.enable_gradient_checkpointing()
    assert ours.gradient_checkpointing
    calls = []
    original = dit_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(dit_module, "checkpoint", counting)
    assert_grads_match(grads_after(ours, loss), plain, 1e-12)
    assert len(calls) == TWO_LAYERS["num_layers"]  # every block was checkpointed
    assert_grads_match(plain, grads_after(peer, loss), 1e-10)


def test_from_pretrained_of_a_diffusers_folder_and_back(tmp_path):
    ours, peer = _pair(TWO_LAYERS)
    peer.save_pretrained(tmp_path / "peer")
    loaded = DiT.from_pretrained(tmp_path / "peer")
    assert dict(loaded.config) == {k: v for k, v in peer.config.items() if not k.startswith("_")}
    x, t, y = _inputs(TWO_LAYERS, torch.float32)
    with torch.no_grad():
        ref = peer(x, t, y).sample
        assert rel(loaded(x, t, y).sample, ref) < 1e-5
        # genext's folder read by diffusers, as a pipeline's subfolder
        ours.save_pretrained(tmp_path / "pipe" / "transformer")
        back = diffusers.DiTTransformer2DModel.from_pretrained(
            tmp_path / "pipe", subfolder="transformer"
        )
        assert rel(back(x, t, y).sample, ref) < 1e-5
        again = DiTTransformer2DModel.from_pretrained(tmp_path / "pipe", subfolder="transformer")
        assert torch.equal(again(x, t, y).sample, ours(x, t, y).sample)


@pytest.mark.parametrize("guided_channels", [None, 3])
def test_classifier_free_guidance(guided_channels):
    """``forward_with_cfg`` against diffusers' model run on the doubled batch (labels, then the
    "no class" label) and the guidance formula written out: the first ``guided_channels``
    (default ``in_channels``, as diffusers' DiTPipeline; 3 as the DiT repository's sampler)
    guided, the learned variance from the conditional half."""
    ours, peer = _pair(TINY, torch.float64)
    x, t, y = _inputs(TINY, torch.float64)
    y = y.clamp(max=7)
    scale = 4.0
    k = 4 if guided_channels is None else guided_channels
    with torch.no_grad():
        both = peer(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 8)]))
        cond, uncond = both.sample.chunk(2)
        expected = cond.clone()
        expected[:, :k] = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
        got = ours.forward_with_cfg(x, t, y, scale, guided_channels=guided_channels)
        assert rel(got, expected) < 1e-10
        assert rel(got[:, :k], cond[:, :k]) > 1e-2  # the guidance did something
        # scale 1: the conditional prediction
        assert rel(ours.forward_with_cfg(x, t, y, 1.0, guided_channels), cond) < 1e-10
    assert ours.null_class_id == 8
    assert ours.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 9
    with pytest.raises(ValueError, match="guided_channels"):
        ours.forward_with_cfg(x, t, y, scale, guided_channels=9)


def test_rectangular_input_unpatchifies_on_its_own_grid():
    """diffusers assumes a square grid when it unpatchifies; here output patch (i, j) is token
    ``i * gw + j`` of the last projection, read as (row, column, channel)."""
    ours, _ = _pair(TINY, torch.float64)
    seen = []
    ours.proj_out_2.register_forward_hook(lambda m, a, out: seen.append(out))
    x = torch.randn(2, 4, 6, 10, dtype=torch.float64)
    with torch.no_grad():
        out = ours(x, 3, 1).sample
    assert out.shape == (2, 8, 6, 10)
    tokens = seen[0]
    assert tokens.shape == (2, 3 * 5, 2 * 2 * 8)
    for i in range(3):
        for j in range(5):
            patch = tokens[:, i * 5 + j].reshape(2, 2, 2, 8).permute(0, 3, 1, 2)
            assert torch.equal(out[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2], patch)


def _expected_attention(model, x: torch.Tensor) -> str:
    heads = model.config.num_attention_heads
    d = model.config.attention_head_dim
    q = torch.empty(x.shape[0], heads, 16, d, dtype=x.dtype)
    return sdpa_backend(q, q, q)


@pytest.mark.parametrize("video", [False, True])
def test_attention_runs_where_genext_serves(video):
    if video:
        model = VideoDiT(**VIDEO_CONFIGS["pt2"])
        x = torch.randn(2, 4, 4, 8, 8)
    else:
        model, _ = _pair(TINY)
        x, _, _ = _inputs(TINY, torch.float32, batch=2)
    x.requires_grad_()
    names = op_names(lambda: model(x, 10, 1).sample.sum().backward())
    if _expected_attention(model, x) == "genext":
        assert "genext::flash_attention_forward" in names
        assert "genext::flash_attention_backward" in names
        assert not any("scaled_dot_product" in n for n in names), sorted(names)
    else:
        assert "genext::flash_attention_forward" not in names


def test_compile_fullgraph_matches_eager():
    ours, _ = _pair(TINY)
    x, t, y = _inputs(TINY, torch.float32)
    # the whole forward captured as one graph is what is tested; aot_eager skips inductor's
    # code generation, which takes over a minute on a 2-core machine for this model
    compiled = torch.compile(
        lambda x, t, y: ours(x, t, y).sample, fullgraph=True, backend="aot_eager"
    )
    with torch.no_grad():
        assert rel(compiled(x, t, y), ours(x, t, y).sample) < 1e-5


# heads of 32: served by genext's CUDA kernel in every dtype; 64 tokens
CUDA_CONFIG = dict(TINY, attention_head_dim=32, num_layers=2, sample_size=16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_diffusers_and_the_float64_model(dtype, monkeypatch):
    """On the GPU: float32 equal to diffusers' (TF32 off for both), with genext's attention
    kernel in the profile; 16-bit no worse than twice diffusers' own error against the float64
    model on the CPU."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ours64, peer64 = _pair(CUDA_CONFIG, torch.float64)
    x, t, y = _inputs(CUDA_CONFIG, torch.float64)
    with torch.no_grad():
        ref = peer64(x, t, y).sample
        ours = copy.deepcopy(ours64).to("cuda", dtype)
        peer = copy.deepcopy(peer64).to("cuda", dtype)
        xc, tc, yc = x.to("cuda", dtype), t.cuda(), y.cuda()
        names = op_names(lambda: ours(xc, tc, yc))
        a = ours(xc, tc, yc).sample.double().cpu()
        b = peer(xc, tc, yc).sample.double().cpu()
    assert "genext::flash_attention_forward" in names
    assert torch.isfinite(a).all()
    if dtype == torch.float32:
        assert rel(a, b) < 1e-5
    else:
        assert rel(a, ref) <= 2 * rel(b, ref) + 1e-6, (rel(a, ref), rel(b, ref))


def test_unsupported_options_and_bad_inputs():
    with pytest.raises(NotImplementedError, match="norm_type"):
        DiT(**dict(TINY, norm_type="ada_norm"))
    with pytest.raises(ValueError, match="num_embeds_ada_norm"):
        DiT(**dict(TINY, num_embeds_ada_norm=None))
    model = DiT(**TINY)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model(torch.randn(1, 4, 7, 8), 1, 1)
    with pytest.raises(ValueError, match=r"hidden_states must be \(B, 4, H, W\)"):
        model(torch.randn(1, 3, 8, 8), 1, 1)
    with pytest.raises(ValueError, match="class_labels is required"):
        model(torch.randn(1, 4, 8, 8), 1, None)
    with pytest.raises(ValueError, match="multiple of 16"):
        VideoDiT(**dict(VIDEO_CONFIGS["pt2"], attention_head_dim=4))
    video = VideoDiT(**VIDEO_CONFIGS["pt2"])
    with pytest.raises(ValueError, match="patch_size_t"):
        video(torch.randn(1, 4, 3, 8, 8), 1, 1)
    with pytest.raises(ValueError, match="T, H, W"):
        video(torch.randn(1, 4, 8, 8), 1, 1)


def test_is_reachable_from_package():
    assert genext.models.DiT is genext.models.DiTTransformer2DModel is DiTTransformer2DModel
    assert genext.models.VideoDiT is VideoDiT


# ---- the 3-D position embedding ------------------------------------------------------------


@pytest.mark.parametrize(
    "dim, grid, scales",
    [
        (16, (3, 4, 4), (1.0, 1.0)),
        (32, (5, 2, 3), (1.0, 1.0)),  # rectangular frames
        (48, (2, 3, 5), (2.0, 0.5)),  # interpolation scales (spatial, temporal)
    ],
)
def test_3d_sincos_pos_embed_matches_diffusers(dim, grid, scales):
    t, h, w = grid
    ours = dit_module.get_3d_sincos_pos_embed(dim, grid, *scales)
    # diffusers' spatial_size is (width, height); it returns (T, H*W, D)
    peer = peer_3d_pos(dim, (w, h), t, *scales)
    assert ours.shape == (t * h * w, dim)
    assert torch.allclose(ours, peer.reshape(-1, dim).to(ours.dtype), rtol=0, atol=1e-7)
    # frame 0's temporal quarter is sin(0), cos(0); the other three quarters are the image
    # model's 2-D embedding of the patch grid
    assert (ours[: h * w, : dim // 8] == 0).all() and (
        ours[: h * w, dim // 8 : dim // 4] == 1
    ).all()
    if scales == (1.0, 1.0) and h == w:
        spatial = get_2d_sincos_pos_embed(3 * dim // 4, (h, w), base_size=h)
        assert torch.equal(ours[: h * w, dim // 4 :], spatial)
    with pytest.raises(ValueError, match="multiple of 16"):
        dit_module.get_3d_sincos_pos_embed(24, grid)


# ---- VideoDiT against a plain-PyTorch reference ----------------------------------------------

VIDEO_CONFIGS = {
    # two frames per patch, two blocks, learned sigma
    "pt2": dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        num_frames=4,
        patch_size=2,
        patch_size_t=2,
        num_embeds_ada_norm=6,
    ),
    # one frame per patch, three heads of 16, affine feed-forward norm, 3 input channels
    "pt1_affine": dict(
        num_attention_heads=3,
        attention_head_dim=16,
        in_channels=3,
        num_layers=1,
        sample_size=4,
        num_frames=3,
        patch_size=2,
        patch_size_t=1,
        num_embeds_ada_norm=5,
        norm_elementwise_affine=True,
        norm_eps=1e-6,
    ),
}


def _layer_norm(x, eps, weight=None, bias=None):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def _linear(x, p, name):
    return x @ p[name + ".weight"].T + p[name + ".bias"]


def _sincos(dim, pos):
    """[sin, cos](pos * 10000 ** (-2 i / dim)), i < dim / 2, in float64."""
    i = torch.arange(dim // 2, dtype=torch.float64)
    angle = pos.double()[:, None] * 10000.0 ** (-2 * i / dim)[None]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def _reference_pos(dim, t, h, w):
    frame, row, col = (
        g.flatten()
        for g in torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    )
    q = dim // 4
    pos = torch.cat(
        [_sincos(q, frame), _sincos(3 * dim // 8, col), _sincos(3 * dim // 8, row)], dim=1
    )
    return pos.float()  # the model keeps its position buffer in float32, as diffusers does


def _reference_conditioning(p, prefix, t, y, dtype):
    """DiT's timestep (256 sinusoidal channels, cos first, computed in float32) + class
    embedding."""
    half = 128
    freqs = torch.exp((-math.log(10000) * torch.arange(half, dtype=torch.float32)) / (half - 1))
    angle = t.float()[:, None] * freqs[None]
    temb = torch.cat([angle.cos(), angle.sin()], dim=1).to(dtype)
    temb = _linear(temb, p, prefix + "timestep_embedder.linear_1")
    temb = _linear(torch.nn.functional.silu(temb), p, prefix + "timestep_embedder.linear_2")
    return temb + p[prefix + "class_embedder.embedding_table.weight"][y]


def _reference_attention(x, p, prefix, heads):
    b, n, dim = x.shape
    d = dim // heads

    def split(name):
        return _linear(x, p, prefix + name).reshape(b, n, heads, d).transpose(1, 2)

    q, k, v = split("to_q"), split("to_k"), split("to_v")
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, dim)
    return _linear(out, p, prefix + "to_out.0")


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _reference_video_dit(model, p, x, t, y):
    """The video DiT written out: explicit spacetime patches, attention with softmax, layer
    norms and adaLN-Zero modulation, from the parameters ``p`` (the model's own)."""
    cfg = model.config
    b, c, frames, height, width = x.shape
    pt, ps = cfg.patch_size_t, cfg.patch_size
    gt, gh, gw = frames // pt, height // ps, width // ps
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    out_c = cfg.out_channels or cfg.in_channels
    kernel = p["pos_embed.proj.weight"].reshape(dim, -1)  # (dim, C * pt * ps * ps)
    tokens = []
    for f in range(gt):
        for r in range(gh):
            for col in range(gw):
                patch = x[
                    :, :, f * pt : (f + 1) * pt, r * ps : (r + 1) * ps, col * ps : (col + 1) * ps
                ]
                tokens.append(patch.reshape(b, -1) @ kernel.T + p["pos_embed.proj.bias"])
    h = torch.stack(tokens, dim=1) + _reference_pos(dim, gt, gh, gw).to(x.dtype)
    for i in range(cfg.num_layers):
        pre = f"transformer_blocks.{i}."
        emb = _reference_conditioning(p, pre + "norm1.emb.", t, y, x.dtype)
        mod = _linear(torch.nn.functional.silu(emb), p, pre + "norm1.linear")[:, None]
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.chunk(6, dim=-1)
        a = _layer_norm(h, 1e-6) * (1 + scale_a) + shift_a
        h = h + gate_a * _reference_attention(a, p, pre + "attn1.", cfg.num_attention_heads)
        f = _layer_norm(h, cfg.norm_eps, p.get(pre + "norm3.weight"), p.get(pre + "norm3.bias"))
        f = f * (1 + scale_f) + shift_f
        f = _linear(_gelu_tanh(_linear(f, p, pre + "ff.net.0.proj")), p, pre + "ff.net.2")
        h = h + gate_f * f
    emb = _reference_conditioning(p, "transformer_blocks.0.norm1.emb.", t, y, x.dtype)
    shift, scale = _linear(torch.nn.functional.silu(emb), p, "proj_out_1")[:, None].chunk(2, -1)
    h = _linear(_layer_norm(h, 1e-6) * (1 + scale) + shift, p, "proj_out_2")
    out = x.new_zeros(b, out_c, frames, height, width)
    for n in range(gt * gh * gw):
        f, r, col = n // (gh * gw), (n // gw) % gh, n % gw
        patch = h[:, n].reshape(b, pt, ps, ps, out_c).permute(0, 4, 1, 2, 3)
        out[:, :, f * pt : (f + 1) * pt, r * ps : (r + 1) * ps, col * ps : (col + 1) * ps] = patch
    return out


def _video_model(name, dtype, seed=0):
    torch.manual_seed(seed)
    model = VideoDiT(**VIDEO_CONFIGS[name])
    fixed = model.pos_embed.pos_embed.clone()
    perturb_(model, seed=seed)
    model.pos_embed.pos_embed.copy_(fixed)
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name, shape",
    [
        ("pt2", (2, 4, 4, 8, 8)),  # the configured grid: the stored position buffer
        ("pt1_affine", (3, 3, 2, 4, 6)),  # another grid (2 frames, 2x3 patches): computed
    ],
)
def test_video_dit_matches_reference(name, shape, dtype):
    model = _video_model(name, dtype)
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, dtype=dtype, generator=g)
    t = torch.tensor([3, 400, 999][: shape[0]])
    y = torch.tensor([0, cfg.num_embeds_ada_norm, 2][: shape[0]])
    params = dict(model.named_parameters())
    with torch.no_grad():
        ours = model(x, t, y).sample
        ref = _reference_video_dit(model, params, x, t, y)
    assert ours.shape == ref.shape == (shape[0], cfg.out_channels or cfg.in_channels, *shape[2:])
    tol = TOL[dtype]
    assert rel(ours, ref) < tol, rel(ours, ref)
    w = torch.randn(ref.shape, dtype=dtype, generator=g)
    names = list(params)

    def grads(run):
        xg = x.clone().requires_grad_()
        out = (run(xg) * w).sum()
        gs = torch.autograd.grad(out, [params[n] for n in names] + [xg])
        return dict(zip(names, gs[:-1])), gs[-1]

    go, gxo = grads(lambda xg: model(xg, t, y).sample)
    gr, gxr = grads(lambda xg: _reference_video_dit(model, params, xg, t, y))
    assert_grads_match(go, gr, tol)
    assert rel(gxo, gxr) < tol


def test_video_dit_at_one_frame_is_the_image_dit():
    """With one frame and patch_size_t = 1 the video model computes the image model's output
    from the same weights (the Conv3d kernel's single frame as the Conv2d kernel) once the image
    model is given the video model's position embedding; with its own 2-D embedding it differs,
    because the 3-D one spends a quarter of the channels on the frame index."""
    image_cfg = dict(TWO_LAYERS, in_channels=4, out_channels=8)
    image, _ = _pair(image_cfg, torch.float64)
    video = VideoDiT(
        **{k: v for k, v in image_cfg.items() if k != "norm_num_groups"},
        num_frames=1,
        patch_size_t=1,
    ).double()
    video.eval()  # in training mode the class embeddings would drop labels at random
    state = dict(image.state_dict())
    state["pos_embed.proj.weight"] = state["pos_embed.proj.weight"][:, :, None]
    video.load_state_dict(state, strict=True)
    x, t, y = _inputs(image_cfg, torch.float64)
    with torch.no_grad():
        own_pos = image(x, t, y).sample
        image.pos_embed.pos_embed.copy_(video.pos_embed.pos_embed)
        want = image(x, t, y).sample
        got = video(x[:, :, None], t, y).sample
    assert got.shape == (4, 8, 1, 8, 8)
    assert rel(got[:, :, 0], want) < 1e-10
    assert rel(got[:, :, 0], own_pos) > 1e-3
    # guidance goes through the same path
    with torch.no_grad():
        assert (
            rel(
                video.forward_with_cfg(x[:, :, None], t, y, 3.0)[:, :, 0],
                image.forward_with_cfg(x, t, y, 3.0),
            )
            < 1e-10
        )


def test_video_dit_save_and_load(tmp_path):
    model = _video_model("pt2", torch.float32)
    model.save_pretrained(tmp_path)
    loaded = VideoDiT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert "pos_embed.pos_embed" not in loaded.state_dict()
    x = torch.randn(1, 4, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 5, 2).sample, model(x, 5, 2).sample)
    assert loaded.num_patches == 2 * 4 * 4
