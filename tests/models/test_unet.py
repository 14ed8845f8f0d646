"""genext.models.UNet2DModel and UNet2DConditionModel against diffusers' classes of the same name
built from the same config with the same (perturbed random) weights: outputs and the gradients
of every parameter in float32 (1e-5) and float64 (1e-10), class conditioning, padded-text masks,
the forms a timestep takes, loading diffusers' saved folders, which kernels ran, torch.compile,
and the options that are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from genext.models import UNet2DConditionModel, UNet2DModel
from genext.models import _unet_blocks as blocks
from genext.models import unet as unet_module
from genext.nn.functional import sdpa_backend

from conftest import thin
from peer_parity import assert_grads_match, grads_after, op_names, perturb_, rel

diffusers = pytest.importorskip("diffusers")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are tiny, and on a shared machine idle OpenMP workers
    spinning for a core made each forward tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- UNet2DModel configs ---------------------------------------------------------------------
# diffusers' own tiny test config (tests/models/unets/test_models_unet_2d.py, Unet2DModel):
# attention heads of 3 channels over 8 (two heads, inner width 6), 2 groups
PIXEL_TINY = dict(
    block_out_channels=(4, 8),
    norm_num_groups=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=3,
    out_channels=3,
    in_channels=3,
    layers_per_block=2,
    sample_size=16,
)
# diffusers' LDM test config (same file, UNetLDMModel): no attention outside the mid block
PIXEL_LDM = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    attention_head_dim=32,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
)
# the switches off the default path: class table, scale-shift ResNets (the mid attention then
# has no GroupNorm unless attn_norm_num_groups), mish, centred input, sin-first embedding
PIXEL_VARIANT = dict(
    PIXEL_TINY,
    num_class_embeds=5,
    resnet_time_scale_shift="scale_shift",
    attn_norm_num_groups=4,
    act_fn="mish",
    center_input_sample=True,
    flip_sin_to_cos=False,
    freq_shift=1,
    attention_head_dim=None,  # one head over all channels
    layers_per_block=1,
    downsample_padding=0,
)
# score-SDE's Gaussian Fourier noise-level embedding (output divided by sigma), no mid block
PIXEL_FOURIER = dict(
    PIXEL_TINY,
    time_embedding_type="fourier",
    norm_eps=1e-6,
    mid_block_scale_factor=2**0.5,
    class_embed_type="identity",
    layers_per_block=1,
)
PIXEL = {"tiny": PIXEL_TINY, "ldm": PIXEL_LDM, "variant": PIXEL_VARIANT, "fourier": PIXEL_FOURIER}

# ---- UNet2DConditionModel configs ------------------------------------------------------------
# diffusers' own tiny test config (tests/models/unets/test_models_unet_2d_condition.py)
COND_TINY = dict(
    block_out_channels=(4, 8),
    norm_num_groups=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8,
    attention_head_dim=2,
    out_channels=4,
    in_channels=4,
    layers_per_block=1,
    sample_size=16,
)
# diffusers' Stable Diffusion 2 pipeline test U-Net (dummy_cond_unet): per-block head counts,
# linear projections
COND_SD2 = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
)
# Stable Diffusion 1.5's shape (4 levels: 3 cross-attention levels and a plain one, 2 layers
# each, the same head count at every level, GEGLU transformers) at a tenth of its widths
COND_SD15 = dict(
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=8,
)
# options off the SD path: timestep class embedding, scale-shift ResNets, two transformer
# layers, only-cross-attention in one block, an extra activation on the embedding
COND_VARIANT = dict(
    COND_TINY,
    class_embed_type="timestep",
    resnet_time_scale_shift="scale_shift",
    transformer_layers_per_block=(2, 1),
    only_cross_attention=(True, False),
    upcast_attention=True,
    use_linear_projection=True,
    time_embedding_act_fn="silu",
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
# more: a class table concatenated to the time embedding, Fourier time embedding with a post
# activation and a condition projection, a text projection, GELU (no fused norm at the output),
# 1x1 in/out convs, a mid block without attention, pixel-attention blocks
COND_VARIANT2 = dict(
    COND_TINY,
    num_class_embeds=5,
    class_embeddings_concat=True,
    time_embedding_type="fourier",
    timestep_post_act="silu",
    time_cond_proj_dim=6,
    encoder_hid_dim=12,
    act_fn="gelu",
    conv_in_kernel=1,
    conv_out_kernel=1,
    center_input_sample=True,
    mid_block_type="UNetMidBlock2D",
    down_block_types=("CrossAttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "CrossAttnUpBlock2D"),
)
COND = {
    "tiny": COND_TINY,
    "sd2": COND_SD2,
    "sd15": COND_SD15,
    "variant": COND_VARIANT,
    "variant2": COND_VARIANT2,
}


def _pair(cls, peer_cls, config, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    peer = perturb_(peer_cls(**config), seed=seed).to(dtype).eval()
    ours = cls.from_config(peer.config).to(dtype).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


def _pixel_pair(name, dtype=torch.float32):
    return _pair(UNet2DModel, diffusers.UNet2DModel, PIXEL[name], dtype)


def _cond_pair(name, dtype=torch.float32):
    return _pair(UNet2DConditionModel, diffusers.UNet2DConditionModel, COND[name], dtype)


def _sample(config, dtype, batch=2, size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = size or (config["sample_size"], config["sample_size"])
    return torch.randn(batch, config["in_channels"], *s, generator=g, dtype=dtype)


def _pixel_inputs(name, dtype):
    config = PIXEL[name]
    x = _sample(config, dtype)
    kw = {}
    if config.get("time_embedding_type") == "fourier":
        t = torch.tensor([0.3, 7.0], dtype=dtype)  # noise levels (log is taken)
        kw["class_labels"] = torch.randn(2, 16, dtype=dtype)  # identity: (B, time_embed_dim)
    else:
        t = torch.tensor([10, 977])
    if config.get("num_class_embeds"):
        kw["class_labels"] = torch.tensor([1, 4])
    return x, t, kw


def _cond_inputs(name, dtype, tokens=7):
    config = COND[name]
    g = torch.Generator().manual_seed(5)
    x = _sample(config, dtype)
    width = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    ctx = torch.randn(2, tokens, width, generator=g, dtype=dtype)
    kw = {}
    if config.get("time_embedding_type") == "fourier":
        t = torch.tensor([0.5, 3.0], dtype=dtype)
    else:
        t = torch.tensor([10, 977])
    if config.get("class_embed_type") == "timestep":
        kw["class_labels"] = torch.tensor([3, 500])
    if config.get("num_class_embeds"):
        kw["class_labels"] = torch.tensor([1, 4])
    if config.get("time_cond_proj_dim"):
        kw["timestep_cond"] = torch.randn(2, config["time_cond_proj_dim"], generator=g, dtype=dtype)
    return x, t, ctx, kw


def _inputs_to_float64(module, args, kwargs):
    """A forward pre-hook giving the float64 copy of a model float64 versions of the float
    tensors a test's call passes it (text embeddings, masks held in the call's closure)."""

    def cast(v):
        return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _check_pair(ours, peer, call, x, dtype):
    """Outputs, parameter gradients and the input gradient of ``call(model, x)`` agree."""
    tol = TOL[dtype]
    with torch.no_grad():
        a, b = call(ours, x), call(peer, x)
    assert a.shape == b.shape
    assert rel(a, b) < tol, rel(a, b)
    w = torch.randn(b.shape, dtype=dtype, generator=torch.Generator().manual_seed(9))

    def grads(model):
        xi = x.detach().clone().requires_grad_(True)
        g = grads_after(model, lambda m: (call(m, xi) * w).sum())
        return g, xi.grad

    (go, gxo), (gp, gxp) = grads(ours), grads(peer)
    assert len(go) == len([p for p in peer.parameters() if p.requires_grad])
    try:
        assert_grads_match(go, gp, tol)
    except AssertionError:
        if dtype != torch.float32:
            raise
        # a float32 gradient outside the bound still passes when its error against the peer's
        # float64 gradients is at most twice the peer's own (the rule the VAE tests use)
        peer64 = copy.deepcopy(peer).double()
        peer64.register_forward_pre_hook(_inputs_to_float64, with_kwargs=True)
        ref = grads_after(peer64, lambda m: (call(m, x.double()) * w.double()).sum())
        assert_grads_match(go, gp, tol, ref=ref)
    assert rel(gxo, gxp) < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(PIXEL))
def test_unet2d_matches_diffusers(name, dtype):
    ours, peer = _pixel_pair(name, dtype)
    x, t, kw = _pixel_inputs(name, dtype)
    _check_pair(ours, peer, lambda m, x: m(x, t, **kw).sample, x, dtype)


def test_unet2d_timestep_class_embedding():
    """class_embed_type 'timestep' (float32: diffusers feeds the float32 sinusoid to the class
    embedding without casting it, so its float64 model cannot run this)."""
    config = dict(PIXEL_TINY, class_embed_type="timestep")
    ours, peer = _pair(UNet2DModel, diffusers.UNet2DModel, config)
    x, labels = _sample(config, torch.float32), torch.tensor([2, 700])
    _check_pair(ours, peer, lambda m, x: m(x, 5, class_labels=labels).sample, x, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", thin(list(COND), 2))
def test_unet2d_condition_matches_diffusers(name, dtype):
    ours, peer = _cond_pair(name, dtype)
    x, t, ctx, kw = _cond_inputs(name, dtype)
    _check_pair(ours, peer, lambda m, x: m(x, t, ctx, **kw).sample, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unet2d_condition_odd_size(dtype):
    """A 15x10 latent (not a multiple of 2): the up block upsamples to the skip states' size."""
    ours, peer = _cond_pair("tiny", dtype)
    x = _sample(COND_TINY, dtype, size=(15, 10))
    _, t, ctx, _ = _cond_inputs("tiny", dtype)
    _check_pair(ours, peer, lambda m, x: m(x, t, ctx).sample, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["bool", "float"])
