"""The benchmarks' own error paths (their timings run outside CI)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_official_benchmark_names_a_missing_checkout(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.official", "--official-root", str(tmp_path / "metanas"),
                        "--out", str(tmp_path / "out.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "no official MetaNAS checkout" in r.stderr
    assert "git clone https://github.com/boschresearch/metanas" in r.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_official_benchmark_names_a_module_the_official_code_lacks(tmp_path):
    root = tmp_path / "metanas"
    (root / "metanas").mkdir(parents=True)
    (root / "metanas" / "__init__.py").write_text("")
    (root / "metanas" / "metanas_main.py").write_text("import scipy_not_installed_here\n")
    r = subprocess.run([sys.executable, "-m", "benchmarks.official", "--official-root", str(root),
                        "--out", str(tmp_path / "out.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "needs 'scipy_not_installed_here'" in r.stderr and "pip install scipy_not_installed_here" in r.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_fidelity_benchmark_names_a_missing_checkout(tmp_path):
    out = tmp_path / "results" / "fidelity.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", "--official-root", str(tmp_path / "metanas"),
                        "--out", str(out), "--runs", str(tmp_path / "runs")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "no official MetaNAS checkout" in r.stderr
    assert "git clone https://github.com/boschresearch/metanas" in r.stderr
    assert not out.parent.exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_budget_benchmark_keeps_a_checkpoint_per_budget_and_meta_tests_it(tmp_path):
    out = tmp_path / "budget.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.budget", "--budgets", "2", "4", "--test-tasks", "2",
                           "--every", "2", "--in-process", "--variant", "smoke=tune_configs/smoke.yaml",
                           "--planned", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    points = json.loads(out.read_text())["results"]["smoke"]
    assert [p["budget_seconds"] for p in points] == [2, 4]
    assert all(p["seconds"] >= p["budget_seconds"] and 0 <= p["accuracy_soft"] <= 1 for p in points)
    assert points[0]["meta_steps"] < points[1]["meta_steps"]
    # --planned: one run per budget for the meta-steps reached there, its meta learning rate annealed over them
    planned = json.loads(out.read_text())["results"]["smoke (annealed)"]
    assert [p["meta_steps"] for p in planned] == [p["meta_steps"] for p in points]
    assert all(0 <= p["accuracy_soft"] <= 1 and p["tasks"] == 2 and p["seconds"] > 0 for p in planned)
    assert out.with_suffix(".png").stat().st_size > 0
    # --append with a longer budget: one more run, to it alone; the earlier points (and notes) stay, each point
    # naming its command
    out.write_text(json.dumps({**json.loads(out.read_text()), "notes": "by hand"}))
    more = subprocess.run([sys.executable, "-m", "benchmarks.budget", "--budgets", "4", "6", "--test-tasks", "2",
                           "--every", "2", "--in-process", "--variant", "smoke=tune_configs/smoke.yaml", "--append",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(p["budget_seconds"], p["command"]) for p in result["results"]["smoke"]] == [(2, 0), (4, 0), (6, 1)]
    assert len(result["commands"]) == 2 and "--append" in result["commands"][1] and result["notes"] == "by hand"
