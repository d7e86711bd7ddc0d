"""The layering of DESIGN.md, checked on every module: ``spaces`` imports no framework, ``evaluators``
imports no driver framework and no table or plotting library; ``search`` may import them all."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "spaces": {"torch", "ray", "mlflow", "optuna", "pandas", "matplotlib"},
    "evaluators": {"ray", "optuna", "mlflow", "pandas", "matplotlib"},
}


def modules(package: str) -> list[str]:
    """Every module of ``package``, found on disk (a new file is checked without listing it here)."""
    found = [package]
    for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
        found.append(info.name)
    return found


def loaded_after_importing(names: list[str]) -> set[str]:
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({n!r})\n" for n in names) + \
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_every_module_of_the_package_keeps_to_its_layer(package):
    names = modules(package)
    assert len(names) > 3  # the walk found the package's modules
    loaded = loaded_after_importing(names)
    assert package in loaded  # the probe really imported them
    assert not loaded & FORBIDDEN[package], f"{package} pulls in {sorted(loaded & FORBIDDEN[package])}"


def test_search_imports_the_layers_below_and_nothing_imports_search():
    loaded = loaded_after_importing(modules("search"))
    assert {"search", "evaluators", "spaces", "ray", "mlflow", "optuna"} <= loaded
    for package in FORBIDDEN:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert "from search" not in text and "import search" not in text, f"{path} imports search: layers point down"
