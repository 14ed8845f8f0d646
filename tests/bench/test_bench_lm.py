"""The Llama generation bench (`genext bench --op lm`): its quick CPU run gives every row with its
figures and passes its check, and the check fails when genext's model computes something else
(float32: tokens compared one by one; bfloat16: each token greedy under the float32 model)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from genext.bench import Config, format_table, run_bench
from genext.bench import lm as lm_bench

pytest.importorskip("transformers")

# the demo LM's layout at two layers, short prompts: the check's logic, not its size
TINY = lm_bench.LMCase("tiny", dict(lm_bench.DEMO_LM, num_hidden_layers=2), 3, 10, 12)
CPU_ROWS = {"genext", "genext paged", "transformers", "transformers static"}
CPU_ROWS |= {"transformers+genext-attn"}


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: a second thread only waits on a shared machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_cpu_run_has_every_row_and_passes():
    rows, ok = run_bench(lm_bench.BENCH, Config("cpu", quick=True, compile=False), 1e9)
    assert ok
    assert {r.impl for r in rows} == CPU_ROWS and len(rows) == len(CPU_ROWS)
    assert rows[0].check.startswith("ok tokens equal")
    for row in rows:
        assert row.direction == "generate" and row.ms > 0
        assert lm_bench.tokens_verdict(row) == "equal"
        prefill = lm_bench.prefill_ms(row)
        assert 0 < prefill < row.ms
        assert lm_bench.prefill_tokens_per_s(row) == pytest.approx(128 / (prefill / 1e3))
        assert lm_bench.decode_tokens_per_s(row) == pytest.approx(31 / ((row.ms - prefill) / 1e3))
    head = format_table(lm_bench.BENCH, rows)[0].split()
    for word in ("prefill", "decode", "tok/s", "generate", "tokens", "check"):
        assert word in head
    # the quick case is the first CPU case with fewer new tokens, on its one thread
    assert rows[0].case == "demo-lm b1 p128 n32 1thr"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_passes_on_equal_weights_and_fails_on_different_ones(dtype):
    config = Config("cpu", dtype=dtype, compile=False)
    inputs = lm_bench.lm_inputs(TINY, dtype, "cpu")
    ok, note = lm_bench.lm_check(TINY, config, dtype, inputs)
    assert ok is True, note
    key = lm_bench._key(TINY.name, dtype, "genext paged")
    verdict = lm_bench._FIGURES[key]["tokens"]
    assert verdict == "equal" if dtype == torch.float32 else verdict.startswith("ok; "), verdict
    with torch.no_grad():  # genext's final norm scaled off transformers': other logits
        g = torch.Generator().manual_seed(0)
        norm = inputs["genext"].model.norm.weight
        norm.mul_(torch.randn(norm.shape, generator=g).to(dtype))
    ok, note = lm_bench.lm_check(TINY, config, dtype, inputs)
    assert ok is False, note
    assert "genext:" in note and "genext paged:" in note
    assert "transformers static:" not in note and "transformers+genext-attn:" not in note


def test_float_reference_computes_the_rotary_frequencies_in_float32():
    # casting transformers' model to bfloat16 rounds its rotary frequencies (buffers), and a float32
    # copy kept them rounded: at 128 positions its logits were 1.7 off genext's float32 model (whose
    # frequencies stay float32), an error of the reference that the 16-bit check held genext to
    inputs = lm_bench.lm_inputs(TINY, torch.bfloat16, "cpu")
    ref = lm_bench.float_reference(inputs["peer"])
    assert all(b.dtype == torch.float32 for b in ref.buffers())
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    ids = torch.randint(1, TINY.config["vocab_size"], (2, 128), generator=torch.Generator())
    ours = copy.deepcopy(inputs["genext"]).float()
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids).logits
    assert (got - want).abs().max().item() < 1e-3
    # the 16-bit model itself is left as it was
    assert inputs["peer"].model.rotary_emb.inv_freq.dtype == torch.bfloat16


def test_case_lists():
    cuda = lm_bench.cases(Config("cuda"))
    assert [c.name for c in cuda] == [f"llama-1.1b b{b} p2048 n128" for b in (1, 8, 64)]
    rows = [{t.impl for t in c.timings} for c in cuda]
    assert {"genext graph", "transformers static+compile"} <= rows[0]
    assert "genext graph" not in rows[2]
    assert all(c.dtype == torch.bfloat16 for c in cuda)
    no_compile = lm_bench.cases(Config("cuda", compile=False))
    assert all("transformers static+compile" not in {t.impl for t in c.timings} for c in no_compile)
    assert {t.impl for c in lm_bench.cases(Config("cpu")) for t in c.timings} == CPU_ROWS
    # a row of an unknown case has no figures, not an error
    row = lm_bench.Row("lm", "x b2 p3 n4", "float32", "generate", "genext", 1.0, 0.0, 0.0)
    assert math.isnan(lm_bench.prefill_ms(row)) and lm_bench.tokens_verdict(row) == ""
