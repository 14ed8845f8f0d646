"""genext.patch / unpatch / patch_report on diffusers' own models (perturbed random weights): the
patched model computes what the unpatched one does (outputs and gradients, fp32 and fp64), its
state is untouched, unpatch restores it exactly, genext's kernels are the ones that ran, and the
report counts what the configs say."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import genext
from genext.nn.functional import sdpa_backend

from conftest import thin
from peer_parity import assert_grads_match, op_names, perturb_, rel

diffusers = pytest.importorskip("diffusers")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]

# two levels, attention in the second (a group_norm inside each Attention), 4 groups
UNET = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    attention_head_dim=4,
)
# ResNet blocks that down- and upsample inside (down=True / up=True), and mid-block ResNets whose
# output is divided by sqrt(2)
UNET_RESAMPLE = dict(
    UNET,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
    up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D"),
    mid_block_scale_factor=2**0.5,
)
# diffusers' own tiny test config of UNet2DConditionModel, with 4 groups and two heads
COND = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8,
    attention_head_dim=2,
    norm_num_groups=4,
)
# the time embedding as a scale and shift between norm2 and the SiLU
COND_SCALE_SHIFT = dict(COND, resnet_time_scale_shift="scale_shift")
VAE = dict(
    block_out_channels=[4, 8],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    norm_num_groups=2,
)
VQ = dict(VAE, num_vq_embeddings=16, vq_embed_dim=4)
# the MoVQ decoder: SpatialNorm (a GroupNorm of 32 groups inside) in the ResNet blocks,
# conv_norm_out and the attention's spatial_norm
VQ_SPATIAL = dict(VQ, block_out_channels=[32, 32], norm_num_groups=8, norm_type="spatial")
TEXT_LEN = 7


def _model(cls: str, config: dict, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return perturb_(getattr(diffusers, cls)(**config), seed=seed).to(dtype)


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Float32 normal values (in the given dtype): the same numbers in float32 and float64."""
    return torch.randn(shape).to(dtype)


def _unet_inputs(config, dtype, batch=2):
    x = _randn(batch, config["in_channels"], 8, 8, dtype=dtype)
    return x, torch.tensor([3, 700])


def _cond_inputs(config, dtype, batch=2, lengths=(TEXT_LEN, 4)):
    x, t = _unet_inputs(config, dtype, batch)
    text = _randn(batch, TEXT_LEN, config["cross_attention_dim"], dtype=dtype)
    # padded prompts: 1 for the tokens of each prompt, 0 for its padding
    mask = (torch.arange(TEXT_LEN) < torch.tensor(lengths)[:, None]).to(dtype)
    return x, t, text, mask


def _run(kind: str, config: dict, dtype: torch.dtype, mask=None):
    """(model class, forward as a function of the model) for each model kind; the same inputs
    at every call."""
    torch.manual_seed(123)
    if kind == "unet":
        x, t = _unet_inputs(config, dtype)
        return "UNet2DModel", lambda m: m(x, t).sample
    if kind == "cond":
        x, t, text, pad = _cond_inputs(config, dtype)
        pad = pad if mask is None else mask
        return "UNet2DConditionModel", lambda m: m(x, t, text, encoder_attention_mask=pad).sample
    x = _randn(2, 3, 16, 16, dtype=dtype)
    if kind == "vae":

        def vae(m):
            post = m.encode(x).latent_dist
            return torch.cat([post.mean.flatten(), m.decode(post.mean).sample.flatten()])

        return "AutoencoderKL", vae
    return "VQModel", lambda m: m(x).sample


CASES = {
    "unet": ("unet", UNET),
    "unet_resample": ("unet", UNET_RESAMPLE),
    "cond": ("cond", COND),
    "cond_scale_shift": ("cond", COND_SCALE_SHIFT),
    "vae": ("vae", VAE),
    "vq": ("vq", VQ),
    "vq_spatial": ("vq", VQ_SPATIAL),
}


