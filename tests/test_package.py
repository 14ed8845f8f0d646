"""Package-level behaviour: build facts, the torch version check, the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import genext
from genext import _build_config, bench

from conftest import full_profile


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


def test_build_info_reports_device_generic_ops_truthfully():
    # the contrastive ops have a CPU kernel and an ATen composite (CompositeExplicitAutograd) for
    # the other devices, which the per-key dispatcher query does not see; they serve CUDA tensors
    # only in a CUDA build
    info = genext.build_info()
    for op in (
        "tiled_lse",
        "tiled_lse_backward",
        "tiled_softplus_sum",
        "tiled_softplus_sum_backward",
    ):
        assert "float32" in info["ops"][op]["cpu"]
        assert ("cuda" in info["ops"][op]) == info["cuda"]


@pytest.mark.skipif(
    genext._C.cuda or not torch.cuda.is_available(),
    reason="needs a GPU and a genext build without CUDA kernels",
)
def test_cpu_only_build_rejects_cuda_tensors_clearly():
    a = torch.randn(4, 8, device="cuda")
    s = torch.tensor(1.0, device="cuda")
    with pytest.raises(
        NotImplementedError,
        match="tiled_lse: no kernel for cuda tensors in this genext "
        r"build \(CPU only: built without CUDA\)",
    ):
        torch.ops.genext.tiled_lse(a, a, s, None, True)
    with pytest.raises(NotImplementedError, match="group_norm_silu"):  # the dispatcher's own error
        torch.ops.genext.group_norm_silu(a.view(1, 4, 8), 2, None, None, 1e-5, True)


def test_torch_version_mismatch_is_a_clear_import_error(monkeypatch):
    monkeypatch.setattr(_build_config, "torch_version", "1.0.0")
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0.*Rebuild genext"):
        genext._check_torch()


def test_cli_info_prints_a_summary_and_json():
    out = subprocess.run(
        [sys.executable, "-m", "genext", "info"], check=True, capture_output=True, text=True
    ).stdout
    assert out.startswith(f"genext {genext.__version__}") and "group_norm_silu" in out
    out = subprocess.run(
        [sys.executable, "-m", "genext", "info", "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert json.loads(out)["version"] == genext.__version__


# the quick test profile runs the main job's fastest benches; the full profile runs every one
QUICK_PROFILE_BENCHES = ["group_norm_silu", "kvcache", "sampler", "vq"]


def test_cli_bench_quick_runs_and_checks(tmp_path, request):
    # the smallest run of the main job: CPU, no torch.compile baseline
    path = tmp_path / "bench.json"
    ops = list(bench.benches()) if full_profile(request.config) else QUICK_PROFILE_BENCHES
    cmd = ["bench", "--device", "cpu", "--quick", "--no-compile", "--json", str(path), "--op", *ops]
    proc = subprocess.run([sys.executable, "-m", "genext", *cmd], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(path.read_text())["rows"]
    config = bench.Config("cpu", quick=True, compile=False)
    timings = {
        (b.name, c.name, t.impl, t.direction): t
        for b in bench.benches().values()
        if b.name in ops
        for c in b.cases(config)
        for t in c.timings
    }
    assert {(r["op"], r["case"], r["impl"], r["direction"]) for r in rows} == set(timings)
    assert all(r["ms"] > 0 for r in rows)
    for name in ops:
        checks = [r["check"] for r in rows if r["op"] == name and r["check"]]
        assert checks and all(c.startswith("ok") for c in checks), (name, checks)
    for r in rows:
        if timings[r["op"], r["case"], r["impl"], r["direction"]].flops:
            assert r["extra"]["tflops"] > 0, r
    # what each op's CPU bench must compare, whatever its module declares
    # ("genext (sdpa)": genext's op where it hands the shape to PyTorch's SDPA)
    impls = {
        op: {r["impl"].removesuffix(" (sdpa)") for r in rows if r["op"] == op}
        for op in {r["op"] for r in rows}
    }
    baselines = {
        "group_norm_silu": {"genext", "eager"},
        "attention": {"genext", "sdpa"},
        "kvcache": {"genext", "sdpa"},
        "sampler": {"genext", "diffusers", "kernel", "eager"},
        "vq": {"genext", "cdist"},
        "contrastive": {"genext", "eager"},
    }
    for op, want in baselines.items():
        if op in ops:
            assert impls.get(op) == want, (op, impls.get(op))
    assert all(r["extra"]["tflops"] > 0 for r in rows if r["op"] == "attention")


def test_import_genext_needs_no_numpy():
    # numpy is a dependency of the schedulers only: `import genext` and the ops must work without
    # it (a wheel installed with --no-deps beside a torch that has no numpy)
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import torch, genext\n"
        "genext.ops.group_norm_silu(torch.randn(2, 8, 5, 5), 4)\n"
        "genext.reference.group_norm_silu(torch.randn(2, 8, 5, 5), 4)\n"
        "genext.build_info()\n"
    )
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True)


def test_first_op_calls_do_not_import_sympy():
    # torch._check* import torch's symbolic-shapes module and sympy on first use (0.4-0.7 s on the
    # first genext call of a process); the ops' argument checks return at once on True
    code = (
        "import sys, torch, genext\n"
        "from genext import ops\n"
        # the AVX2 machines' attention rule: genext's own kernel and its checks, on any machine
        "m = sys.modules['genext.ops.flash_attention']\n"
        "m.CPU_ROUTING = m.CpuRouting(avx512=False, amx=False)\n"
        "q = torch.randn(1, 2, 8, 16, requires_grad=True)\n"
        "ops.flash_attention(q, q, q, causal=True).sum().backward()\n"
        "c = torch.randn(1, 8, 2, 16)\n"
        "ops.attention_with_kvcache(torch.randn(1, 1, 2, 16), c, c.clone(), 4)\n"
        "x = torch.randn(2, 8, 5, 5, requires_grad=True)\n"
        "ops.group_norm_silu(x, 4).sum().backward()\n"
        "z = torch.randn(10, 8)\n"
        "idx, _ = ops.vq_nearest(z, torch.randn(16, 8))\n"
        "ops.vq_ema_update(idx, z, 16)\n"
        "a = torch.randn(6, 8, requires_grad=True)\n"
        "ops.clip_loss(a, torch.randn(6, 8), 10.0).backward()\n"
        "ops.siglip_loss(a, torch.randn(6, 8), 10.0, -10.0).backward()\n"
        "assert 'sympy' not in sys.modules, 'an op imported sympy'\n"
    )
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True)


def test_build_info_names_the_cpu_isa_and_the_commit():
    import platform
    from pathlib import Path

    info = genext.build_info()
    isa = info["cpu_isa"]
    assert isinstance(isa, str) and isa
    if platform.machine() == "x86_64" and Path("/proc/cpuinfo").exists():
        flags = set(Path("/proc/cpuinfo").read_text().split())
        assert isa.startswith("x86-64"), isa
        # a level is never claimed without its instructions
        assert "v4" not in isa or {"avx512f", "avx512bw", "avx512vl"} <= flags, isa
        assert "v3" not in isa or {"avx2", "fma"} <= flags, isa
        if {"avx2", "fma"} <= flags and "avx512f" not in flags:  # this project's CPU machine
            assert isa.startswith("x86-64-v3"), isa
    if (Path(genext.__file__).resolve().parents[1] / ".git").exists():
        # built from a checkout: the build recorded its commit
        assert info["commit"] and len(info["commit"].removesuffix("-dirty")) >= 7
