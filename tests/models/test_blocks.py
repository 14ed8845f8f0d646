"""The shared blocks of genext/models/_blocks.py against diffusers' classes of the same name, in
float64 with the same (perturbed) weights, in the configurations diffusers' VAEs and U-Nets use."""

from __future__ import annotations

import pytest
import torch

from genext.models import _blocks

from peer_parity import perturb_, rel

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention as PeerAttention  # noqa: E402
from diffusers.models.downsampling import Downsample2D as PeerDown  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D as PeerResnet  # noqa: E402
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D as PeerMid  # noqa: E402
from diffusers.models.upsampling import Upsample2D as PeerUp  # noqa: E402

D = torch.float64


def _load(ours, peer):
    perturb_(peer)
    peer = peer.to(D)
    ours.to(D).load_state_dict(peer.state_dict(), strict=True)
    return ours.to(D).eval(), peer.eval()


@pytest.mark.parametrize(
    "kw",
    [
        dict(in_channels=8, out_channels=8, temb_channels=None, groups=4),
        dict(in_channels=8, out_channels=12, temb_channels=6, groups=4),  # shortcut + temb
        dict(
            in_channels=8,
            out_channels=8,
            temb_channels=6,
            groups=4,
            time_embedding_norm="scale_shift",
        ),
        dict(
            in_channels=8,
            out_channels=8,
            temb_channels=6,
            groups=4,
            skip_time_act=True,
            output_scale_factor=2.0,
        ),
        dict(
            in_channels=8,
            out_channels=8,
            temb_channels=None,
            groups=4,
            groups_out=2,
            non_linearity="mish",
        ),
        dict(in_channels=8, out_channels=8, temb_channels=None, groups=4, conv_2d_out_channels=6),
    ],
)
def test_resnet_block(kw):
    ours, peer = _load(_blocks.ResnetBlock2D(**kw), PeerResnet(**kw))
    x = torch.randn(2, 8, 5, 7, dtype=D)
    temb = torch.randn(2, 6, dtype=D) if kw["temb_channels"] else None
    with torch.no_grad():
        assert rel(ours(x, temb), peer(x, temb)) < 1e-12


@pytest.mark.parametrize(
    "kw, cross",
    [
        (
            dict(
                query_dim=8,
                heads=2,
                dim_head=4,
                norm_num_groups=4,
                residual_connection=True,
                bias=True,
            ),
            False,
        ),
        (dict(query_dim=8, heads=2, dim_head=4, cross_attention_dim=6), True),
        (dict(query_dim=8, heads=2, dim_head=4, out_dim=16), False),  # inner width out_dim
        (
            dict(
                query_dim=8,
                heads=1,
                dim_head=8,
                rescale_output_factor=2.0,
                residual_connection=True,
            ),
            False,
        ),
    ],
)
@pytest.mark.parametrize("image", [False, True])
def test_attention(kw, cross, image):
    if image and kw.get("out_dim"):
        pytest.skip("an image layout keeps the channel count")
    ours, peer = _load(_blocks.Attention(**kw), PeerAttention(**kw))
    x = torch.randn(2, 8, 3, 5, dtype=D) if image else torch.randn(2, 15, 8, dtype=D)
    ctx = torch.randn(2, 7, 6, dtype=D) if cross else None
    with torch.no_grad():
        assert rel(ours(x, ctx), peer(x, ctx)) < 1e-12


def test_attention_mask_as_diffusers_applies_it():
    kw = dict(query_dim=8, heads=2, dim_head=4, cross_attention_dim=6)
    ours, peer = _load(_blocks.Attention(**kw), PeerAttention(**kw))
    x, ctx = torch.randn(2, 5, 8, dtype=D), torch.randn(2, 7, 6, dtype=D)
    # an additive key mask (B, Lk), the form diffusers' U-Net builds from encoder_attention_mask
    keep = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    bias = (1 - keep.to(D)) * -10000.0
    with torch.no_grad():
        a, b = ours(x, ctx, attention_mask=bias), peer(x, ctx, attention_mask=bias.unsqueeze(1))
        assert rel(a, b) < 1e-12
        assert rel(a, ours(x, ctx)) > 1e-3  # the mask mattered


@pytest.mark.parametrize("name", ["conv", "Conv2d_0"])
@pytest.mark.parametrize("transpose", [False, True])
def test_upsample(name, transpose):
    if transpose and name != "conv":
        pytest.skip("diffusers' own forward reads self.conv for a transposed conv named otherwise")
    kw = dict(
        channels=4, use_conv=not transpose, use_conv_transpose=transpose, out_channels=6, name=name
    )
    ours, peer = _load(_blocks.Upsample2D(**kw), PeerUp(**kw))
    x = torch.randn(2, 4, 3, 5, dtype=D)
    with torch.no_grad():
        assert rel(ours(x), peer(x)) < 1e-12
        if not transpose:
            assert rel(ours(x, output_size=(7, 11)), peer(x, output_size=(7, 11))) < 1e-12


@pytest.mark.parametrize("padding, name", [(0, "op"), (1, "op"), (1, "conv")])
def test_downsample(padding, name):
    kw = dict(channels=4, use_conv=True, out_channels=6, padding=padding, name=name)
    ours, peer = _load(_blocks.Downsample2D(**kw), PeerDown(**kw))
    x = torch.randn(2, 4, 7, 9, dtype=D)
    with torch.no_grad():
        assert rel(ours(x), peer(x)) < 1e-12


@pytest.mark.parametrize("head_dim", [1, 4, 8])
def test_mid_block_heads(head_dim):
    """diffusers' default head dim is 1 (8 heads of 1 channel here), not one wide head."""
    kw = dict(in_channels=8, temb_channels=6, resnet_groups=4)
    if head_dim != 1:
        kw["attention_head_dim"] = head_dim
    ours, peer = _load(_blocks.UNetMidBlock2D(**kw), PeerMid(**kw))
    x, temb = torch.randn(2, 8, 4, 4, dtype=D), torch.randn(2, 6, dtype=D)
    with torch.no_grad():
        assert rel(ours(x, temb), peer(x, temb)) < 1e-12
