"""A CLIP training step: forward of both towers, the contrastive loss and the backward to every
weight, for genext.models.CLIPModel (genext's attention kernels and genext.losses.ClipLoss) and
open_clip's CLIP with the same weights (``CLIPModel.from_open_clip`` converts open_clip's random
weights, perturbed) and open_clip's ClipLoss.

CPU: a tiny ViT (32x32 images, 2 layers) and ViT-B/32's layout at a quarter of its widths and
half its depth, float32, one thread (see CPU_CASES). CUDA: ViT-B/32 (open_clip's "ViT-B-32"
config: 224x224 images in 32x32 patches, 12 layers of 768 in the image tower, 12 of 512 over 77
tokens in the text tower) at batch 4096 and 1024 under bfloat16 autocast, with peak memory; a
batch that does not fit is a row saying so. The weights stay float32 (as mixed-precision
training keeps them); a 16-bit --dtype is the autocast dtype. No torch.compile rows: the bench
compares the two eager implementations.

The check runs a smaller batch (the loss depends on the batch, so both models see the same one):
the loss and the gradients of the logit scale, the patch embedding and the token embedding.
float32: within 1e-5 relative of open_clip's; 16-bit autocast: no worse than twice open_clip's
own error against open_clip run in float64 (plus one rounding in the dtype for the loss and the
logit scale's gradient, single numbers whose error is one draw).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch

from ..models import CLIPModel
from .lm import cpu_threads
from .peer_models import CPU_MODEL_REPS, perturbed_, rel_err
from .registry import (
    DIRECTION,
    DTYPE,
    IMPL,
    MS,
    PEAK_MIB,
    Bench,
    Case,
    Column,
    Config,
    Timing,
    device_cases,
)

# open_clip's "ViT-B-32" model config (open_clip/model_configs/ViT-B-32.json)
VIT_B_32 = dict(
    embed_dim=512,
    vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12),
)
# ViT-B/32's layout at a quarter of its widths and half its depth (heads of 64 as in ViT-B/32)
VIT_B_32_QUARTER = dict(
    embed_dim=128,
    vision_cfg=dict(image_size=224, layers=6, width=192, patch_size=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=6),
)
# a tiny ViT: 32x32 images in 16 patches, two layers per tower
TINY_VIT = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
    text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=2),
)
# the gradients the check compares: (genext's parameter, open_clip's)
GRADS = (
    ("logit_scale", "logit_scale"),
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
)


@dataclass(frozen=True)
class ClipModelCase:
    label: str
    config: dict = field(hash=False)  # open_clip.CLIP's embed_dim, vision_cfg, text_cfg
    batch: int  # image-text pairs per step
    check_batch: int = 64  # pairs the check runs (in float64 too)
    threads: int | None = None  # CPU intra-op threads for this case (None: the run's)

    @property
    def name(self) -> str:
        name = f"{self.label} b{self.batch}"
        return name if self.threads is None else f"{name} {self.threads}thr"


CPU_CASES = [
    # one thread: on the project's 2-core machine shared with other processes a second thread
    # made both implementations' steps slower (about 1.7x at the quarter ViT-B/32)
    ClipModelCase("tiny-vit", TINY_VIT, 64, check_batch=32, threads=1),
    ClipModelCase("vit-b-32/4", VIT_B_32_QUARTER, 64, check_batch=16, threads=1),
]
# 4096 pairs may not fit one GPU's memory in eager training; 1024 gives the figures then
CUDA_CASES = [
    ClipModelCase("vit-b-32", VIT_B_32, 4096, check_batch=128),
    ClipModelCase("vit-b-32", VIT_B_32, 1024, check_batch=128),
]
IMPLS = ("genext", "open_clip")


def _open_clip():
    try:
        import open_clip
    except ImportError:
        return None
    return open_clip


def clip_inputs(case: ClipModelCase, device: str) -> dict:
    """open_clip's CLIP with perturbed random weights, genext's CLIPModel converted from it,
    images ``(B, 3, S, S)`` and text tokens ``(B, context)``: random ids, each sequence ending
    in the end token (the largest id, where open_clip pools) at a random length, zeros after.
    Without open_clip only genext's model (its own random weights) is built."""
    torch.manual_seed(0)
    oc = _open_clip()
    inputs: dict = {"open_clip": None}
    if oc is not None:
        peer = perturbed_(oc.CLIP(**case.config)).to(device).train()
        inputs["open_clip"] = peer
        # from_open_clip builds its model on the host and copies the weights in
        inputs["genext"] = CLIPModel.from_open_clip(peer).to(device).train()
    else:
        vision, text = case.config["vision_cfg"], case.config["text_cfg"]
        width = text["width"]
        inputs["genext"] = CLIPModel(
            text_config=dict(
                vocab_size=text["vocab_size"],
                hidden_size=width,
                intermediate_size=4 * width,
                num_hidden_layers=text["layers"],
                num_attention_heads=text["heads"],
                max_position_embeddings=text["context_length"],
                hidden_act="gelu",
                eos_token_id=2,  # pooling at the largest id, as open_clip's argmax
            ),
            vision_config=dict(
                hidden_size=vision["width"],
                intermediate_size=4 * vision["width"],
                num_hidden_layers=vision["layers"],
                num_attention_heads=vision["width"] // vision.get("head_width", 64),
                image_size=vision["image_size"],
                patch_size=vision["patch_size"],
                hidden_act="gelu",
            ),
            projection_dim=case.config["embed_dim"],
        ).to(device)
        perturbed_(inputs["genext"]).train()
    g = torch.Generator().manual_seed(1)
    size = case.config["vision_cfg"]["image_size"]
    ctx, vocab = case.config["text_cfg"]["context_length"], case.config["text_cfg"]["vocab_size"]
    text = torch.randint(1, vocab - 1, (case.batch, ctx), generator=g)
    lengths = torch.randint(2, ctx + 1, (case.batch,), generator=g)
    positions = torch.arange(ctx)
    text[positions >= lengths[:, None]] = 0
    text[torch.arange(case.batch), lengths - 1] = vocab - 1
    inputs["text"] = text.to(device)
    inputs["images"] = torch.randn(case.batch, 3, size, size, generator=g).to(device)
    return inputs