def _output_and_grads(model, fwd):
    """The output of ``fwd(model)`` and the gradient of ``(output * w).sum()`` (w random, the
    same for every model) in one pass."""
    model.zero_grad(set_to_none=True)
    out = fwd(model)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", thin(DTYPES, 2))
@pytest.mark.parametrize("case", thin(list(CASES), 2))
def test_patched_outputs_and_gradients_match(case, dtype, avx2_routing):
    kind, config = CASES[case]
    cls, fwd = _run(kind, config, dtype)
    peer = _model(cls, config, dtype)
    ours = genext.patch(copy.deepcopy(peer))
    ref, ref_grads = _output_and_grads(peer, fwd)
    out, grads = _output_and_grads(ours, fwd)
    tol = TOL[dtype]
    assert rel(out, ref) < tol
    try:
        assert_grads_match(grads, ref_grads, tol)
    except AssertionError:
        if dtype != torch.float32:
            raise
        # the unpatched model in float64: the yardstick for gradients formed by cancellation,
        # whose float32 rounding is no smaller in the unpatched model than in the patched one
        _, fwd64 = _run(kind, config, torch.float64)
        _, exact = _output_and_grads(copy.deepcopy(peer).double(), fwd64)
        assert_grads_match(grads, ref_grads, tol, ref=exact)
    report = genext.patch_report(ours)
    assert report.routed["group_norm_silu"] > 0 and report.routed["attention"] > 0
    assert report.calls["attention genext"] > 0
    assert not report.call_fallbacks, str(report)


def _count(model, name: str) -> int:
    return sum(type(m).__name__ == name for m in model.modules())


def test_report_counts_what_the_configs_give():
    # UNET: ResNet blocks: 1 per down block, 2 in the mid block, 2 per up block
    unet = genext.patch(_model("UNet2DModel", UNET, torch.float32))
    rep = genext.patch_report(unet)
    resnets = 2 * 1 + 2 + 2 * 2
    attentions = 1 + 1 + 2  # AttnDownBlock2D, mid block, AttnUpBlock2D
    assert _count(unet, "GenextResnetBlock2D") == resnets
    # two fused pairs per ResNet block, plus conv_norm_out + conv_act
    assert rep.routed["group_norm_silu"] == 2 * resnets + 1
    assert rep.routed["group_norm"] == attentions  # each Attention's group_norm
    assert rep.routed["attention"] == attentions
    assert rep.fallbacks == []

    # scale_shift: norm2 runs as a plain GroupNorm; the Transformer2DModels' norms are plain too
    cond = genext.patch(_model("UNet2DConditionModel", COND_SCALE_SHIFT, torch.float32))
    rep = genext.patch_report(cond)
    resnets = 2 * 1 + 2 + 2 * 2
    transformers = 1 + 1 + 2  # CrossAttnDownBlock2D, mid block, CrossAttnUpBlock2D
    assert rep.routed["group_norm_silu"] == resnets + 1
    assert rep.routed["group_norm"] == resnets + transformers
    assert rep.routed["attention"] == 2 * transformers  # self- and cross-attention each
    assert rep.fallbacks == []

    # VAE encoder: 1 ResNet block per level and 2 in the mid block; decoder: 2 per level, 2 mid
    vae = genext.patch(_model("AutoencoderKL", VAE, torch.float32))
    rep = genext.patch_report(vae)
    resnets = (2 + 2) + (2 * 2 + 2)
    assert rep.routed["group_norm_silu"] == 2 * resnets + 2
    assert rep.routed["group_norm"] == 2 and rep.routed["attention"] == 2
    assert rep.fallbacks == []
    text = str(rep)
    assert "group_norm_silu: 22" in text and "attention: 2" in text and "fallbacks: 0" in text


