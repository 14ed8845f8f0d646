"""The CLIP training-step bench (`genext bench --op clip`): its quick CPU run gives both rows and
passes its check, the check fails when genext's model computes something else (float32 and
bfloat16 autocast), and without open_clip genext's row still runs."""

from __future__ import annotations

import pytest
import torch

from genext.bench import Config, format_table, run_bench
from genext.bench import clip as clip_bench

pytest.importorskip("open_clip")

TINY = clip_bench.ClipModelCase("tiny", clip_bench.TINY_VIT, 16, check_batch=16)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: a second thread only waits on a shared machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_cpu_run_has_both_rows_and_passes():
    rows, ok = run_bench(clip_bench.BENCH, Config("cpu", quick=True, compile=False), 1e9)
    assert ok
    assert [(r.case, r.impl, r.direction) for r in rows] == [
        ("tiny-vit b64 1thr", "genext", "step"),
        ("tiny-vit b64 1thr", "open_clip", "step"),
    ]
    assert all(r.ms > 0 for r in rows)
    assert rows[0].check.startswith("ok loss") and rows[1].check == ""
    assert format_table(clip_bench.BENCH, rows)[0].split() == [
        "clip",
        "case",
        "dtype",
        "dir",
        "impl",
        "ms",
        "iqr%",  # no peak MiB on the CPU: that column is left out
        "vs",
        "best",
        "check",
    ]


@pytest.mark.parametrize(
    "dtype, delta",
    # bfloat16 autocast compares with open_clip in float64: a genext model that computes
    # something else must fail there too
    [(torch.float32, 1e-3), (torch.bfloat16, 0.2)],
)
def test_check_passes_on_equal_weights_and_fails_on_different_ones(dtype, delta):
    inputs = clip_bench.clip_inputs(TINY, "cpu")
    ok, note = clip_bench.clip_check(TINY, dtype, inputs)
    assert ok is True, note
    with torch.no_grad():  # the image tower's last norm shifted: other features, loss, grads
        inputs["genext"].vision_model.post_layernorm.bias.add_(delta)
    ok, note = clip_bench.clip_check(TINY, dtype, inputs)
    assert ok is False, note


def test_every_timing_runs_and_without_open_clip_genext_runs(monkeypatch):
    built = clip_bench.make_case(TINY, Config("cpu", quick=True))
    inputs = built.inputs()
    for t in built.timings:
        grads = t.setup(inputs)(0)
        params = list(inputs[t.impl].parameters())
        assert len(grads) == len(params)
        assert all(g.shape == p.shape and torch.isfinite(g).all() for g, p in zip(grads, params))
    monkeypatch.setattr(clip_bench, "_open_clip", lambda: None)
    inputs = built.inputs()
    assert inputs["open_clip"] is None
    assert built.check(inputs) == (None, "open_clip not available")
    assert [t.setup(inputs) is None for t in built.timings] == [False, True]
    grads = built.timings[0].setup(inputs)(0)
    assert all(torch.isfinite(g).all() for g in grads)


def test_case_lists():
    cuda = clip_bench.cases(Config("cuda"))
    assert [c.name for c in cuda] == ["vit-b-32 b4096", "vit-b-32 b1024"]
    assert all(c.dtype == torch.bfloat16 for c in cuda)
    assert [c.name for c in clip_bench.cases(Config("cuda", quick=True))] == ["vit-b-32 b1024"]
    assert [c.name for c in clip_bench.cases(Config("cpu"))] == [
        "tiny-vit b64 1thr",
        "vit-b-32/4 b64 1thr",
    ]
