"""genext.models.AutoencoderKL against diffusers' AutoencoderKL with the same (perturbed random)
weights: outputs, posterior, gradients, one optimiser step, tiling, slicing, loading and saving,
and that genext's kernels are the ones that ran."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import genext
from genext.models import AutoencoderKL
from genext.models import vae as vae_module

from conftest import slow, thin
from peer_parity import assert_grads_match, grads_after, op_names, perturb_, rel

diffusers = pytest.importorskip("diffusers")

# diffusers' own tiny test config (tests/models/autoencoders/test_models_autoencoder_kl.py,
# get_autoencoder_kl_config): two blocks of 2 and 4 channels, 2 groups
TINY = dict(
    block_out_channels=[2, 4],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    norm_num_groups=2,
)
# the Stable Diffusion VAE's shape (4 blocks, 2 ResNet layers each, 32 groups, 4 latent
# channels) at a quarter of its widths
SD_SMALL = dict(
    block_out_channels=[32, 64, 64, 64],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    norm_num_groups=32,
    layers_per_block=2,
    sample_size=64,
)
# the switches off the default path: no attention, no quant convs, a non-SiLU activation
VARIANT = dict(
    TINY,
    block_out_channels=[4, 6],
    layers_per_block=2,
    mid_block_add_attention=False,
    use_quant_conv=False,
    use_post_quant_conv=False,
    act_fn="gelu",
)
CONFIGS = {"tiny": TINY, "sd_small": SD_SMALL, "variant": VARIANT}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _pair(config: dict, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    peer = perturb_(diffusers.AutoencoderKL(**config), seed=seed).to(dtype)
    ours = AutoencoderKL.from_config(peer.config).to(dtype)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


def _image(config: dict, dtype: torch.dtype, batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, config["in_channels"], size, size, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", thin(list(CONFIGS), 3))
def test_outputs_match_diffusers(name, dtype):
    config = CONFIGS[name]
    ours, peer = _pair(config, dtype)
    x = _image(config, dtype)
    tol = TOL[dtype]
    with torch.no_grad():
        po, pp = ours.encode(x).latent_dist, peer.encode(x).latent_dist
        for field in ("mean", "logvar", "std", "var"):
            assert rel(getattr(po, field), getattr(pp, field)) < tol, field
        assert rel(po.kl(), pp.kl()) < tol
        # KL to another posterior (of another batch of images)
        x2 = _image(config, dtype)
        qo, qp = ours.encode(x2).latent_dist, peer.encode(x2).latent_dist
        assert rel(po.kl(qo), pp.kl(qp)) < tol
        z = pp.mode()
        assert rel(po.nll(z), pp.nll(z)) < tol
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert rel(po.sample(g1), pp.sample(g2)) < tol
        assert rel(ours.decode(z).sample, peer.decode(z).sample) < tol
        assert rel(ours(x).sample, peer(x).sample) < tol
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        a = ours(x, sample_posterior=True, generator=g1).sample
        b = peer(x, sample_posterior=True, generator=g2).sample
        assert rel(a, b) < tol
        (t,) = ours.decode(z, return_dict=False)
        assert torch.equal(t, ours.decode(z).sample)


@pytest.mark.parametrize("dtype", [slow(torch.float32), torch.float64])
@pytest.mark.parametrize("name", thin(["tiny", "variant"], 2))
def test_gradients_match_diffusers(name, dtype):
    config = CONFIGS[name]
    ours, peer = _pair(config, dtype)
    x = _image(config, dtype)
    w = torch.randn(x.shape, dtype=dtype)
    eps = torch.randn(x.shape[0], config["latent_channels"], 16, 16, dtype=dtype)

    def loss_of(x, w, eps):
        def loss(model):
            post = model.encode(x).latent_dist
            z = post.mean + post.std * eps  # a posterior sample with fixed noise
            return (model.decode(z).sample * w).sum() + post.kl().sum()

        return loss

    loss = loss_of(x, w, eps)
    ref = None
    if dtype == torch.float32:  # the peer in float64: the yardstick for cancellation
        ref = grads_after(
            copy.deepcopy(peer).double(), loss_of(x.double(), w.double(), eps.double())
        )
    assert_grads_match(grads_after(ours, loss), grads_after(peer, loss), TOL[dtype], ref)
    # the input gradient too
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ours(xo).sample * w).sum().backward()
    (peer(xp).sample * w).sum().backward()
    assert rel(xo.grad, xp.grad) < TOL[dtype]


@pytest.mark.slow  # the quick profile checks the tiny configuration's gradients
def test_sd_shaped_gradients_match_diffusers():
    ours, peer = _pair(SD_SMALL)
    x = _image(SD_SMALL, torch.float32, batch=1)
    w = torch.randn(x.shape)

    def loss_of(x, w):
        return lambda model: (model(x).sample * w).sum()

    ref = grads_after(copy.deepcopy(peer).double(), loss_of(x.double(), w.double()))
    loss = loss_of(x, w)
    assert_grads_match(grads_after(ours, loss), grads_after(peer, loss), 1e-5, ref)


@pytest.mark.parametrize(
    "momentum, weight_decay, steps", thin([(0.0, 0.0, 1), (0.9, 1e-2, 2)], 2, argcount=3)
)
def test_training_steps_match_diffusers(momentum, weight_decay, steps):
    """genext's kernels are drop-in in training: the same steps give the same weights (every
    parameter within 1e-5), for plain SGD and for two steps of SGD with momentum and weight decay.

    Adam is not compared this way: its first step is about lr * sign(g), so an element whose
    gradient is rounding noise around zero (the attention's key bias always: softmax ignores a
    shift shared by all keys) moves by +-lr on the noise's sign, which differs between any two
    fp32 implementations (diffusers against itself at 1 and 2 threads: 1.2e-3 relative on that
    bias)."""
    config = dict(TINY, block_out_channels=[4, 8])
    ours, peer = _pair(config)
    x = _image(config, torch.float32, batch=4)
    start = {n: p.detach().clone() for n, p in peer.named_parameters()}
    params = {}
    for model in (ours, peer):
        opt = torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay
        )
        for step in range(steps):
            post = model.encode(x).latent_dist
            rec = model.decode(post.sample(torch.Generator().manual_seed(step))).sample
            loss = torch.nn.functional.mse_loss(rec, x) + 1e-3 * post.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        params[model is ours] = dict(model.named_parameters())
    for name, p in params[False].items():
        assert rel(params[True][name], p) < 1e-5, name
    # and the steps moved the weights (a no-op step would pass the comparison)
    moved = sum(not torch.equal(p, start[n]) for n, p in params[False].items())
    assert moved >= len(start) - 2  # the attention key biases have a zero gradient


def test_genext_kernels_run_and_aten_group_norm_does_not(avx2_routing):
    ours, _ = _pair(TINY)
    x = _image(TINY, torch.float32).requires_grad_()
    names = op_names(lambda: ours(x).sample.sum().backward())
    assert "genext::group_norm_silu" in names
    assert "genext::flash_attention_forward" in names
    assert "genext::flash_attention_backward" in names
    assert "aten::native_group_norm" not in names
    assert "aten::group_norm" not in names
    assert not any("scaled_dot_product" in n for n in names), sorted(names)


@pytest.mark.slow
def test_tiling_matches_diffusers_and_bounds_tile_size():
    config = dict(TINY, sample_size=16)
    ours, peer = _pair(config)
    ours.enable_tiling()
    peer.enable_tiling()
    x = _image(config, torch.float32, batch=1, size=40)  # not a multiple of the tile stride
    seen = []
    hook = ours.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-2:]))
    with torch.no_grad():
        po, pp = ours.encode(x).latent_dist, peer.encode(x).latent_dist
        assert rel(po.mean, pp.mean) < 1e-5
        z = pp.mode()
        a, b = ours.decode(z).sample, peer.decode(z).sample
    hook.remove()
    assert a.shape == b.shape == x.shape
    assert rel(a, b) < 1e-5
    assert len(seen) > 1 and max(max(s) for s in seen) <= ours.tile_latent_min_size
    # tiles are blended, not simply the untiled result
    ours.disable_tiling()
    with torch.no_grad():
        assert rel(ours.decode(z).sample, a) > 1e-3


def test_slicing_equals_whole_batch():
    ours, _ = _pair(TINY)
    x = _image(TINY, torch.float32, batch=3)
    with torch.no_grad():
        whole = ours(x).sample
        ours.enable_slicing()
        sliced = ours(x).sample
    assert rel(sliced, whole) < 1e-5  # per-image convolutions round differently


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients():
    ours, _ = _pair(TINY)
    x = _image(TINY, torch.float32)

    def loss(model):
        return model(x).sample.square().sum()

    plain = grads_after(ours, loss)
    ours.enable_gradient_checkpointing()
    assert_grads_match(grads_after(ours, loss), plain, 1e-6)


def test_from_pretrained_reads_diffusers_folder_and_back(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours, peer = _pair(TINY)
    peer.save_pretrained(tmp_path / "peer")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "peer")
    x = _image(TINY, torch.float32)
    with torch.no_grad():
        assert rel(loaded(x).sample, peer(x).sample) < 1e-5
    assert loaded.config.block_out_channels == [2, 4]
    # a pipeline folder's component, and our save read back by diffusers
    ours.save_pretrained(tmp_path / "pipe" / "vae")
    again = AutoencoderKL.from_pretrained(
        tmp_path / "pipe", subfolder="vae", torch_dtype=torch.float64
    )
    assert again.dtype == torch.float64
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "pipe" / "vae")
    with torch.no_grad():
        assert rel(back(x).sample, ours(x).sample) < 1e-5
    with pytest.raises(FileNotFoundError, match="not a folder"):
        AutoencoderKL.from_pretrained(tmp_path / "missing")


def test_legacy_attention_key_names_load(tmp_path):
    ours, peer = _pair(TINY)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in peer.state_dict().items():
        for new, old in renames.items():
            k = k.replace(f".{new}.", f".{old}.")
        state[k] = v
    assert any(".proj_attn." in k for k in state)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(peer.config)))
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    loaded = AutoencoderKL.from_pretrained(folder)
    x = _image(TINY, torch.float32)
    with torch.no_grad():
        assert rel(loaded(x).sample, peer(x).sample) < 1e-5


def test_config_handling():
    peer = diffusers.AutoencoderKL(**TINY)
    # diffusers' FrozenDict, a plain dict, and bookkeeping keys
    m = AutoencoderKL.from_config(peer.config)
    assert m.config.latent_channels == 4 and m.config["norm_num_groups"] == 2
    assert (
        AutoencoderKL.from_config(dict(TINY, _class_name="AutoencoderKL")).config.in_channels == 3
    )
    with pytest.warns(UserWarning, match="not_a_field"):
        AutoencoderKL.from_config(dict(TINY, not_a_field=1))
    with pytest.raises(TypeError, match="read-only"):
        m.config["latent_channels"] = 8
    assert copy.deepcopy(m).config == m.config
    assert m.config.scaling_factor == peer.config.scaling_factor
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        AutoencoderKL(**dict(TINY, down_block_types=["AttnDownEncoderBlock2D"] * 2))
    with pytest.raises(ValueError, match="1 entries"):
        AutoencoderKL(**dict(TINY, down_block_types=["DownEncoderBlock2D"]))


@pytest.mark.slow  # the quick profile compiles the patched U-Net (tests/integrations/test_patch.py)
def test_compile_fullgraph_matches_eager():
    ours, _ = _pair(TINY)
    x = _image(TINY, torch.float32)
    decode = torch.compile(lambda z: ours.decode(z).sample, fullgraph=True)
    with torch.no_grad():
        z = ours.encode(x).latent_dist.mode()
        assert rel(decode(z), ours.decode(z).sample) < 1e-5


def test_is_reachable_from_package():
    assert genext.models.AutoencoderKL is AutoencoderKL


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_diffusers_and_the_float64_model(dtype, monkeypatch):
    """On the GPU: float32 equal to diffusers' (TF32 off for both); 16-bit no worse than twice
    diffusers' own error against the float64 model on the CPU. SD_SMALL's mid-block attention
    has one head of dim 64, served by genext's kernel."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ours64, peer64 = _pair(SD_SMALL, torch.float64)
    x = _image(SD_SMALL, torch.float64, batch=2, size=64)
    with torch.no_grad():
        ref = peer64(x).sample
        ours = copy.deepcopy(ours64).to("cuda", dtype)
        peer = copy.deepcopy(peer64).to("cuda", dtype)
        xc = x.to("cuda", dtype)
        a, b = ours(xc).sample.double().cpu(), peer(xc).sample.double().cpu()
    assert torch.isfinite(a).all()
    if dtype == torch.float32:
        assert rel(a, b) < 1e-5
    else:
        assert rel(a, ref) <= 2 * rel(b, ref) + 1e-6, (rel(a, ref), rel(b, ref))
    # and the gradients of a training step, in float32 on the GPU against the CPU float64 model
    if dtype == torch.float32:
        w = torch.randn(x.shape, dtype=torch.float64)

        def loss_of(x, w):
            return lambda model: (model(x).sample * w).sum()

        ref_g = grads_after(peer64, loss_of(x, w))
        go = grads_after(ours, loss_of(xc, w.to("cuda", dtype)))
        gp = grads_after(peer, loss_of(xc, w.to("cuda", dtype)))
        go = {k: v.cpu() for k, v in go.items()}
        gp = {k: v.cpu() for k, v in gp.items()}
        assert_grads_match(go, gp, 1e-4, ref_g)