def test_report_names_fallbacks_and_unpatched_modules():
    # GELU ResNet blocks stay (their norms become plain genext GroupNorms); the encoder's and
    # decoder's conv_act is an nn.SiLU whatever act_fn says, so conv_norm_out still fuses with
    # it; an attention on another processor stays on it
    vae = _model("AutoencoderKL", dict(VAE, act_fn="gelu"), torch.float32)
    from diffusers.models.attention_processor import AttnProcessor

    vae.decoder.mid_block.attentions[0].set_processor(AttnProcessor())
    ref = copy.deepcopy(vae)
    genext.patch(vae)
    rep = genext.patch_report(vae)
    reasons = {(f.name, f.kind): f.reason for f in rep.fallbacks}
    resnets = [n for n, m in vae.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    assert len(resnets) == 10
    for name in resnets:
        assert reasons[(name, "resnet_block")] == "nonlinearity is GELU, not nn.SiLU"
    assert "AttnProcessor " in reasons[("decoder.mid_block.attentions.0", "attention")]
    assert len(rep.fallbacks) == len(resnets) + 1
    assert rep.routed["attention"] == 1
    assert rep.routed["group_norm_silu"] == 2  # encoder and decoder conv_norm_out
    norms = sum(type(m) is torch.nn.GroupNorm for m in ref.modules())
    assert rep.routed["group_norm"] == norms - 2
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel(vae(x).sample, ref(x).sample) < 1e-5
    # a model never patched: everything it could route is listed as not patched
    rep = genext.patch_report(ref)
    assert sum(rep.routed.values()) == 0
    assert sum(f.reason == "not patched" for f in rep.fallbacks) == norms + 1


@pytest.mark.parametrize("prefers_torch", [False, True], ids=["genext-faster", "torch-faster"])
def test_attention_calls_follow_the_routing_rule_and_are_counted(monkeypatch, prefers_torch):
    """Each attention call of a patched model asks the routing rule once; the calls it gives
    PyTorch (with diffusers' additive key-padding mask too) are counted as such and match."""
    import genext.nn.functional as gF

    asked = []

    def rule(q, k, v, scale=None, causal=None):
        asked.append(tuple(k.shape))
        return prefers_torch

    monkeypatch.setattr(gF, "cpu_forward_prefers_torch", rule)
    peer = _model("UNet2DConditionModel", COND, torch.float32)
    ours = genext.patch(copy.deepcopy(peer))
    x, t, text, mask = _cond_inputs(COND, torch.float32)  # the second prompt padded
    with torch.no_grad():
        out = ours(x, t, text, encoder_attention_mask=mask).sample
        ref = peer(x, t, text, encoder_attention_mask=mask).sample
    assert rel(out, ref) < 1e-5
    calls = 8  # a self- and a cross-attention in each of four transformer blocks
    assert len(asked) == calls
    assert sum(s[2] == TEXT_LEN for s in asked) == calls // 2  # the masked cross-attentions
    rep = genext.patch_report(ours)
    label = "attention torch: not served, or faster in PyTorch"
    assert rep.calls[label] == (calls if prefers_torch else 0)
    assert rep.calls["attention genext"] == (0 if prefers_torch else calls)


def test_masks_genext_cannot_serve_run_in_torch_and_are_counted(avx2_routing):
    peer = _model("UNet2DConditionModel", COND, torch.float32)
    ours = genext.patch(copy.deepcopy(peer))
    # a hole in the middle of the first prompt: not a key-padding prefix
    x, t, text, mask = _cond_inputs(COND, torch.float32)
    mask[0, 2] = 0
    with torch.no_grad():
        out = ours(x, t, text, encoder_attention_mask=mask).sample
        ref = peer(x, t, text, encoder_attention_mask=mask).sample
    assert rel(out, ref) < 1e-5
    rep = genext.patch_report(ours)
    crosses = 4  # one cross-attention per transformer block
    assert rep.calls["attention torch: mask is not a key-padding mask"] == crosses
    assert rep.calls["attention genext"] == crosses  # the self-attentions
    assert {f.kind for f in rep.call_fallbacks} == {"attention call"}
    assert "mask is not a key-padding mask x1" in str(rep)
    # a prompt with no token at all: every key hidden, diffusers' uniform weights over them
    _, _, _, empty = _cond_inputs(COND, torch.float32, lengths=(TEXT_LEN, 0))
    with torch.no_grad():
        out = ours(x, t, text, encoder_attention_mask=empty).sample
        ref = peer(x, t, text, encoder_attention_mask=empty).sample
    assert rel(out, ref) < 1e-5


def test_state_is_untouched_and_unpatch_restores_everything():
    model = _model("UNet2DConditionModel", COND, torch.float32)
    never = copy.deepcopy(model)
    # copies: state_dict() shares storage with the parameters, which patch must not change
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    classes = [type(m) for m in model.modules()]
    procs = {n: p for n, p in model.attn_processors.items()}

    assert genext.patch(model) is model
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [id(p) for p in model.parameters()] == params
    assert [type(m) for m in model.modules()] != classes
    # patching twice changes nothing
    patched_classes = [type(m) for m in model.modules()]
    patched_procs = dict(model.attn_processors)
    report = str(genext.patch_report(model))
    assert genext.patch(model) is model
    assert [type(m) for m in model.modules()] == patched_classes
    assert all(model.attn_processors[k] is p for k, p in patched_procs.items())
    assert str(genext.patch_report(model)) == report
    # a patched model pickles (torch.save) and loads patched
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [type(m) for m in loaded.modules()] == patched_classes
    x, t, text, mask = _cond_inputs(COND, torch.float32)
    with torch.no_grad():
        a = model(x, t, text, encoder_attention_mask=mask).sample
        assert torch.equal(loaded(x, t, text, encoder_attention_mask=mask).sample, a)

    assert genext.unpatch(model) is model
    assert [type(m) for m in model.modules()] == classes
    assert all(model.attn_processors[k] is p for k, p in procs.items())
    assert list(model.state_dict()) == list(before)
    assert [id(p) for p in model.parameters()] == params
    with torch.no_grad():
        a = model(x, t, text, encoder_attention_mask=mask).sample
        b = never(x, t, text, encoder_attention_mask=mask).sample
    assert torch.equal(a, b)
    assert sum(genext.patch_report(model).routed.values()) == 0


def test_pipeline_is_patched_through_its_components():
    unet = _model("UNet2DModel", UNET, torch.float32)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(100))
    ref = diffusers.DDPMPipeline(unet=copy.deepcopy(unet), scheduler=diffusers.DDPMScheduler(100))
    pipe.set_progress_bar_config(disable=True)
    ref.set_progress_bar_config(disable=True)
    assert genext.patch(pipe) is pipe
    assert _count(pipe.unet, "GenextResnetBlock2D") == 8
    rep = genext.patch_report(pipe)
    assert rep.routed == genext.patch_report(pipe.unet).routed
    assert rep.routed["attention"] == 4
    assert all(f.name.startswith("unet.") for f in rep.fallbacks)

    def sample(p):
        g = torch.Generator().manual_seed(1)
        return p(batch_size=2, generator=g, num_inference_steps=3, output_type="np").images

    a, b = sample(pipe), sample(ref)
    assert rel(torch.from_numpy(a), torch.from_numpy(b)) < 1e-5
    genext.unpatch(pipe)
    assert _count(pipe.unet, "GenextResnetBlock2D") == 0
    with pytest.raises(TypeError, match="genext.patch: model must be"):
        genext.patch(object())