def test_encoder_attention_mask_matches_diffusers(form, dtype):
    """Padded text: entry 0 keeps 7 tokens, entry 1 keeps 3 (a prefix mask, genext's kernel);
    diffusers applies it as a -10000 bias, genext as key lengths."""
    ours, peer = _cond_pair("sd2", dtype)
    x, t, ctx, _ = _cond_inputs("sd2", dtype)
    keep = torch.tensor([[1] * 7, [1] * 3 + [0] * 4])
    mask = keep.bool() if form == "bool" else keep.to(dtype)
    _check_pair(ours, peer, lambda m, x: m(x, t, ctx, encoder_attention_mask=mask).sample, x, dtype)
    with torch.no_grad():
        masked = ours(x, t, ctx, encoder_attention_mask=mask).sample
        assert rel(masked, ours(x, t, ctx).sample) > 1e-3  # the mask mattered
        # the padded tokens' values are ignored
        ctx2 = ctx.clone()
        ctx2[1, 3:] = 100.0
        assert rel(ours(x, t, ctx2, encoder_attention_mask=mask).sample, masked) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_encoder_attention_mask_not_a_prefix(dtype):
    """A mask that is not a prefix goes to PyTorch's SDPA and gives diffusers' output too."""
    ours, peer = _cond_pair("tiny", dtype)
    x, t, ctx, _ = _cond_inputs("tiny", dtype)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 0, 0, 0, 1]]).bool()
    _check_pair(ours, peer, lambda m, x: m(x, t, ctx, encoder_attention_mask=mask).sample, x, dtype)


