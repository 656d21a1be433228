"""DESIGN.md section 3: ling-dist, ling-data and ling-eval work on any nn.Module / callable and
must not import ling-core; ling-kernels imports no other ling package."""

import subprocess
import sys

import pytest

FORBIDDEN = {
    "ling_data": ["ling_core", "ling_train", "ling_dist", "ling_eval", "ling_kernels"],
    "ling_dist": ["ling_core", "ling_train", "ling_data", "ling_eval"],
    "ling_eval": ["ling_core", "ling_train", "ling_dist", "ling_data"],
    "ling_kernels": ["ling_core", "ling_train", "ling_dist", "ling_data", "ling_eval"],
    "ling_core": ["ling_train", "ling_dist", "ling_data", "ling_eval"],
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_above_it(package):
    code = (f"import sys, pkgutil, importlib, {package}\n"
            f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
            f"    importlib.import_module(m.name)\n"
            f"print(' '.join(sorted(n for n in sys.modules if n.startswith('ling_'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert not loaded & set(FORBIDDEN[package]), f"{package} pulled in {loaded & set(FORBIDDEN[package])}"