def _native_ops(names: set[str]) -> set[str]:
    return {
        n
        for n in names
        if n == "aten::native_group_norm" or (n.startswith("aten::") and "scaled_dot_product" in n)
    }


def test_profile_shows_genext_kernels_instead_of_torch_ops(avx2_routing):
    # the shapes the conditional U-Net's attentions run at (self-attention at the first level,
    # cross-attention with the padding mask as key lengths): genext's kernel serves them
    q = torch.randn(2, 2, 64, 4)
    k = torch.randn(2, 2, TEXT_LEN, 4)
    keys = (torch.arange(TEXT_LEN) < torch.tensor([TEXT_LEN, 4])[:, None])[:, None, None]
    assert sdpa_backend(q, q, q) == "genext"
    assert sdpa_backend(q, k, k, attn_mask=keys) == "genext"
    # one head over the mid block's positions, as the autoencoders' attention runs
    m = torch.randn(2, 1, 64, 8)
    assert sdpa_backend(m, m, m) == "genext"


# one of each model type genext.patch targets (the others are variants of these)
PROFILED = ["unet", "cond", "vae", "vq"]


@pytest.mark.parametrize("case", thin(PROFILED, 2))
def test_patched_models_run_genext_kernels_and_no_torch_norm_or_sdpa(case, avx2_routing):
    kind, config = CASES[case]
    cls, fwd = _run(kind, config, torch.float32)
    peer = _model(cls, config, torch.float32)
    ours = genext.patch(copy.deepcopy(peer))

    def step(model):
        return lambda: fwd(model).square().sum().backward()

    ran = op_names(step(ours))
    assert {"genext::group_norm_silu", "genext::flash_attention_forward"} <= ran
    assert not _native_ops(ran), _native_ops(ran)
    assert _native_ops(op_names(step(peer)))  # the unpatched model runs them


