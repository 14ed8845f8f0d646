"""genext/models/_embeddings.py and _transformer.py against diffusers' classes of the same name
(diffusers.models.embeddings, .attention, .normalization) built with the same config and the
same perturbed random weights: outputs, gradients of every parameter and of the inputs, in
float32 (1e-5) and float64 (1e-10)."""

from __future__ import annotations

import pytest
import torch

from genext.models import _embeddings as emb
from genext.models import _transformer as tr

from peer_parity import assert_grads_match, grads_after, perturb_, rel

diffusers = pytest.importorskip("diffusers")
from diffusers.models import attention as peer_attention  # noqa: E402
from diffusers.models import embeddings as peer_emb  # noqa: E402
from diffusers.models import normalization as peer_norm  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the modules are tiny, and on a shared machine idle OpenMP workers
    spinning for a core slow every call down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(ours, peer, dtype, seed=0):
    perturb_(peer, seed=seed)
    peer = peer.to(dtype)
    ours.to(dtype).load_state_dict(peer.state_dict(), strict=True)
    return ours.to(dtype).eval(), peer.eval()


def _check(ours, peer, run, inputs, dtype, grad_inputs=(0,)):
    """Outputs of ``run(model, *inputs)`` equal, and the gradients of a random projection of
    them with respect to every parameter and to the inputs at ``grad_inputs``."""
    tol = TOL[dtype]
    with torch.no_grad():
        a, b = run(ours, *inputs), run(peer, *inputs)
    assert a.shape == b.shape
    assert rel(a, b) < tol, rel(a, b)
    w = torch.randn(b.shape, dtype=b.dtype, generator=torch.Generator().manual_seed(1))
    grad_inputs = [i for i in grad_inputs if inputs[i] is not None]

    def grads(model):
        args = list(inputs)
        for i in grad_inputs:
            args[i] = inputs[i].detach().clone().requires_grad_(True)
        g = grads_after(model, lambda m: (run(m, *args) * w).sum())
        return g, [args[i].grad for i in grad_inputs]

    (go, gio), (gp, gip) = grads(ours), grads(peer)
    assert go, "no parameter received a gradient"
    assert_grads_match(go, gp, tol)
    for x, y in zip(gio, gip):
        assert rel(x, y) < tol


# ---- embeddings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(embedding_dim=32),
        dict(embedding_dim=32, flip_sin_to_cos=True, downscale_freq_shift=0),
        dict(embedding_dim=17, downscale_freq_shift=1, scale=3.0),  # odd: a zero column
        dict(embedding_dim=10, flip_sin_to_cos=True, max_period=100),
    ],
)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float64])
def test_timestep_embedding_bitwise(kw, dtype):
    t = torch.tensor([0, 1, 7, 999], dtype=dtype)
    if dtype.is_floating_point:
        t = t + 0.37  # fractional timesteps
    a = emb.get_timestep_embedding(t, **kw)
    b = peer_emb.get_timestep_embedding(t, **kw)
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a, b)
    # the module form
    ours = emb.Timesteps(kw["embedding_dim"], kw.get("flip_sin_to_cos", False), 1)
    peer = peer_emb.Timesteps(kw["embedding_dim"], kw.get("flip_sin_to_cos", False), 1)
    assert torch.equal(ours(t), peer(t))
    assert not list(ours.parameters()) and not list(ours.buffers())


def test_timestep_embedding_rejects_2d():
    with pytest.raises(ValueError, match="timesteps must be 1-D"):
        emb.get_timestep_embedding(torch.zeros(2, 1), 8)