def test_encoder_attention_mask_keeping_no_token():
    """An entry whose mask keeps no token: diffusers' -10000 bias on every score makes its
    attention uniform over all tokens, and so does genext. In float32 diffusers' ``score -
    10000`` keeps only about 3 significant digits of the score, so float32 is judged against
    diffusers' float64 output: no further from it than diffusers' own float32 output."""
    keep = torch.tensor([[1] * 7, [0] * 7])
    ours, peer = _cond_pair("tiny", torch.float64)
    x, t, ctx, _ = _cond_inputs("tiny", torch.float64)
    out = {}
    for dtype in (torch.float64, torch.float32):  # the same weights and inputs, rounded
        ours, peer, x, ctx = ours.to(dtype), peer.to(dtype), x.to(dtype), ctx.to(dtype)
        with torch.no_grad():
            out[dtype] = [m(x, t, ctx, encoder_attention_mask=keep).sample for m in (ours, peer)]
    ref = out[torch.float64][1]
    assert rel(out[torch.float64][0], ref) < 1e-10
    ours32, peer32 = out[torch.float32]
    assert rel(ours32, ref) <= max(rel(peer32, ref), 1e-6)


def test_timestep_forms_match_diffusers():
    """A Python int or float, a 0-d, (1,) or (B,) tensor, converted and broadcast as diffusers
    does (UNet2DModel truncates a Python float to an int, UNet2DConditionModel keeps it)."""
    cond, cpeer = _cond_pair("tiny")
    pix, ppeer = _pixel_pair("tiny")
    x, _, ctx, _ = _cond_inputs("tiny", torch.float32)
    xp = _sample(PIXEL_TINY, torch.float32)
    forms = [7, 7.6, torch.tensor(7), torch.tensor(7.25), torch.tensor([7]), torch.tensor([7, 400])]
    with torch.no_grad():
        for t in forms:
            assert rel(cond(x, t, ctx).sample, cpeer(x, t, ctx).sample) < 1e-5
            assert rel(pix(xp, t).sample, ppeer(xp, t).sample) < 1e-5
        # broadcasting: a scalar equals the same value per entry
        assert rel(cond(x, 7, ctx).sample, cond(x, torch.tensor([7, 7]), ctx).sample) == 0