@pytest.mark.parametrize("case", thin(PROFILED, 4))
def test_patched_model_compiles_fullgraph(case):
    kind, config = CASES[case]
    cls, fwd = _run(kind, config, torch.float32)
    model = genext.patch(_model(cls, config, torch.float32))
    # the whole forward in one graph; aot_eager traces it with genext's fake kernels and autograd
    # as inductor does, without inductor's code generation (minutes on two cores). The
    # conditional U-Net runs without its text mask here: under torch.compile a mask goes to
    # PyTorch's SDPA (the key-padding test reads its values)
    if kind == "cond":
        x, t, text, _ = _cond_inputs(config, torch.float32)

        def fwd(m):
            return m(x, t, text).sample

    compiled = torch.compile(lambda: fwd(model), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled()
        ref = fwd(model)
        ran = op_names(compiled)
    assert rel(out, ref) < 1e-5
    assert {"genext::group_norm_silu", "genext::flash_attention_forward"} <= ran
    assert not _native_ops(ran), _native_ops(ran)


class _Twice(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_group_norm_calls_genext_cannot_serve_run_in_torch_and_are_counted():
    gn = perturb_(torch.nn.GroupNorm(2, 6))
    plain = copy.deepcopy(gn)
    assert genext.patch(gn) is gn and type(gn).__name__ == "GenextGroupNorm"
    x = torch.randn(3, 6, 5)
    assert rel(gn(x), plain(x)) < 1e-5
    flat = torch.randn(3, 6)  # (N, C): genext's kernel needs a spatial dim
    assert torch.equal(gn(flat), plain(flat))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast runs group_norm in float32
        assert torch.equal(gn(x), plain(x))
    # a weight without a bias (genext's kernel takes both or neither); a parametrized weight
    # (a property, not in the module's parameter dict) is read as the attribute
    half = copy.deepcopy(gn)
    half.bias = None
    plain_half = copy.deepcopy(plain)
    plain_half.bias = None
    assert torch.equal(half(x), plain_half(x))
    assert (
        genext.patch_report(half).calls[
            "group_norm torch: a weight without a bias or a bias without a weight"
        ]
        == 1
    )
    scaled = copy.deepcopy(gn)
    torch.nn.utils.parametrize.register_parametrization(scaled, "weight", _Twice())
    assert "weight" not in scaled._parameters
    ref = torch.nn.functional.group_norm(x, 2, 2 * plain.weight, plain.bias, plain.eps)
    assert rel(scaled(x), ref) < 1e-5
    rep = genext.patch_report(gn)
    assert rep.routed["group_norm"] == 1
    assert rep.calls["group_norm torch: rank 2 input"] == 1
    assert rep.calls["group_norm torch: autocast (runs group_norm in float32)"] == 1
    assert [f.name for f in rep.call_fallbacks] == ["GroupNorm", "GroupNorm"]
    assert "rank 2 input x1" in str(rep)
    genext.unpatch(gn)
    assert type(gn) is torch.nn.GroupNorm and not genext.patch_report(gn).calls


HOOKED = "forward replaced by a hook (offloading?)"


def _hook_group_norms(model: torch.nn.Module) -> list[str]:
    """A no-op diffusers hook (the mechanism of group offloading: an instance ``forward`` that
    wraps the module's own) on every GroupNorm of ``model``; their names."""
    from diffusers.hooks import HookRegistry, ModelHook

    names = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.GroupNorm):
            HookRegistry.check_if_exists_or_initialize(m).register_hook(ModelHook(), "noop")
            names.append(name)
    return names


def _unhook(model: torch.nn.Module) -> None:
    from diffusers.hooks import HookRegistry

    for m in model.modules():
        if hasattr(m, "_diffusers_hook"):
            HookRegistry.check_if_exists_or_initialize(m).remove_hook("noop", recurse=False)


def test_modules_whose_forward_a_hook_replaced_are_left_and_reported():
    cls, fwd = _run("vae", VAE, torch.float32)
    model = _model(cls, VAE, torch.float32)
    with torch.no_grad():
        ref = fwd(model)
        hooked = _hook_group_norms(model)
        genext.patch(model)
        out = fwd(model)
    assert rel(out, ref) < 1e-5  # conv_act's SiLU still runs after conv_norm_out
    rep = genext.patch_report(model)
    assert rep.routed["group_norm_silu"] == rep.routed["group_norm"] == 0
    assert {f.name for f in rep.fallbacks if f.kind == "group_norm"} == set(hooked)
    assert all(f.reason == HOOKED for f in rep.fallbacks if f.kind == "group_norm")
    pairs = [f for f in rep.fallbacks if f.kind == "conv_norm_out+conv_act"]
    assert {f.name for f in pairs} == {"encoder", "decoder"}
    assert all(HOOKED in f.reason for f in pairs)
    assert all("norm1" in f.reason for f in rep.fallbacks if f.kind == "resnet_block")
    assert rep.routed["attention"] > 0  # the processor is swapped whatever wraps forward

    # a hooked ResNet block itself, and accelerate's marker, are left too
    from diffusers.hooks import HookRegistry, ModelHook

    model = _model(cls, VAE, torch.float32)
    block = model.decoder.up_blocks[0].resnets[0]
    HookRegistry.check_if_exists_or_initialize(block).register_hook(ModelHook(), "noop")
    model.encoder.conv_act._hf_hook = object()
    genext.patch(model)
    rep = genext.patch_report(model)
    named = {(f.name, f.kind): f.reason for f in rep.fallbacks}
    assert named[("decoder.up_blocks.0.resnets.0", "resnet_block")] == HOOKED
    assert HOOKED in named[("encoder", "conv_norm_out+conv_act")]
    assert type(block).__name__ == "ResnetBlock2D"
    with torch.no_grad():
        assert rel(fwd(model), ref) < 1e-5


def test_unpatch_refuses_while_hooks_hold_patched_forwards(avx2_routing):
    cls, fwd = _run("vae", VAE, torch.float32)
    model = _model(cls, VAE, torch.float32)
    with torch.no_grad():
        ref = fwd(model)
        genext.patch(model)
        _hook_group_norms(model)  # offloading enabled after patching
        assert rel(fwd(model), ref) < 1e-5
        with pytest.raises(RuntimeError, match="remove the hooks") as err:
            genext.unpatch(model)
        assert "decoder.conv_norm_out" in str(err.value)
        # nothing was unpatched: the model still computes the same
        assert rel(fwd(model), ref) < 1e-5
        assert type(model.decoder.conv_act).__name__ == "GenextSiLUFusedAway"
        _unhook(model)
        genext.unpatch(model)
        assert rel(fwd(model), ref) < 1e-5
        assert not any(type(m).__name__.startswith("Genext") for m in model.modules())
        # hooks removed: patching routes everything again, and no call falls back
        genext.patch(model)
        assert rel(fwd(model), ref) < 1e-5
    rep = genext.patch_report(model)
    assert not rep.fallbacks and not rep.call_fallbacks
    assert rep.routed["group_norm_silu"] > 0


def _offload_(norm: torch.nn.GroupNorm) -> None:
    """accelerate-style sequential offload: the weights live on 'meta' and a pre-hook puts them
    in place for the norm's own forward, a hook takes them away again."""
    store = {n: p.detach().clone() for n, p in norm.named_parameters()}

    def meta():
        for n, t in store.items():
            setattr(norm, n, torch.nn.Parameter(torch.empty_like(t, device="meta")))

    def load(mod, args):
        for n, t in store.items():
            setattr(mod, n, torch.nn.Parameter(t))

    meta()
    norm.register_forward_pre_hook(load)
    norm.register_forward_hook(lambda mod, args, out: meta())


@pytest.mark.parametrize("dtype", DTYPES)
def test_hooks_on_a_resnet_blocks_norms_run_after_patch(dtype):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = perturb_(ResnetBlock2D(in_channels=8, out_channels=12, temb_channels=6, groups=4))
    block = block.to(dtype)
    x, temb = _randn(2, 8, 4, 4, dtype=dtype), _randn(2, 6, dtype=dtype)
    with torch.no_grad():
        ref = block(x, temb)
        fired = []
        handle = block.norm1.register_forward_pre_hook(lambda m, a: fired.append("norm1"))
        genext.patch(block)
        assert type(block).__name__ == "GenextResnetBlock2D"
        out = block(x, temb)
        assert fired == ["norm1"]
        assert rel(out, ref) < TOL[dtype]
        handle.remove()
        _offload_(block.norm1)
        _offload_(block.norm2)
        assert rel(block(x, temb), ref) < TOL[dtype]
    rep = genext.patch_report(block)
    assert rep.calls["group_norm torch: norm or its activation has hooks"] == 3
    assert {f.name for f in rep.call_fallbacks} == {"norm1", "norm2"}


def test_hooked_norms_of_a_patched_resnet_block_compile_fullgraph():
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = perturb_(ResnetBlock2D(in_channels=8, temb_channels=6, groups=4))
    x, temb = _randn(2, 8, 4, 4, dtype=torch.float32), _randn(2, 6, dtype=torch.float32)
    with torch.no_grad():
        ref = block(x, temb)
        fired = []
        block.norm2.register_forward_pre_hook(lambda m, a: fired.append("norm2"))
        compiled = torch.compile(genext.patch(block), fullgraph=True, backend="aot_eager")
        out = compiled(x, temb)
    assert fired and rel(out, ref) < 1e-5


def test_unfusing_qkv_after_unpatch_sets_back_the_original_processors():
    cls, fwd = _run("cond", COND, torch.float32)
    model = _model(cls, COND, torch.float32)
    with torch.no_grad():
        ref = fwd(model)
        genext.patch(model)
        model.fuse_qkv_projections()  # saves the (genext) processors to restore on unfuse
        genext.unpatch(model)
        model.unfuse_qkv_projections()
        out = fwd(model)
    names = {type(p).__name__ for p in model.attn_processors.values()}
    assert names == {"AttnProcessor2_0"}
    assert rel(out, ref) < 1e-5