@pytest.mark.parametrize(
    "kw, cond",
    [
        (dict(in_channels=8, time_embed_dim=12), False),
        (dict(in_channels=8, time_embed_dim=12, act_fn="gelu", out_dim=6), False),
        (dict(in_channels=8, time_embed_dim=12, post_act_fn="silu", cond_proj_dim=5), True),
        (dict(in_channels=8, time_embed_dim=12, act_fn="mish", sample_proj_bias=False), False),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_timestep_embedding_module(kw, cond, dtype):
    ours, peer = _pair(emb.TimestepEmbedding(**kw), peer_emb.TimestepEmbedding(**kw), dtype)
    x = torch.randn(3, 8, dtype=dtype)
    c = torch.randn(3, 5, dtype=dtype) if cond else None
    _check(ours, peer, lambda m, x, c: m(x, c), [x, c], dtype, (0, 1))


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_fourier_projection(flip, log, dtype):
    kw = dict(embedding_size=6, scale=16.0, log=log, flip_sin_to_cos=flip)
    torch.manual_seed(0)
    peer = peer_emb.GaussianFourierProjection(**kw).to(dtype)
    ours = emb.GaussianFourierProjection(**kw).to(dtype)
    assert ours.state_dict().keys() == peer.state_dict().keys() == {"weight"}
    ours.load_state_dict(peer.state_dict(), strict=True)
    assert not ours.weight.requires_grad
    x = torch.rand(4, dtype=dtype) + 0.1
    with torch.no_grad():
        assert rel(ours(x), peer(x)) < TOL[dtype]


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # diffusers' own
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_label_embedding(dropout):
    ours, peer = _pair(
        emb.LabelEmbedding(5, 8, dropout), peer_emb.LabelEmbedding(5, 8, dropout), torch.float64
    )
    assert ours.embedding_table.num_embeddings == 5 + (dropout > 0)
    labels = torch.tensor([0, 4, 2, 3, 1, 1, 0, 2])
    assert torch.equal(ours(labels), peer(labels))
    if dropout > 0:
        force = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1])
        a = ours(labels, force_drop_ids=force)
        assert torch.equal(a, peer(labels, force_drop_ids=force))
        assert torch.equal(a[0], ours.embedding_table.weight[5])  # the "no class" row
        # training: random drops, the same ones as diffusers' from the same RNG state
        ours.train(), peer.train()
        torch.manual_seed(3)
        a = ours(labels.repeat(8))
        torch.manual_seed(3)
        b = peer(labels.repeat(8))
        assert torch.equal(a, b)
        assert (a == ours.embedding_table.weight[5]).all(-1).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_combined_timestep_label(dtype):
    ours, peer = _pair(
        emb.CombinedTimestepLabelEmbeddings(7, 16, 0.1),
        peer_emb.CombinedTimestepLabelEmbeddings(7, 16, 0.1),
        dtype,
    )
    t = torch.tensor([3.0, 500.0, 999.0])
    labels = torch.tensor([0, 6, 7])  # 7: the guidance row
    _check(ours, peer, lambda m, t, y: m(t, y, hidden_dtype=dtype), [t, labels], dtype)


