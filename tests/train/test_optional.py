"""The training extra stays optional: `import genext` does not load it, a missing one is named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from genext.train import _deps


def test_import_genext_loads_no_training_dependency():
    # tqdm is left out: torch itself imports it
    code = (
        "import sys, genext, genext.train\n"
        "genext.train.__doc__\n"
        "heavy = ('sklearn', 'skimage', 'matplotlib', 'safetensors', 'scipy')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_missing_dependency_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` fail
    monkeypatch.delitem(sys.modules, "sklearn.datasets", raising=False)
    with pytest.raises(ImportError, match=r"scikit-learn.*pip install 'genext\[train\]'"):
        _deps.require("sklearn.datasets")
