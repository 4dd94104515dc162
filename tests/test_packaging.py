"""Import hygiene: a light package import, and a kernels/ folder nobody mistakes for PyPI's."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_package_and_config_imports_do_not_load_torch():
    out = run_py(
        "import sys, turbo_core, turbo_core.attention.config, turbo_core.attention.plan, turbo_core.cli; "
        "print('torch' in sys.modules)"
    )
    assert out == "False"


def test_kernels_folder_is_not_the_pypi_kernels_package():
    # run from the repository root, where ./kernels is on sys.path via the cwd entry
    out = run_py(
        "import importlib.util, turbo_kernels; "
        "spec = importlib.util.find_spec('kernels'); "
        "print(spec is None or spec.origin is None); "
        "from transformers.utils import is_kernels_available; print(is_kernels_available()); "
        "print(turbo_kernels.__name__)"
    )
    assert out.splitlines() == ["True", "False", "turbo_kernels"]
    assert not (ROOT / "kernels" / "__init__.py").exists()
