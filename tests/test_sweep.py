"""The sweep file's module needs no Ray: reading and checking a sweep file happens before Ray starts."""
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # a fresh interpreter that imports torch: about 2.5 s of CPU
def test_the_sweep_module_imports_without_ray():
    code = "import metanas_ray.sweep, sys; assert 'ray' not in sys.modules, sorted(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
