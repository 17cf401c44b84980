"""The cluster entry points (ray up YAML, KubeRay RayJob, README) run commands this package really accepts."""
import re
import shlex
from pathlib import Path

import yaml

from metanas_ray.config import load, parse_overrides
from metanas_ray.run import parser

ROOT = Path(__file__).resolve().parents[1]


def _check_command(command: str) -> None:
    words = shlex.split(command)
    i = words.index("metanas_ray.run")
    args = parser().parse_args(words[i + 1:])
    assert args.config is None or (ROOT / args.config).is_file(), args.config
    load(ROOT / args.config if args.config else None, parse_overrides(args.overrides))


def _run_commands(text: str) -> list[str]:
    found = re.finditer(r"python -m metanas_ray\.run[^\n`]*", text)
    commands = [m.group(0).split(" #")[0].rstrip(" ") for m in found]
    return [c[:-1] if c.count('"') % 2 else c for c in commands]  # the closing quote of a `ray exec "..."`


def test_kuberay_rayjob_entrypoint():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "rayjob.yaml").read_text()))
    job = docs[0]
    assert job["kind"] == "RayJob" and job["apiVersion"].startswith("ray.io/")
    _check_command(job["spec"]["entrypoint"])
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(int(w["replicas"]) * int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for w in workers)
    assert f"--num-gpus {gpus}" in job["spec"]["entrypoint"]


def test_ray_up_cluster_yaml():
    text = (ROOT / "deploy" / "cluster.yaml").read_text()
    cluster = yaml.safe_load(text)
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert any("pip install" in c and "metanas-ray" in c for c in cluster["setup_commands"])
    assert all("--dashboard-host=127.0.0.1" in c for c in cluster["head_start_ray_commands"] if "--head" in c)
    commands = _run_commands(text)
    assert commands
    for c in commands:
        _check_command(c)


def test_readme_commands(tmp_path, monkeypatch):
    from metanas_ray.genotype_net import load_genotype
    # a command may use what the quick start leaves (runs/quick/genotype.json): run them beside such a folder
    (tmp_path / "runs" / "quick").mkdir(parents=True)
    load_genotype("metanas_og_v2").save(tmp_path / "runs" / "quick" / "genotype.json")
    monkeypatch.chdir(tmp_path)
    commands = [c for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
                for c in _run_commands(page.read_text())]
    assert len(commands) >= 3
    for c in commands:
        _check_command(c)
