"""Package-level behaviour: build facts, the torch version check, the command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import genext
from genext import _build_config


def test_build_info_reports_kernels():
    info = genext.build_info()
    assert info["version"] == genext.__version__
    assert info["torch_built"].split(".")[:2] == torch.__version__.split(".")[:2]
    assert set(info["ops"]) >= {"group_norm_silu", "group_norm_silu_backward"}
    assert "float32" in info["ops"]["group_norm_silu"]["cpu"]
    # CUDA kernels are listed exactly when they were built
    assert ("cuda" in info["ops"]["group_norm_silu"]) == info["cuda"]
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build must name its architectures"


def test_torch_version_mismatch_is_a_clear_import_error(monkeypatch):
    monkeypatch.setattr(_build_config, "torch_version", "1.0.0")
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0.*Rebuild genext"):
        genext._check_torch()


def test_cli_info_prints_json():
    out = subprocess.run([sys.executable, "-m", "genext", "info"], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out)["version"] == genext.__version__


def test_cli_bench_quick_runs_and_checks(tmp_path):
    # the smallest run of the main job: one op, CPU, no torch.compile baseline
    path = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "genext", "bench", "--device", "cpu", "--quick",
                           "--no-compile", "--json", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(path.read_text())["rows"]
    impls = {op: {r["impl"] for r in rows if r["op"] == op} for op in {r["op"] for r in rows}}
    assert impls == {"group_norm_silu": {"genext", "eager"}, "attention": {"genext", "sdpa"},
                     "kvcache": {"genext", "sdpa"}, "sampler": {"genext", "diffusers", "kernel", "eager"},
                     "vq": {"genext", "cdist"}, "contrastive": {"genext", "eager"}}
    assert all(r["ms"] > 0 for r in rows)
    checked = [r for r in rows if r["direction"] in ("fwd", "step", "f+b") and r["impl"] == "genext"
               and r["check"]]
    assert {r["op"] for r in checked} == {"group_norm_silu", "attention", "kvcache", "sampler", "vq",
                                          "contrastive"}
    assert all(r["check"].startswith("ok") for r in checked)
    assert all(r["extra"]["tflops"] > 0 for r in rows if r["op"] == "attention")
