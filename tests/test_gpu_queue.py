"""tools/gpu_queue.py, the GPU queue's runner, on a list of stand-in checks (no GPU, no build: a
state file says the tree is built): checks run in order under their caps, a budget stops the run
before its end with the results written, a second call resumes after the last finished check, and
the repository's own list (tools/gpu_queue.toml) is valid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tools" / "gpu_queue.py"

pytest.importorskip("tomllib", reason="the runner reads its list with tomllib (Python 3.11+)")
sys.path.insert(0, str(ROOT / "tools"))
import gpu_queue  # noqa: E402

LIST = """
[[check]]
name = "first"
cap = 30
verifies = "runs"
run = "echo one; echo '3 passed in 0.10s'"

[[check]]
name = "fails"
cap = 30
verifies = "a failure is recorded"
run = "echo broken; exit 3"

[[check]]
name = "slow"
cap = 1
verifies = "a cap stops a check"
run = "sleep 20"

[[check]]
name = "last"
cap = 30
verifies = "runs after the others"
run = "echo four"
"""


def _run(tmp_path, budget="200", only=""):
    env = dict(
        os.environ,
        GENEXT_QUEUE_LIST=str(tmp_path / "list.toml"),
        GENEXT_QUEUE_STATE=str(tmp_path / "state.json"),
        GENEXT_OUT=str(tmp_path / "out"),
        GENEXT_QUEUE_BUDGET=budget,
        GENEXT_QUEUE_ONLY=only,
    )
    env.pop("GENEXT_QUEUE_RESTART", None)
    p = subprocess.run([sys.executable, str(RUNNER)], env=env, capture_output=True, text=True)
    return p, json.loads((tmp_path / "out" / "results.json").read_text())


def _built(tmp_path):
    (tmp_path / "list.toml").write_text(LIST)
    state = {"commit": gpu_queue.commit(), "finished": [], "built": True}
    (tmp_path / "state.json").write_text(json.dumps(state))


def test_runs_the_list_in_order_under_caps(tmp_path):
    _built(tmp_path)
    p, res = _run(tmp_path)
    assert p.returncode == 1, p.stderr  # one check failed, one timed out
    by = {r["name"]: r for r in res["checks"]}
    assert [r["name"] for r in res["checks"]] == ["gpu", "first", "fails", "slow", "last"]
    assert by["first"]["status"] == "ok" and by["first"]["summary"] == "3 passed in 0.10s"
    assert by["fails"]["status"] == "failed" and by["fails"]["rc"] == 3
    assert by["slow"]["status"] == "timed out" and by["slow"]["seconds"] < 10
    assert by["last"]["status"] == "ok" and by["last"]["summary"] == "four"
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| fails | failed |" in table and "| slow | timed out |" in table
    log = (tmp_path / "out" / "queue.log").read_text()
    assert "one" in log and "broken" in log and "four" in log
    assert sorted(os.listdir(tmp_path / "out")) == ["queue.log", "results.json", "table.md"]


def test_a_second_call_resumes_after_the_finished_checks(tmp_path):
    _built(tmp_path)
    _run(tmp_path, only="first,fails")
    p, res = _run(tmp_path)
    status = {r["name"]: r["status"] for r in res["checks"]}
    assert status["first"] == status["fails"] == "done in an earlier call"
    assert status["slow"] == "timed out" and status["last"] == "ok"


def test_the_budget_leaves_time_for_the_results(tmp_path):
    _built(tmp_path)
    (tmp_path / "list.toml").write_text(LIST.replace("cap = 1\n", "cap = 60\n"))
    p, res = _run(tmp_path, budget="30")  # 30 s less the margin: "slow" is cut at 20 s or less
    by = {r["name"]: r for r in res["checks"]}
    assert by["first"]["status"] == "ok"
    assert by["last"]["status"].startswith("not run") or by["slow"]["status"] == "timed out"


def test_the_repositorys_list_is_valid():
    build, checks = gpu_queue.load_list(ROOT / "tools" / "gpu_queue.toml")
    assert checks and all(c["cap"] > 0 for c in checks)
    assert "fa_head_dims" in build
    p = subprocess.run(
        [sys.executable, str(RUNNER), "--dry-run"], capture_output=True, text=True, check=True
    )
    assert all(f"{i}. {c['name']}" in p.stdout for i, c in enumerate(checks, 1))