def test_return_dict_false_and_output():
    ours, _ = _cond_pair("tiny")
    x, t, ctx, _ = _cond_inputs("tiny", torch.float32)
    with torch.no_grad():
        out = ours(x, t, ctx)
        tup = ours(x, t, ctx, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1
    assert torch.equal(out.sample, tup[0]) and torch.equal(out[0], tup[0])


def test_class_labels_required():
    ours, _ = _pixel_pair("variant")
    x = _sample(PIXEL_VARIANT, torch.float32)
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, 3)
    plain, _ = _pixel_pair("tiny")
    with pytest.raises(ValueError, match="class_labels"):
        plain(_sample(PIXEL_TINY, torch.float32), 3, class_labels=torch.tensor([1, 2]))


@pytest.mark.parametrize("kind", ["pixel", "cond"])
def test_from_pretrained_of_diffusers_folder(kind, tmp_path):
    """A folder written by diffusers' save_pretrained loads here (as a pipeline's subfolder) and
    gives its output; genext's save_pretrained is read back by diffusers."""
    if kind == "pixel":
        _, peer = _pixel_pair("tiny")
        cls, x, args = UNet2DModel, _sample(PIXEL_TINY, torch.float32), ()
    else:
        _, peer = _cond_pair("sd2")
        cls = UNet2DConditionModel
        x, _, ctx, _ = _cond_inputs("sd2", torch.float32)
        args = (ctx,)
    peer.save_pretrained(tmp_path / "unet")
    ours = cls.from_pretrained(tmp_path, subfolder="unet")
    with torch.no_grad():
        want = peer(x, 10, *args).sample
        assert rel(ours(x, 10, *args).sample, want) < TOL[torch.float32]
    ours.save_pretrained(tmp_path / "ours")
    back = type(peer).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel(back(x, 10, *args).sample, want) < TOL[torch.float32]
    f64 = cls.from_pretrained(tmp_path / "unet", torch_dtype=torch.float64)
    assert f64.dtype == torch.float64 and f64.device.type == "cpu"


def _served(model, x, ctx, mask=None):
    """Whether genext's attention kernel serves the model's attention at this input: asked of
    sdpa_backend with a query/key of each transformer's head layout."""
    backends = set()
    b = x.shape[0]
    for name, m in model.named_modules():
        if isinstance(m, blocks.Attention):
            d = m.dim_head
            q = torch.empty(b, m.heads, 4, d, dtype=x.dtype, device=x.device)
            cross = name.endswith("attn2") and ctx is not None
            lk = ctx.shape[1] if cross else 4
            k = torch.empty(b, m.heads, lk, d, dtype=x.dtype, device=x.device)
            am = mask[:, None, None, :] if (cross and mask is not None) else None
            backends.add(sdpa_backend(q, k, k, attn_mask=am))
    return backends