@pytest.mark.cuda
def test_cuda_sd_vae_head_dim_512_runs():
    """The SD VAE's mid-block attention is one head of dim 512, above genext's CUDA kernels'
    limit: it goes to PyTorch's SDPA, and the result still equals diffusers'."""
    config = dict(SD_SMALL, block_out_channels=[32, 64, 64, 512])
    ours64, peer64 = _pair(config, torch.float64)
    z = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = peer64.decode(z).sample
        ours = copy.deepcopy(ours64).to("cuda", torch.float16)
        peer = copy.deepcopy(peer64).to("cuda", torch.float16)
        zc = z.to("cuda", torch.float16)
        a, b = ours.decode(zc).sample.double().cpu(), peer.decode(zc).sample.double().cpu()
    assert torch.isfinite(a).all()
    assert rel(a, ref) <= 2 * rel(b, ref) + 1e-6, (rel(a, ref), rel(b, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extent", [3, 6, 16])
def test_blend_is_bitwise_diffusers(dtype, extent):
    """Tile blending gives diffusers' bits in every dtype, for blend widths that are not powers
    of two too (SD 2.x's 768-pixel tiles blend over 192 and 24 pixels)."""
    peer = diffusers.AutoencoderKL(**TINY)
    a = torch.randn(1, 3, 20, 20).to(dtype)
    b = torch.randn(1, 3, 20, 20).to(dtype)
    for dim, blend in ((2, peer.blend_v), (3, peer.blend_h)):
        ours = vae_module._blend(a, b.clone(), extent, dim)
        theirs = blend(a, b.clone(), extent)
        assert torch.equal(ours, theirs)


def test_sample_with_a_list_of_generators_as_diffusers():
    ours, peer = _pair(TINY)
    x = _image(TINY, torch.float32, batch=2)
    with torch.no_grad():
        po, pp = ours.encode(x).latent_dist, peer.encode(x).latent_dist
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        a = po.sample([torch.Generator().manual_seed(s) for s in (1, 2)])
        b = pp.sample(gens)
    assert rel(a, b) < 1e-6
    with pytest.raises(ValueError, match="one per entry"):
        po.sample([torch.Generator()] * 3)


def test_output_records_behave_like_diffusers():
    ours, peer = _pair(TINY)
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        a, b = ours.decode(z), peer.decode(z)
    assert list(a.keys()) == list(b.keys()) == ["sample"]
    assert list(a) == list(b)  # iteration gives the field names, as an OrderedDict
    assert torch.equal(a[0], a.sample) and torch.equal(a["sample"], a.sample)
    assert a.commit_loss is None
    assert isinstance(dict(a), dict) and len(a.to_tuple()) == 1
    cfg = ours.config
    with pytest.raises(TypeError):
        cfg |= {"latent_channels": 9}
    assert ours.config.latent_channels == 4
