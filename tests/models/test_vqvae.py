"""genext.models.VQModel against diffusers' VQModel with the same (perturbed random) weights:
codes, losses, outputs and gradients (codebook included), token ids, loading, kernels used."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from genext.models import VQModel

from conftest import slow, thin
from peer_parity import assert_grads_match, grads_after, op_names, perturb_, rel

diffusers = pytest.importorskip("diffusers")

# diffusers' own tiny test config (tests/models/autoencoders/test_models_vq.py)
TINY = dict(
    block_out_channels=[8, 16],
    norm_num_groups=8,
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=3,
)
# a wider code than latent, more codes, two ResNet layers per block
WIDE = dict(TINY, vq_embed_dim=6, num_vq_embeddings=64, layers_per_block=2)
CONFIGS = {"tiny": TINY, "wide": WIDE}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _pair(config: dict, dtype: torch.dtype = torch.float32):
    peer = diffusers.VQModel(**config)
    perturb_(peer)
    with torch.no_grad():  # codes on the scale of the latents, so that many codes are used
        peer.quantize.embedding.weight.normal_(0, 0.5)
    peer = peer.to(dtype)
    ours = VQModel.from_config(peer.config).to(dtype)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


def _image(dtype, batch=2, size=32):
    return torch.randn(batch, 3, size, size, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, slow(torch.float64)])
@pytest.mark.parametrize("name", thin(list(CONFIGS), 2))
def test_outputs_match_diffusers(name, dtype):
    ours, peer = _pair(CONFIGS[name], dtype)
    x = _image(dtype)
    tol = TOL[dtype]
    with torch.no_grad():
        ho, hp = ours.encode(x).latents, peer.encode(x).latents
        assert rel(ho, hp) < tol
        qo, lo, (_, _, io) = ours.quantize(hp)
        qp, lp, (_, _, ip) = peer.quantize(hp)
        assert torch.equal(io, ip.reshape(io.shape))
        assert len(torch.unique(ip)) > 8  # a real test of the lookup: many codes chosen
        assert rel(qo, qp) < tol and rel(lo, lp) < tol
        do, dp = ours.decode(hp), peer.decode(hp)
        assert rel(do.sample, dp.sample) < tol
        assert rel(do.commit_loss, dp.commit_loss) < tol
        fo, fp = ours.decode(hp, force_not_quantize=True), peer.decode(hp, force_not_quantize=True)
        assert rel(fo.sample, fp.sample) < tol
        assert torch.equal(fo.commit_loss, fp.commit_loss)
        assert rel(ours(x).sample, peer(x).sample) < tol
        sample, loss = ours(x, return_dict=False)
        assert rel(loss, peer(x).commit_loss) < tol


@pytest.mark.parametrize("dtype", [slow(torch.float32), torch.float64])
def test_gradients_match_diffusers(dtype):
    ours, peer = _pair(TINY, dtype)
    x = _image(dtype)
    w = torch.randn(x.shape, dtype=dtype)

    def loss_of(x, w):
        def loss(model):
            out = model(x)
            return (out.sample * w).sum() + 10 * out.commit_loss

        return loss

    ref = None
    if dtype == torch.float32:
        ref = grads_after(copy.deepcopy(peer).double(), loss_of(x.double(), w.double()))
    go, gp = grads_after(ours, loss_of(x, w)), grads_after(peer, loss_of(x, w))
    assert go["quantize.embedding.weight"].abs().sum() > 0  # the codebook learns
    assert_grads_match(go, gp, TOL[dtype], ref)


def test_token_ids_round_trip():
    ours, peer = _pair(TINY)
    x = _image(torch.float32, batch=3)
    ids = ours.encode_to_indices(x)
    assert ids.shape == (3, 16, 16) and ids.dtype == torch.int64
    with torch.no_grad():
        _, _, (_, _, ip) = peer.quantize(peer.encode(x).latents)
        assert torch.equal(ids.reshape(-1), ip)
        images = ours.decode_indices(ids)
        # the codes looked up by id give the image that decoding the latents gives
        assert rel(images, peer.decode(peer.encode(x).latents).sample) < 1e-5
        # diffusers' own path for codes from indices
        peer_lookup = diffusers.VQModel(**dict(TINY, lookup_from_codebook=True))
        peer_lookup.load_state_dict(peer.state_dict())
        ref = peer_lookup.decode(ids.reshape(-1), force_not_quantize=True, shape=(3, 16, 16, 3))
        assert rel(images, ref.sample) < 1e-5


def test_genext_vq_kernel_runs_instead_of_cdist():
    ours, _ = _pair(TINY)
    x = _image(torch.float32).requires_grad_()
    names = op_names(lambda: ours(x).sample.sum().backward())
    assert "genext::vq_nearest" in names
    assert "genext::group_norm_silu" in names
    assert "aten::native_group_norm" not in names
    assert not any("cdist" in n for n in names)


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours, peer = _pair(WIDE)
    peer.save_pretrained(tmp_path / "peer")
    loaded = VQModel.from_pretrained(tmp_path / "peer")
    x = _image(torch.float32)
    with torch.no_grad():
        assert rel(loaded(x).sample, peer(x).sample) < 1e-5
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.VQModel.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        assert rel(back(x).sample, ours(x).sample) < 1e-5


def test_spatial_norm_is_refused():
    with pytest.raises(ValueError, match="spatial"):
        VQModel(**dict(TINY, norm_type="spatial"))


def test_legacy_attention_key_names_load(tmp_path):
    _, peer = _pair(TINY)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in peer.state_dict().items():
        for new, old in renames.items():
            k = k.replace(f".{new}.", f".{old}.")
        state[k] = v
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(peer.config)))
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    loaded = VQModel.from_pretrained(folder)
    x = _image(torch.float32)
    with torch.no_grad():
        assert rel(loaded(x).sample, peer(x).sample) < 1e-5


def test_decode_from_codebook_indices_as_diffusers():
    config = dict(TINY, lookup_from_codebook=True)
    ours, peer = _pair(config)
    ids = torch.randint(0, 256, (2 * 16 * 16,))
    with torch.no_grad():
        a = ours.decode(ids, force_not_quantize=True, shape=(2, 16, 16, 3))
        b = peer.decode(ids, force_not_quantize=True, shape=(2, 16, 16, 3))
    assert rel(a.sample, b.sample) < 1e-5
    assert a.commit_loss.dtype == b.commit_loss.dtype and torch.equal(a.commit_loss, b.commit_loss)
    with torch.no_grad():
        assert rel(ours.decode_indices(ids.view(2, 16, 16)), a.sample) < 1e-5