@pytest.mark.parametrize("masked", [False, True])
def test_profile_genext_kernels_ran(masked):
    ours, _ = _cond_pair("tiny")
    x, t, ctx, _ = _cond_inputs("tiny", torch.float32)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4]) if masked else None
    names = op_names(lambda: ours(x, t, ctx, encoder_attention_mask=mask).sample.sum().backward())
    assert "genext::group_norm_silu" in names
    assert "aten::native_group_norm" not in names
    served = _served(ours, x, ctx, mask)
    assert served  # the model has attention layers to ask about
    if "genext" in served:
        assert "genext::flash_attention_forward" in names
    if served == {"genext"}:
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in names


def test_profile_pixel_unet():
    ours, _ = _pixel_pair("tiny")
    x = _sample(PIXEL_TINY, torch.float32)
    names = op_names(lambda: ours(x, 10).sample.sum().backward())
    assert "genext::group_norm_silu" in names
    assert "aten::native_group_norm" not in names
    if "genext" in _served(ours, x, None):
        assert "genext::flash_attention_forward" in names


def test_gradient_checkpointing_same_gradients(monkeypatch):
    # with dropout in training mode: the recomputed forward must draw the same dropout masks
    ours, _ = _pair(
        UNet2DConditionModel, diffusers.UNet2DConditionModel, dict(COND_TINY, dropout=0.3)
    )
    ours.train()
    x, t, ctx, _ = _cond_inputs("tiny", torch.float32)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])

    def loss(m):
        torch.manual_seed(11)
        return m(x, t, ctx, encoder_attention_mask=mask).sample.square().sum()

    plain = grads_after(ours, loss)
    ours.enable_gradient_checkpointing()
    assert ours.gradient_checkpointing
    calls = []
    original = unet_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting)
    ckpt = grads_after(ours, loss)
    ours.disable_gradient_checkpointing()
    assert_grads_match(ckpt, plain, 1e-6)
    # every down block, the mid block and every up block ran checkpointed
    assert len(calls) == len(ours.down_blocks) + 1 + len(ours.up_blocks)


