"""`ray job submit` against a local head on 127.0.0.1 (with Ray's token authentication), as a user runs it."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port, kill_processes_mentioning, ray_cli

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(420)]


def test_ray_job_submit_runs_a_tiny_run(tmp_path):
    ray = ray_cli()
    temp_dir = f"/tmp/metanas_job_{os.getpid()}_{int(time.time())}"  # short: Ray's socket paths have a limit
    gcs, dash, agent, agent_grpc, metrics, runtime_env, client = (free_port() for _ in range(7))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    start = subprocess.run(
        [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}",
         # every port of its own, so that another Ray on this machine (a test session's) cannot collide with it
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
         f"--ray-client-server-port={client}"],
        env=env, capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        out = tmp_path / "job_run"
        command = [ray, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT), "--",
                   "python", "-m", "metanas_ray.run", "--config", "tune_configs/smoke.yaml", "--output", str(out),
                   "--num-workers", "1", "--set", "run.meta_steps=4", "--set", "eval.every=0",
                   "--set", "eval.test_tasks=2"]
        deadline = time.time() + 90
        while True:  # the head's job agent comes up a few seconds after `ray start` returns
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=360)
            if "No available agent" not in submit.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout
        # the job's log: our progress line once per logged step, not Ray Train's line per ray.train.report
        assert submit.stdout.count("step 4/4 |") == 1 and "Reporting training result" not in submit.stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["meta_steps"] == 4 and summary["workers"] == 1
        assert (out / "metrics.csv").is_file() and (out / "genotype.json").is_file()
    finally:
        kill_processes_mentioning(temp_dir)
