"""The GPU queue: builds genext for the visible GPU once, then runs the pending checks of
tools/gpu_queue.toml in order, each under its cap, stopping before a total budget so that its
results always come back. Writes three files to the output folder ($GENEXT_OUT, else $OUT, else
./gpu-queue-out): queue.log (every check's output), results.json (per check: status, seconds, its
last summary line) and table.md (one line per check). A second call on the same machine (the
device tool keeps ignored build outputs while the machine stays warm) skips the build when the
commit is unchanged and resumes after the last finished check; GENEXT_QUEUE_RESTART=1 starts over.

    bash tools/gpu_queue.sh                     # the whole list, 540 s budget
    GENEXT_QUEUE_BUDGET=300 bash tools/gpu_queue.sh
    GENEXT_QUEUE_ONLY=toolchain,sanitizer bash tools/gpu_queue.sh
    python3 tools/gpu_queue.py --dry-run        # the list and the commands, nothing run
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# the list, and the state a second call resumes from (under build/: ignored by git, kept on a
# warm machine); tests point both elsewhere
LIST = Path(os.environ.get("GENEXT_QUEUE_LIST", ROOT / "tools" / "gpu_queue.toml"))
STATE = Path(os.environ.get("GENEXT_QUEUE_STATE", ROOT / "build" / "gpu_queue_state.json"))
MARGIN_S = 10  # left at the end of the budget for writing the results


def commit() -> str:
    r = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True)
    return (r.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def load_list(path: Path = LIST) -> tuple[dict, list[dict]]:
    data = tomllib.loads(path.read_text())
    checks = data.get("check", [])
    names = [c["name"] for c in checks]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: check names repeat: {names}")
    for c in checks:
        missing = {"name", "cap", "run", "verifies"} - set(c)
        if missing:
            raise ValueError(f"{path}: check {c.get('name')!r} lacks {sorted(missing)}")
    return data.get("build", {}), checks


def summary_line(text: str) -> str:
    """The last pytest summary, bench verdict or other line worth a table cell."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"\b(passed|failed|error|errors)\b.* in [\d.]+s", ln):
            return ln.strip("= ")
    return lines[-1][:200] if lines else ""


class Queue:
    def __init__(self, out: Path, budget: float, log) -> None:
        self.out, self.budget, self.log = out, budget, log
        self.start = time.monotonic()
        self.results: list[dict] = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self, name: str, cap: float, cmd: str, env: dict) -> dict:
        available = self.left() - MARGIN_S
        limit = min(cap, available)
        if available < min(cap, 15):  # not enough left for a useful part of it
            result = {"name": name, "status": "not run (no time left)", "seconds": 0.0}
            self.results.append(result)
            return result
        self.log.write(
            f"\n== {time.strftime('%H:%M:%S', time.gmtime())} {name} (cap {limit:.0f} s)\n"
        )
        self.log.write(f"$ {cmd}\n")
        self.log.flush()
        t0 = time.monotonic()
        try:
            p = subprocess.run(
                ["bash", "-o", "pipefail", "-c", cmd],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=limit,
            )
            text, rc, status = p.stdout, p.returncode, "ok" if p.returncode == 0 else "failed"
        except subprocess.TimeoutExpired as e:
            out = e.stdout or ""
            text = out if isinstance(out, str) else out.decode(errors="replace")
            rc, status = None, "timed out"
        seconds = round(time.monotonic() - t0, 1)
        self.log.write(text)
        self.log.write(f"\n== {name}: {status} (rc {rc}) after {seconds} s\n")
        self.log.flush()
        result = {"name": name, "status": status, "rc": rc, "seconds": seconds}
        result["summary"] = summary_line(text)
        self.results.append(result)
        return result

    def write(self, meta: dict) -> None:
        (self.out / "results.json").write_text(
            json.dumps({**meta, "checks": self.results}, indent=1) + "\n"
        )
        rows = ["| check | status | s | summary |", "|---|---|---|---|"]
        for r in self.results:
            cell = str(r.get("summary", "")).replace("|", "/")
            rows.append(f"| {r['name']} | {r['status']} | {r['seconds']} | {cell} |")
        (self.out / "table.md").write_text("\n".join(rows) + "\n")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the list, run nothing")
    args = ap.parse_args(argv)
    build_cfg, checks = load_list()
    only = [s for s in os.environ.get("GENEXT_QUEUE_ONLY", "").split(",") if s]
    unknown = set(only) - {c["name"] for c in checks}
    if unknown:
        print(f"gpu_queue: no such checks: {sorted(unknown)}", file=sys.stderr)
        return 2
    if only:
        checks = [c for c in checks if c["name"] in only]
    if args.dry_run:
        for i, c in enumerate(checks, 1):
            print(f"{i}. {c['name']} (cap {c['cap']} s): {' '.join(c['verifies'].split())}")
            print(f"   $ {' '.join(c['run'].split())}")
        return 0

    out = Path(os.environ.get("GENEXT_OUT") or os.environ.get("OUT") or ROOT / "gpu-queue-out")
    out.mkdir(parents=True, exist_ok=True)
    budget = float(os.environ.get("GENEXT_QUEUE_BUDGET", "540"))
    env = dict(os.environ, GENEXT_TESTS="full", PYTHONUNBUFFERED="1")
    here = commit()
    state = {}
    if STATE.is_file() and not os.environ.get("GENEXT_QUEUE_RESTART"):
        state = json.loads(STATE.read_text())
        if state.get("commit") != here:
            state = {}  # another tree: build and run everything again
    state.setdefault("commit", here)
    state.setdefault("finished", [])

    with open(out / "queue.log", "a") as log:
        q = Queue(out, budget, log)
        wheels = sorted(glob.glob(str(ROOT / ".gpu" / "*.whl")))
        if wheels:
            q.run(
                "peers",
                120,
                "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
                "--upgrade --target /tmp/site " + " ".join(wheels),
                env,
            )
            env["PYTHONPATH"] = "/tmp/site"
        q.run(
            "gpu",
            30,
            "nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; "
            "python3 -c 'import torch; print(\"torch\", torch.__version__)'; c++ --version | head -1; "
            "true",
            env,
        )
        if not state.get("built"):
            arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a")
            heads = os.environ.get("GENEXT_FA_HEAD_DIMS", build_cfg.get("fa_head_dims", ""))
            b = q.run(
                "build",
                300,
                f"GENEXT_CUDA=ON TORCH_CUDA_ARCH_LIST='{arch}' GENEXT_FA_HEAD_DIMS='{heads}' "
                f"CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install -v "
                "--no-build-isolation --no-deps -e . && python3 -m genext info --json",
                env,
            )
            if b["status"] != "ok":
                q.write({"commit": here, "stopped": "the build failed"})
                return 1
            state["built"] = True
            STATE.parent.mkdir(exist_ok=True)
            STATE.write_text(json.dumps(state))
        for c in checks:
            if c["name"] in state["finished"]:
                q.results.append(
                    {"name": c["name"], "status": "done in an earlier call", "seconds": 0.0}
                )
                continue
            r = q.run(c["name"], float(c["cap"]), c["run"], env)
            if r["status"].startswith("not run"):
                continue
            state["finished"].append(c["name"])
            STATE.write_text(json.dumps(state))
            q.write({"commit": here, "budget_s": budget})
        q.write({"commit": here, "budget_s": budget})
    print((out / "table.md").read_text())
    failed = [r for r in q.results if r["status"] in ("failed", "timed out")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