def test_positional_arguments_in_diffusers_order():
    # diffusers' 5th positional argument is timestep_cond (LCM's guidance embedding)
    config = dict(COND_TINY, time_cond_proj_dim=5)
    ours, peer = _pair(UNet2DConditionModel, diffusers.UNet2DConditionModel, config)
    x, t, ctx, _ = _cond_inputs("tiny", torch.float32)
    w = torch.randn(2, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours(x, t, ctx, None, w).sample
        assert rel(got, peer(x, t, ctx, None, w).sample) < 1e-5
        assert rel(got, ours(x, t, ctx).sample) > 1e-3  # the condition was used


@pytest.mark.parametrize(
    "kind", ["soft", "additive-inf", "additive-1e4", "float-0-1", "fully-masked-float"]
)
def test_text_masks_that_are_not_boolean_match_diffusers(kind):
    # diffusers adds (1 - mask) * -10000 whatever the values: soft weights and additive masks
    # passed by mistake must give what diffusers gives, not a key-padding reading of them
    ours, peer = _cond_pair("tiny", torch.float64)
    x, t, ctx, _ = _cond_inputs("tiny", torch.float64)
    mask = torch.ones(2, 7, dtype=torch.float64)
    if kind == "soft":
        mask[0] = torch.tensor([0.5, 0.5, 0, 0, 0, 0.2, 0])
    elif kind == "additive-inf":
        mask[1, 3:] = float("-inf")
        mask[1, :3] = 0
    elif kind == "additive-1e4":
        mask[1, 3:] = -1e4
        mask[1, :3] = 0
    elif kind == "float-0-1":
        mask[1, 4:] = 0
    else:
        mask[0] = 0
    with torch.no_grad():
        got = ours(x, t, ctx, encoder_attention_mask=mask).sample
        want = peer(x, t, ctx, encoder_attention_mask=mask).sample
    assert rel(got, want) < 1e-10


def test_dtype_device_and_config():
    ours, peer = _cond_pair("sd2")
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert ours.config.attention_head_dim == [2, 4]
    assert ours.config.cross_attention_dim == peer.config.cross_attention_dim
    assert ours.to(torch.float64).dtype == torch.float64
    with pytest.raises(TypeError):
        ours.config["in_channels"] = 3


@pytest.mark.slow  # the quick profile compiles the patched U-Net (tests/integrations/test_patch.py)
def test_compile_fullgraph_matches_eager():
    ours, _ = _cond_pair("tiny")
    x, t, ctx, _ = _cond_inputs("tiny", torch.float32)
    # aot_eager: the whole forward captured as one graph (no break) and run through
    # AOTAutograd with genext's fake kernels, without inductor's code generation, which took
    # minutes on a shared 2-core machine
    fn = torch.compile(lambda x, ctx: ours(x, t, ctx).sample, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel(fn(x, ctx), ours(x, t, ctx).sample) < 1e-5


@pytest.mark.parametrize(
    "cls, extra, match",
    [
        (UNet2DConditionModel, dict(addition_embed_type="text_time"), "addition_embed_type"),
        (UNet2DConditionModel, dict(dual_cross_attention=True), "dual_cross_attention"),
        (
            UNet2DConditionModel,
            dict(encoder_hid_dim=8, encoder_hid_dim_type="image_proj"),
            "encoder_hid_dim_type",
        ),
        (UNet2DConditionModel, dict(attention_type="gated"), "attention_type"),
        (
            UNet2DConditionModel,
            dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"),
            "mid_block_type",
        ),
        (
            UNet2DConditionModel,
            dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
            "SimpleCrossAttnDownBlock2D",
        ),
        (
            UNet2DModel,
            dict(down_block_types=("SkipDownBlock2D", "AttnDownBlock2D")),
            "SkipDownBlock2D",
        ),
        (
            UNet2DModel,
            dict(downsample_type="resnet", down_block_types=("AttnDownBlock2D", "DownBlock2D")),
            "downsample_type",
        ),
        (UNet2DModel, dict(upsample_type="resnet"), "upsample_type"),
    ],
)
def test_unsupported_options_raise(cls, extra, match):
    base = COND_TINY if cls is UNet2DConditionModel else PIXEL_TINY
    with pytest.raises(NotImplementedError, match=match):
        cls(**{**base, **extra})


def test_unsupported_forward_arguments_raise():
    ours, _ = _cond_pair("tiny")
    x, t, ctx, _ = _cond_inputs("tiny", torch.float32)
    with pytest.raises(NotImplementedError, match="added_cond_kwargs"):
        ours(x, t, ctx, added_cond_kwargs={"text_embeds": x})
    with pytest.raises(NotImplementedError, match="down_intrablock_additional_residuals"):
        ours(x, t, ctx, down_intrablock_additional_residuals=(x,))
    with pytest.raises(ValueError, match="num_attention_heads"):
        UNet2DConditionModel(**{**COND_TINY, "num_attention_heads": 2})


def test_controlnet_residuals_match_diffusers():
    ours, peer = _cond_pair("tiny", torch.float64)
    x, t, ctx, _ = _cond_inputs("tiny", torch.float64)
    with torch.no_grad():
        skips = [
            torch.randn(2, 4, 16, 16, dtype=torch.float64),
            torch.randn(2, 4, 16, 16, dtype=torch.float64),
            torch.randn(2, 4, 8, 8, dtype=torch.float64),
            torch.randn(2, 8, 8, 8, dtype=torch.float64),
        ]
        mid = torch.randn(2, 8, 8, 8, dtype=torch.float64)
        kw = dict(down_block_additional_residuals=tuple(skips), mid_block_additional_residual=mid)
        assert rel(ours(x, t, ctx, **kw).sample, peer(x, t, ctx, **kw).sample) < 1e-10


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_transformer2d_matches_diffusers(linear, dtype):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel as Peer

    kw = dict(
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=8,
        num_layers=2,
        norm_num_groups=4,
        cross_attention_dim=6,
        use_linear_projection=linear,
    )
    peer = perturb_(Peer(**kw)).to(dtype).eval()
    ours = blocks.Transformer2DModel(**kw).to(dtype).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    ctx = torch.randn(2, 5, 6, dtype=dtype)
    keep = torch.tensor([[1] * 5, [1] * 2 + [0] * 3])
    x = torch.randn(2, 8, 3, 5, dtype=dtype)

    def call(m, x):
        return m(x, encoder_hidden_states=ctx, encoder_attention_mask=keep).sample

    _check_pair(ours, peer, call, x, dtype)
