"""Every failure ends in one clear line and a way back: interrupts, write errors, corrupt checkpoints, blow-ups,
config traps. Each test asserts the message and the exit code, and, where there is a run to continue, that it then
finishes exactly as an undisturbed run does. docs/failures.md lists the same cases."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from metanas_ray import checkpoint
from metanas_ray.config import ConfigError, RESUMABLE, load
from metanas_ray.run import main

from conftest import ROOT, SMOKE, free_port, kill_processes_mentioning, ray_cli

pytestmark = pytest.mark.timeout(300)

QUIET = ["--set", "eval.every=0", "--set", "eval.test_tasks=4"]


def run(out, *extra):
    return main(["--config", str(SMOKE), "--output", str(out), "--in-process", *extra])


def assert_same_result(a: Path, b: Path) -> None:
    """Two run directories end at the same meta-parameters, bit for bit, and the same meta-test accuracy."""
    pa, pb = (checkpoint.load(checkpoint.latest(d / "checkpoints")) for d in (a, b))
    assert pa["step"] == pb["step"]
    for part in ("weights", "alphas"):
        for k in pa["state"][part]:
            assert torch.equal(pa["state"][part][k], pb["state"][part][k]), k
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["meta_test_accuracy_soft"] == sb["meta_test_accuracy_soft"]
    assert sa["meta_test_accuracy_hard"] == sb["meta_test_accuracy_hard"]


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------ 1. config traps
def test_a_yaml_section_written_twice_is_an_error_naming_the_key(tmp_path, capsys):
    """YAML itself keeps the second of two equal keys: a second ``run:`` would reset ``run.meta_steps``."""
    twice = tmp_path / "smoke_twice.yaml"
    twice.write_text(SMOKE.read_text() + "run:\n  seed: 3\n")
    assert main(["--config", str(twice), "--output", str(tmp_path / "r"), "--in-process"]) == 2
    assert "key 'run' appears twice" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()  # refused before any work
    (tmp_path / "d.yaml").write_text("task:\n  lr_w: 0.1\n  lr_w: 0.2\n")
    with pytest.raises(ConfigError, match="key 'lr_w' appears twice"):
        load(tmp_path / "d.yaml")


@pytest.mark.slow
def test_a_config_problem_found_at_data_load_leaves_the_output_free_for_the_same_command(tmp_path, capsys):
    out = tmp_path / "r"
    assert run(out, "--set", "data.n_way=20") == 2  # 20 classes asked for, 12 in each synthetic split
    err = capsys.readouterr().err
    assert "data.n_way=20" in one_error_line(err) and "run the same command again" in err
    assert not out.exists()  # nothing was computed, and nothing is left to refuse the next try
    assert run(out, "--set", "data.n_way=5", "--set", "run.meta_steps=2", *QUIET) == 0


@pytest.mark.slow
def test_a_run_that_cannot_find_its_data_is_left_free_and_a_resumed_one_says_how_to_continue(tmp_path, capsys):
    nowhere = ["--set", "data.dataset=omniglot", "--set", "data.download=false", "--data-root", str(tmp_path / "x")]
    assert run(tmp_path / "new", *nowhere) == 2
    assert "images_background.zip" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()
    # a run that has meta-steps behind it keeps them, with error.txt and the command that continues it
    out = tmp_path / "old"
    assert run(out, "--set", "run.meta_steps=5", *QUIET) == 0
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("dataset: synthetic", "dataset: omniglot")
                                     .replace("download: true", "download: false"))
    capsys.readouterr()
    assert main(["--resume", str(out), "--in-process", "--data-root", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "y") in one_error_line(err) and (out / "error.txt").is_file()
    assert "checkpoint of meta-step 5" in err and f"continue with: python -m metanas_ray.run --resume {out}" in err


def test_too_many_training_shots_name_data_train_shots(tmp_path, capsys):
    assert run(tmp_path / "r", "--set", "data.train_shots=7") == 2  # 7 + 3 query images, 8 per class
    assert "data.train_shots + data.n_query" in one_error_line(capsys.readouterr().err)


def test_no_gpu_says_num_gpus_0_and_num_gpus_0_is_accepted(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert run(tmp_path / "g", "--num-gpus", "1") == 2
    assert "--num-gpus 0" in one_error_line(capsys.readouterr().err)
    assert run(tmp_path / "c", "--num-gpus", "0", "--set", "run.meta_steps=1", *QUIET) == 0


# ------------------------------------------------------------------------------------ 2. blow-ups
@pytest.mark.slow
def test_a_meta_update_blow_up_names_meta_lr_w_and_resuming_with_a_lower_one_finishes_the_run(tmp_path, capsys):
    every_step = ["--set", "run.checkpoint_every=1", "--set", "run.meta_steps=4", *QUIET]
    assert run(tmp_path / "straight", *every_step) == 0
    out = tmp_path / "blow"
    assert run(out, "--set", "meta.lr_w=1e38", *every_step) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "blew up w_meta at meta-step 0" in line and "lower meta.lr_w" in line and "task.lr_w" not in line
    assert checkpoint.list_checkpoints(out / "checkpoints") == []  # nothing to resume into the same blow-up
    assert main(["--resume", str(out), "--in-process", "--set", "meta.lr_w=1.0"]) == 0
    assert_same_result(tmp_path / "straight", out)


def test_a_non_finite_task_loss_stops_with_a_message_and_keeps_the_run_directory(tmp_path, capsys):
    out = tmp_path / "nan"
    assert run(out, "--set", "task.lr_w=1e30", "--set", "task.grad_clip=0", "--set", "run.checkpoint_every=1",
               *QUIET) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "loss became nan" in line and "lower task.lr_w" in line
    assert (out / "config.yaml").is_file() and (out / "error.txt").is_file() and not (out / "summary.json").exists()


@pytest.mark.slow
def test_a_task_learner_that_diverges_without_overflowing_warns_once_naming_task_lr_w(tmp_path, capsys):
    from metanas_ray import inner_loop
    inner_loop._warned.clear()
    assert run(tmp_path / "diverge", "--set", "task.lr_w=1e6", "--set", "run.meta_steps=2", *QUIET) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "diverges" in line]
    assert len(warnings) == 1 and "lower task.lr_w" in warnings[0]  # clipping keeps it finite: it says so


# ------------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_resuming_with_fewer_meta_steps_than_done_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "done"
    assert run(out, *QUIET) == 0  # 10 meta-steps, checkpoints at 5 and 10
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["--resume", str(out), "--in-process", "--set", "run.meta_steps=6"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "run.meta_steps=6 but" in line and "already done 10 meta-steps" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # refused before any write


@pytest.mark.slow
def test_resume_may_change_the_documented_keys_and_refuses_the_rest_with_the_list(tmp_path, capsys):
    out = tmp_path / "r"
    assert run(out, "--set", "run.meta_steps=2", *QUIET) == 0
    capsys.readouterr()
    assert main(["--resume", str(out), "--in-process", "--set", "model.layers=3"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'model.layers' cannot change" in line and all(k in line for k in RESUMABLE)
    changed = {"meta.lr_w": 0.5, "meta.lr_alpha": 0.2, "task.lr_w": 0.05, "task.lr_alpha": 0.05, "run.meta_steps": 3,
               "run.log_every": 1, "run.checkpoint_every": 1, "eval.test_tasks": 2, "eval.steps": 2}
    assert main(["--resume", str(out), "--in-process", *[a for k, v in changed.items() for a in ("--set", f"{k}={v}")]]) == 0
    saved = load(out / "config.yaml")
    assert saved.meta.lr_w == 0.5 and saved.eval.test_tasks == 2 and saved.run.meta_steps == 3
    assert json.loads((out / "summary.json").read_text())["meta_test_tasks"] == 2


# ------------------------------------------------------------------------------------ 5. checkpoints
@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_skipped_and_the_run_finishes_as_if_undisturbed(tmp_path, capsys):
    assert run(tmp_path / "straight", *QUIET) == 0
    out = tmp_path / "cut"
    assert run(out, *QUIET) == 0  # checkpoints at steps 5 and 10
    newest = checkpoint.latest(out / "checkpoints")
    newest.write_bytes(newest.read_bytes()[:100])  # a write cut short
    (out / "summary.json").unlink()
    capsys.readouterr()
    assert main(["--resume", str(out), "--in-process"]) == 0
    printed = capsys.readouterr().out
    assert f"skipping {newest.name}" in printed and "resuming from step_0000005.pt" in printed
    assert_same_result(tmp_path / "straight", out)


@pytest.mark.slow
def test_a_run_whose_only_checkpoint_is_corrupt_says_so_and_loses_nothing(tmp_path, capsys):
    out = tmp_path / "c"
    assert run(out, "--set", "run.meta_steps=5", *QUIET) == 0
    only = checkpoint.latest(out / "checkpoints")
    only.write_bytes(only.read_bytes()[:100])
    summary = (out / "summary.json").read_bytes()
    assert main(["--resume", str(out), "--in-process"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "corrupt" in line and only.name in line
    assert (out / "summary.json").read_bytes() == summary


class _Arbitrary:
    """Stands for any object a malicious pickle could carry: weights_only loading refuses it."""


def test_a_checkpoint_holding_arbitrary_objects_is_refused_without_advice_to_unpickle_it(tmp_path):
    path = tmp_path / "step_0000001.pt"
    torch.save({"format": 1, "step": 1, "evil": _Arbitrary()}, path)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(path)
    assert "not loaded" in str(info.value) and "weights_only=False" not in str(info.value)


# ------------------------------------------------------------------------------------ 4. write errors
@contextlib.contextmanager
def unprivileged():
    """Run the block as the user ``nobody`` (root ignores file permissions); as is, when not root."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.seteuid(65534)
    except OSError as e:
        pytest.skip(f"cannot drop root to test file permissions ({e}); root writes read-only folders anyway")
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def shared_tmp():
    """A folder the unprivileged user can reach (pytest's tmp_path lies under a folder only its owner can)."""
    path = Path(tempfile.mkdtemp(prefix="metanas_faults_"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_a_read_only_run_directory_on_resume_is_one_line_and_the_run_then_finishes(shared_tmp, capsys):
    constant = ["--set", "meta.anneal=constant", *QUIET]  # the meta learning rates do not depend on run.meta_steps
    assert run(shared_tmp / "straight", "--set", "run.meta_steps=10", *constant) == 0
    out = shared_tmp / "r"
    assert run(out, "--set", "run.meta_steps=5", *constant) == 0
    out.chmod(0o555)
    capsys.readouterr()
    with unprivileged():
        code = main(["--resume", str(out), "--in-process", "--set", "run.meta_steps=10"])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {out / 'config.yaml'}") and "ermission denied" in line
    assert not (out / "error.txt").exists()  # there is nowhere to write it
    out.chmod(0o755)
    assert main(["--resume", str(out), "--in-process", "--set", "run.meta_steps=10"]) == 0
    assert_same_result(shared_tmp / "straight", out)


@pytest.mark.slow
def test_a_checkpoints_folder_that_becomes_unwritable_is_one_line_and_error_txt(shared_tmp, capsys):
    constant = ["--set", "meta.anneal=constant", *QUIET]
    assert run(shared_tmp / "straight", "--set", "run.meta_steps=10", *constant) == 0
    out = shared_tmp / "r"
    assert run(out, "--set", "run.meta_steps=5", *constant) == 0
    out.chmod(0o777)
    (out / "checkpoints").chmod(0o555)
    capsys.readouterr()
    with unprivileged():
        code = main(["--resume", str(out), "--in-process", "--set", "run.meta_steps=10"])
    assert code == 2
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert line.startswith(f"error: cannot write {out / 'checkpoints' / 'step_0000010.pt'}: Permission denied")
    assert "keeps its checkpoint of meta-step 5" in err and (out / "error.txt").is_file()
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step_0000005.pt"]
    (out / "checkpoints").chmod(0o755)
    assert main(["--resume", str(out), "--in-process"]) == 0
    assert_same_result(shared_tmp / "straight", out)
    assert not (out / "error.txt").exists()


# ------------------------------------------------------------------------------------ 3, 12. Ray: signals, a head
SIGNAL_RUN = ["--set", "run.meta_steps=30", "--set", "run.log_every=5", "--set", "run.checkpoint_every=20", *QUIET]


@pytest.fixture(scope="module")
def local_head():
    """A head started as the README starts one for ``ray job submit`` (it records its address for `ray start`'s
    default discovery), with every port its own, so that the test session's Ray cannot collide with it."""
    ray = ray_cli()
    gcs, dash, agent, agent_grpc, metrics, runtime_env, client = (free_port() for _ in range(7))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    start = subprocess.run(
        [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
         f"--ray-client-server-port={client}"], env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        yield env
    finally:
        kill_processes_mentioning(f"127.0.0.1:{gcs}")
        kill_processes_mentioning(f"gcs_server_port={gcs}")
        record = Path("/tmp/ray/ray_current_cluster")
        if record.is_file() and record.read_text().strip().endswith(f":{gcs}"):
            record.unlink()


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("undisturbed") / "run"
    assert run(out, *SIGNAL_RUN) == 0
    return out


def _signal_a_run(env, out: Path, sig: int, whole_group: bool, where: tuple[str, ...] = ("--num-workers", "2")
                      ) -> tuple[int, str]:
    """Start a 2-worker run (or one ``where`` says), send ``sig`` once meta-step 5 is logged (to the driver, or to
    its whole process group as a terminal's Ctrl+C does), and return its exit code and output."""
    proc = subprocess.Popen([sys.executable, "-m", "metanas_ray.run", "--config", str(SMOKE), "--output", str(out),
                             *where, *SIGNAL_RUN], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "step 5/30" in line:
                (os.killpg if whole_group else os.kill)(proc.pid, sig)
                break
        lines.append(proc.stdout.read())
        return proc.wait(timeout=120), "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _assert_stopped_at_a_checkpoint_and_finish(out: Path, rc: int, printed: str, sig: int, undisturbed: Path) -> None:
    assert rc == 128 + sig, printed[-3000:]
    step = checkpoint.load(checkpoint.latest(out / "checkpoints"))["step"]
    assert 5 <= step < 30
    assert (f"stopped by {signal.Signals(sig).name} after meta-step {step}, whose checkpoint is saved; "
            f"continue with: python -m metanas_ray.run --resume {out}") in printed
    assert "Traceback" not in printed and "SIGTERM received" not in printed and not (out / "STOP").exists()
    assert main(["--resume", str(out), "--in-process"]) == 0
    assert_same_result(undisturbed, out)


@pytest.mark.slow
def test_sigterm_stops_an_in_process_run_the_same_way(undisturbed, tmp_path):
    out = tmp_path / "r"
    rc, printed = _signal_a_run(dict(os.environ), out, signal.SIGTERM, whole_group=False, where=("--in-process",))
    _assert_stopped_at_a_checkpoint_and_finish(out, rc, printed, signal.SIGTERM, undisturbed)


@pytest.mark.slow
@pytest.mark.ray
def test_ctrl_c_stops_a_2_worker_ray_run_at_a_checkpoint_and_resume_finishes_it_as_undisturbed(undisturbed, tmp_path):
    """Ctrl+C reaches the whole process group, Ray's processes too. With no Ray running, the command starts its
    own (not the test session's), and rank 0 alone prints one clean progress line per logged meta-step."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    out = tmp_path / "r"
    rc, printed = _signal_a_run(env, out, signal.SIGINT, whole_group=True)
    assert "Ray: starting a local Ray on 127.0.0.1" in printed
    assert "2 CPU workers" in printed and "spread as [1, 1]" in printed
    assert printed.count("step 5/30 |") == 1  # rank 0 only
    assert "core_worker.cc" not in printed and "Reporting training result" not in printed
    _assert_stopped_at_a_checkpoint_and_finish(out, rc, printed, signal.SIGINT, undisturbed)


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_stops_a_2_worker_run_that_joined_a_local_head_and_resume_finishes_it_as_undisturbed(
        local_head, undisturbed, tmp_path):
    """SIGTERM (schedulers, Kubernetes) to the driver alone, with the README's `ray start --head` running."""
    out = tmp_path / "r"
    rc, printed = _signal_a_run(local_head, out, signal.SIGTERM, whole_group=False)
    assert "Ray: joining the Ray already running here at 127.0.0.1:" in printed  # said in one line
    _assert_stopped_at_a_checkpoint_and_finish(out, rc, printed, signal.SIGTERM, undisturbed)


def test_a_stale_ray_start_record_is_removed_and_a_local_ray_started(tmp_path, monkeypatch, caplog):
    """A head that was not stopped cleanly leaves its address behind: nothing answers there any more."""
    import ray._common.utils
    from metanas_ray import ray_train
    record = tmp_path / "ray_current_cluster"
    record.write_text(f"127.0.0.1:{free_port()}")
    monkeypatch.setattr(ray._common.utils, "get_ray_address_file", lambda temp_dir: str(record))
    with caplog.at_level("INFO", logger="metanas_ray"):
        assert ray_train._ray_start_cluster() == ""
    assert not record.exists() and "no longer answers" in caplog.text


def test_under_ray_train_only_checkpoints_are_reported(monkeypatch):
    """Every ``ray.train.report`` is a barrier of all workers (about 1.5 s here): a logged meta-step makes none,
    so logging costs what writing metrics.csv costs (benchmarks/logging_cost.py measures it)."""
    import ray.train
    from metanas_ray.ray_train import RayRecorder
    calls = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: calls.append(metrics["step"]))
    recorder = RayRecorder.__new__(RayRecorder)
    recorder.rank = 1
    recorder.report([{"step": 3}], None)
    assert calls == []
    recorder.report([{"step": 4}], {"step": 4})
    assert calls == [4]


# ------------------------------------------------------------------------------------ 9, 11. small things
def test_evaluate_with_a_negative_task_count_is_a_usage_error(tmp_path, capsys):
    from metanas_ray.evaluate import main as evaluate
    with pytest.raises(SystemExit) as bad:
        evaluate([str(tmp_path), "--tasks", "-5"])
    assert bad.value.code == 2 and "--tasks must be at least 1" in capsys.readouterr().err


def test_a_failed_omniglot_load_leaves_nothing_in_the_data_root(tmp_path):
    from metanas_ray.data import DataError, load_omniglot
    root = tmp_path / "empty"
    for name in ("images_background", "images_evaluation"):
        (root / name).mkdir(parents=True)
    with pytest.raises(DataError, match="holds no drawings"):
        load_omniglot(root, 28, download=False)
    assert sorted(p.name for p in root.iterdir()) == ["images_background", "images_evaluation"]  # no .lock left