@pytest.mark.parametrize(
    "kw",
    [
        dict(embed_dim=16, grid_size=4),
        dict(embed_dim=8, grid_size=(3, 5), base_size=3),  # rectangular grid
        dict(embed_dim=12, grid_size=6, interpolation_scale=2.0, base_size=4),
        dict(embed_dim=8, grid_size=2, cls_token=True, extra_tokens=2),
    ],
)
def test_2d_sincos_pos_embed(kw):
    a = emb.get_2d_sincos_pos_embed(**kw)
    b = peer_emb.get_2d_sincos_pos_embed(**kw)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kw, size",
    [
        (dict(height=8, width=8, patch_size=2, in_channels=4, embed_dim=16), 8),  # DiT's
        (dict(height=8, width=8, patch_size=2, in_channels=3, embed_dim=12, layer_norm=True), 8),
        (dict(height=8, width=8, patch_size=2, in_channels=4, embed_dim=16), 12),  # new grid
        (
            dict(
                height=8, width=8, patch_size=2, in_channels=4, embed_dim=16, pos_embed_max_size=8
            ),
            10,
        ),
        (dict(height=8, width=8, patch_size=4, in_channels=4, embed_dim=8, pos_embed_type=None), 8),
        (
            dict(
                height=6, width=6, patch_size=2, in_channels=2, embed_dim=8, interpolation_scale=2
            ),
            6,
        ),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_embed(kw, size, dtype):
    ours, peer = emb.PatchEmbed(**kw), peer_emb.PatchEmbed(**kw)
    # the buffer is saved exactly where diffusers saves it (with pos_embed_max_size)
    assert ours.state_dict().keys() == peer.state_dict().keys()
    if peer.pos_embed is not None:
        assert torch.equal(ours.pos_embed, peer.pos_embed)
        fixed = peer.pos_embed.clone()
    ours, peer = _pair(ours, peer, dtype)
    if peer.pos_embed is not None and not kw.get("pos_embed_max_size"):
        # a buffer outside the state_dict: computed from the config, not perturbed
        peer.pos_embed.copy_(fixed)
    x = torch.randn(2, kw["in_channels"], size, size, dtype=dtype)
    _check(ours, peer, lambda m, x: m(x), [x], dtype)


# ---- transformer blocks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(dim=8),
        dict(dim=8, activation_fn="gelu", mult=2, dim_out=6),
        dict(dim=8, activation_fn="gelu-approximate", final_dropout=True),
        dict(dim=8, activation_fn="geglu-approximate", inner_dim=12, bias=False),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_feed_forward(kw, dtype):
    ours, peer = _pair(tr.FeedForward(**kw), peer_attention.FeedForward(**kw), dtype)
    x = torch.randn(2, 5, 8, dtype=dtype)
    _check(ours, peer, lambda m, x: m(x), [x], dtype)


def test_feed_forward_rejects_unknown_activation():
    with pytest.raises(NotImplementedError, match="activation_fn"):
        tr.FeedForward(8, activation_fn="swiglu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_ada_layer_norm_zero(dtype):
    ours, peer = _pair(tr.AdaLayerNormZero(8, 5), peer_norm.AdaLayerNormZero(8, 5), dtype)
    x = torch.randn(2, 6, 8, dtype=dtype)
    t, y = torch.tensor([10.0, 700.0]), torch.tensor([1, 4])

    def run(m, x, t, y):
        return torch.cat([o.flatten(1) for o in m(x, t, y, hidden_dtype=dtype)], dim=1)

    _check(ours, peer, run, [x, t, y], dtype)


# Stable Diffusion's block (GEGLU, cross-attention), its variants, and DiT's adaLN-Zero block
BLOCKS = {
    "sd": dict(dim=16, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=12),
    "sd_bias_upcast": dict(
        dim=16,
        num_attention_heads=4,
        attention_head_dim=4,
        cross_attention_dim=12,
        attention_bias=True,
        upcast_attention=True,
        norm_eps=1e-6,
    ),
    "only_cross": dict(
        dim=16,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=12,
        only_cross_attention=True,
    ),
    "double_self": dict(
        dim=16, num_attention_heads=2, attention_head_dim=8, double_self_attention=True
    ),
    "self_only_gelu": dict(
        dim=16, num_attention_heads=1, attention_head_dim=16, activation_fn="gelu"
    ),
    "dit": dict(
        dim=16,
        num_attention_heads=2,
        attention_head_dim=8,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-5,
        attention_bias=True,
    ),
}


def _block_inputs(name, dtype, mask=None):
    kw = BLOCKS[name]
    x = torch.randn(2, 9, 16, dtype=dtype)
    ctx = torch.randn(2, 7, 12, dtype=dtype) if kw.get("cross_attention_dim") else None
    t = torch.tensor([5.0, 600.0]) if name == "dit" else None
    y = torch.tensor([3, 10]) if name == "dit" else None  # 10: the guidance row
    return [x, ctx, t, y, mask]


def _run_block(m, x, ctx, t, y, mask):
    return m(x, encoder_hidden_states=ctx, timestep=t, class_labels=y, encoder_attention_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_basic_transformer_block(name, dtype):
    kw = BLOCKS[name]
    ours, peer = _pair(
        tr.BasicTransformerBlock(**kw), peer_attention.BasicTransformerBlock(**kw), dtype
    )
    _check(ours, peer, _run_block, _block_inputs(name, dtype), dtype, (0, 1))


@pytest.mark.parametrize("form", ["additive", "boolean"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_basic_transformer_block_masks(form, dtype):
    """The cross-attention key mask as diffusers' U-Net builds it ((B, 1, Lk) additive bias) or
    boolean, and a self-attention mask."""
    kw = BLOCKS["sd"]
    ours, peer = _pair(
        tr.BasicTransformerBlock(**kw), peer_attention.BasicTransformerBlock(**kw), dtype
    )
    keep = torch.tensor([[1] * 7, [1] * 3 + [0] * 4], dtype=torch.bool)
    mask = keep[:, None] if form == "boolean" else ((1 - keep.to(dtype)) * -10000.0)[:, None]
    inputs = _block_inputs("sd", dtype, mask)
    _check(ours, peer, _run_block, inputs, dtype, (0, 1))
    with torch.no_grad():
        unmasked = _run_block(ours, *inputs[:4], None)
        assert rel(_run_block(ours, *inputs), unmasked) > 1e-3  # the mask mattered
    # a self-attention mask over the 9 positions
    self_mask = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(2)) > 0.3
    self_mask[:, :, 0] = True
    inputs = _block_inputs("sd", dtype)

    def run(m, x, ctx):
        return m(x, attention_mask=self_mask, encoder_hidden_states=ctx)

    _check(ours, peer, run, inputs[:2], dtype, (0, 1))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(norm_type="ada_norm"), "norm_type"),
        (dict(norm_type="ada_norm_single"), "norm_type"),
        (dict(attention_type="gated"), "attention_type"),
        (dict(positional_embeddings="sinusoidal", num_positional_embeddings=4), "positional"),
    ],
)
def test_basic_transformer_block_unsupported(kw, match):
    with pytest.raises(NotImplementedError, match=match):
        tr.BasicTransformerBlock(16, 2, 8, num_embeds_ada_norm=4, **kw)