def _autocast(device: str, dtype: torch.dtype):
    if dtype in (torch.float32, torch.float64):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=dtype)


def clip_loss(impl: str, model, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """One implementation's contrastive loss of a batch: genext's model with ``return_loss``
    (genext.losses.ClipLoss inside), or open_clip's model and open_clip's ClipLoss."""
    if impl == "genext":
        return model(text, images, return_loss=True).loss
    image_features, text_features, scale = model(images, text)
    return _open_clip().loss.ClipLoss()(image_features, text_features, scale)


def _loss_and_grads(impl, model, images, text, names, device, dtype):
    params = dict(model.named_parameters())
    with _autocast(device, dtype):
        loss = clip_loss(impl, model, images, text)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return loss.detach().double(), [g.double() for g in grads]


def clip_check(case: ClipModelCase, dtype: torch.dtype, inputs: dict) -> tuple[bool | None, str]:
    """genext's loss and gradients (see GRADS) against open_clip's on the first
    ``case.check_batch`` pairs."""
    peer = inputs["open_clip"]
    if peer is None:
        return None, "open_clip not available"
    device = inputs["images"].device.type
    n = case.check_batch
    images, text = inputs["images"][:n], inputs["text"][:n]
    ours = _loss_and_grads(
        "genext", inputs["genext"], images, text, [a for a, _ in GRADS], device, dtype
    )
    theirs = _loss_and_grads("open_clip", peer, images, text, [b for _, b in GRADS], device, dtype)
    (l_ours, g_ours), (l_theirs, g_theirs) = ours, theirs
    if not torch.isfinite(l_ours) or not all(torch.isfinite(g).all() for g in g_ours):
        return False, "non-finite loss or gradients"
    if dtype == torch.float32:
        errs = [rel_err(l_ours, l_theirs)] + [rel_err(a, b) for a, b in zip(g_ours, g_theirs)]
        ok = max(errs) < 1e-5
        return ok, (
            f"loss {l_ours.item():.5f} rel {errs[0]:.1e}, grads rel <= {max(errs[1:]):.1e} "
            "vs open_clip"
        )
    ref_model = copy.deepcopy(peer).double()
    l_ref, g_ref = _loss_and_grads(
        "open_clip",
        ref_model,
        images.double(),
        text,
        [b for _, b in GRADS],
        device,
        torch.float64,
    )
    del ref_model
    # a one-element result (the loss, the logit scale's gradient) is one draw of the rounding
    # error: it may also be off by one rounding in the dtype
    eps = torch.finfo(dtype).eps
    ok, worst = True, 0.0
    for a, b, r in zip([l_ours] + g_ours, [l_theirs] + g_theirs, [l_ref] + g_ref):
        ours_err, peer_err = rel_err(a, r), rel_err(b, r)
        ok &= ours_err <= 2 * peer_err + (eps if r.numel() == 1 else 1e-6)
        worst = max(worst, ours_err / max(peer_err, 1e-12))
    loss_err, peer_loss_err = rel_err(l_ours, l_ref), rel_err(l_theirs, l_ref)
    return ok, (
        f"loss {l_ours.item():.4f} rel {loss_err:.1e} (open_clip {peer_loss_err:.1e}); "
        f"grads err <= {worst:.2f}x open_clip's, vs float64"
    )


def _setup(impl: str, dtype: torch.dtype, device: str):
    def setup(inputs: dict):
        model = inputs[impl]
        if model is None:
            return None
        if device == "cuda":
            torch.cuda.empty_cache()  # what an earlier row (or an OOM) left cached
        params = [p for p in model.parameters() if p.requires_grad]
        images, text = inputs["images"], inputs["text"]

        def step(i):  # forward, loss, the gradients of every weight
            with _autocast(device, dtype):
                loss = clip_loss(impl, model, images, text)
            return torch.autograd.grad(loss, params)

        return step

    return setup


def make_case(case: ClipModelCase, config: Config) -> Case:
    cuda = config.device == "cuda"
    dtype = config.dtype_or(torch.bfloat16 if cuda else torch.float32)
    warmup, reps = (2, 5) if cuda else (1, CPU_MODEL_REPS)
    if config.quick:
        warmup, reps = 1, 1
    timings = tuple(
        Timing(
            impl,
            "step",
            _setup(impl, dtype, config.device),
            warmup,
            reps,
            peak_memory=cuda,
            shows_check=impl == "genext",
            on_error="failed" if cuda else None,  # out of memory at a batch: a row
            context=lambda: cpu_threads(case.threads, config.device),
        )
        for impl in IMPLS
    )

    def check(inputs: dict):
        with cpu_threads(case.threads, config.device):
            return clip_check(case, dtype, inputs)

    def build() -> dict:
        with cpu_threads(case.threads, config.device):
            return clip_inputs(case, config.device)

    return Case(
        case.name,
        dtype,
        timings,
        check,
        inputs=build,
    )


def cases(config: Config) -> list[Case]:
    # a quick run: the tiny ViT on the CPU, batch 1024 on CUDA
    quick = (lambda c: c[-1:]) if config.device == "cuda" else (lambda c: c[:1])
    chosen = device_cases(config, CUDA_CASES, CPU_CASES, quick=quick)
    return [make_case(c, config) for c in chosen]


BENCH = Bench(
    "clip",
    "CLIP training step (both towers, ClipLoss, backward): genext's CLIPModel vs open_clip's CLIP "
    "(same weights), autocast on CUDA (ms, peak MiB on CUDA)",
    cases,
    (Column("clip case", "case"), DTYPE, DIRECTION, IMPL, MS, PEAK_MIB),
)
