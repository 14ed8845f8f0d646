"""The package's layering, checked from the source with `ast`, so that it holds by itself:

    genext.ops  ->  genext.nn, genext.losses, genext.samplers  ->  genext.models
                ->  genext.integrations, genext.train

Imports point down only (a module may import its own subpackage and the layers below it, never a
layer above or a sibling of its own layer); genext.reference and genext.bench are leaves that no
library module imports; no module imports another module's private (underscored) names. Also:
every public subpackage is reachable as an attribute after a bare `import genext`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import genext

ROOT = Path(genext.__file__).resolve().parent

# rank of each top-level part of the package; a module may import ranks below its own
BASE = {"_C", "_build_config"}  # the compiled extension and build facts: anyone may import them
RANKS = {
    "ops": 0,
    "nn": 1,
    "losses": 1,
    "samplers": 1,
    "models": 2,
    "integrations": 3,
    "train": 3,  # the training command: uses models, imported by nothing in the library
    "": 4,
    "_info": 4,
}
LEAVES = {"reference": 5, "bench": 6, "__main__": 7}  # never imported by library code
# private modules that other parts may import: the sampler step's kernel contract (the schedulers,
# its reference and its bench use it; users should not)
SHARED_PRIVATE = {"genext.ops._sampler_step"}
TOP = {"", "_info"}  # genext/__init__.py and its build report: one layer, above all subpackages


def _part(module: str) -> str:
    """The top-level part of genext a dotted module name belongs to ('' for genext itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(part: str) -> int:
    return RANKS[part] if part in RANKS else LEAVES[part]


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str, root: Path) -> bool:
    base = root.joinpath(*dotted.split(".")[1:])
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every genext import in the source."""
    pkg = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [
                (a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "genext"
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "genext":
                continue
            out += [(target, a.name, node.lineno) for a in node.names]
    return out


def violations(source: str, module: str, is_package: bool, root: Path = ROOT) -> list[str]:
    """What is wrong with the genext imports of one module's source."""
    found = []
    me = _part(module)
    for target, name, line in imports_of(source, module, is_package):
        where = f"{module}:{line}"
        if target == "genext" and name in BASE:
            continue  # built files (not in the source tree): anyone may import them
        full = f"{target}.{name}" if name and _is_module(f"{target}.{name}", root) else target
        them = _part(full)
        if them in BASE or them == me or {me, them} <= TOP:
            pass
        elif them in LEAVES and me not in LEAVES:
            found.append(f"{where}: library code imports the leaf genext.{them}")
        elif them not in LEAVES and _rank(them) >= _rank(me) and me not in LEAVES:
            kind = "sideways" if _rank(them) == _rank(me) else "upward"
            found.append(f"{where}: {kind} import of genext.{them} from genext.{me or '(top)'}")
        elif me in LEAVES and them in LEAVES and _rank(them) >= _rank(me):
            found.append(f"{where}: the leaf genext.{me} imports genext.{them}")
        private = [p for p in full.split(".")[1:] if p.startswith("_") and p not in BASE]
        if private and them != me and not {me, them} <= TOP and full not in SHARED_PRIVATE:
            found.append(f"{where}: imports the private module {full} of another part")
        if (
            name.startswith("_")
            and not name.startswith("__")
            and not _is_module(f"{target}.{name}", root)
        ):
            found.append(f"{where}: imports the private name {name} from {target}")
    return found


def _sources():
    for path in sorted(ROOT.rglob("*.py")):
        yield path, _module_name(path, ROOT), path.name == "__init__.py"


def test_imports_point_down_and_leaves_stay_leaves():
    problems = []
    for path, module, is_pkg in _sources():
        assert _part(module) in RANKS or _part(module) in LEAVES or _part(module) in BASE, (
            f"{path}: a new top-level part of genext; give it a rank in tests/test_layering.py"
        )
        problems += violations(path.read_text(), module, is_pkg)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "module,source,expected",
    [
        ("genext.ops.vq", "from ..nn import VectorQuantizer", "upward import of genext.nn"),
        ("genext.nn.kvcache", "from ..losses import ClipLoss", "sideways import of genext.losses"),
        ("genext.samplers.ddim", "import genext.models.vae", "upward import of genext.models"),
        ("genext.models.vae", "from .. import reference", "imports the leaf genext.reference"),
        ("genext.nn.functional", "from genext.bench import run", "imports the leaf genext.bench"),
        ("genext.reference.vq", "from ..bench import time_fn", "the leaf genext.reference imports"),
        (
            "genext.samplers.ddpm",
            "from .ddim import _DiscreteScheduler",
            "private name _DiscreteScheduler",
        ),
        (
            "genext.nn.kvcache",
            "from ..ops.attention_with_kvcache import _call",
            "private name _call",
        ),
        (
            "genext.nn.functional",
            "from ..ops._common import softmax_scale",
            "private module genext.ops._common",
        ),
        ("genext.models.vae", "from ..samplers import _discrete", "private module"),
    ],
)
def test_the_checker_catches_each_kind_of_violation(module, source, expected):
    found = violations(source, module, False)
    assert any(expected in v for v in found), found


@pytest.mark.parametrize(
    "module,source",
    [
        ("genext.models.vae", "from ..nn import GroupNormSiLU\nfrom ..ops import group_norm_silu"),
        ("genext.nn.kvcache", "from ..ops.attention_with_kvcache import attention_with_kvcache"),
        ("genext.samplers.ddim", "from . import _base\nfrom ..ops._sampler_step import StepKind"),
        ("genext.bench.vq", "from .. import reference\nfrom ..ops import vq_nearest"),
        ("genext", "from . import _C, ops"),
    ],
)
def test_the_checker_accepts_downward_imports(module, source):
    assert violations(source, module, module == "genext") == []


def test_every_subpackage_is_an_attribute_after_import_genext():
    subpackages = sorted(
        p.parent.name for p in ROOT.glob("*/__init__.py") if not p.parent.name.startswith("_")
    )
    assert {"ops", "nn", "losses", "samplers", "models", "reference"} <= set(subpackages)
    # a fresh interpreter: nothing imported beforehand by other tests
    code = (
        "import genext, types\n"
        f"for name in {subpackages!r}:\n"
        "    assert isinstance(getattr(genext, name), types.ModuleType), name\n"
        "for name in genext.__all__:\n"
        "    getattr(genext, name)\n"
        "import genext.samplers\n"
        "genext.samplers.DDIMScheduler, genext.losses.ClipLoss, genext.nn.KVCache\n"
        "assert genext.KVCache is genext.nn.KVCache\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_resolve():
    import importlib

    for sub in ("ops", "nn", "losses", "samplers", "models", "reference"):
        mod = importlib.import_module(f"genext.{sub}")
        for name in mod.__all__:
            assert hasattr(mod, name), f"genext.{sub}.__all__ names {name}, which it lacks"
