"""One set of flags for run, tune and evaluate (metanas_ray.cli): the same table in --help, README and code."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from metanas_ray.cli import COMMANDS, FLAGS, flag_table

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tune_configs" / "smoke.yaml"
SWEEP_SMOKE = ROOT / "tune_configs" / "sweep_smoke.yaml"


def _parser(command: str):
    if command == "run":
        from metanas_ray.run import parser
    elif command == "tune":
        import importlib
        parser = importlib.import_module("metanas_ray.tune").parser
    else:
        from metanas_ray.evaluate import parser
    return parser()


def test_the_readme_flag_table_is_the_one_the_commands_use():
    assert flag_table() in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_exactly_its_column_of_shared_flags_with_its_help(command):
    options = {o: a for a in _parser(command)._actions for o in a.option_strings}
    for flag, (_, _, _, helps) in FLAGS.items():
        if command in helps:
            assert flag in options and options[flag].help == helps[command], flag
        else:
            assert flag not in options, flag
    assert all(a.help for a in options.values()), "every flag has a --help line"


def _saved_run(tmp_path) -> Path:
    from metanas_ray.config import load
    from metanas_ray.rundir import RunDir
    return RunDir(tmp_path / "run").create(load(SMOKE)).path


def _printed(command: str, tmp_path, capsys, *flags) -> dict:
    if command == "run":
        from metanas_ray.run import main
        argv = ["--config", str(SMOKE), *flags]
    elif command == "tune":
        import importlib
        main = importlib.import_module("metanas_ray.tune").main
        argv = ["--config", str(SWEEP_SMOKE), "--output", str(tmp_path / "sweep"), *flags]
    else:
        from metanas_ray.evaluate import main
        argv = [str(_saved_run(tmp_path)), *flags]
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    return yaml.safe_load(printed.split("\n# search")[0])


@pytest.mark.parametrize("command", COMMANDS)
def test_set_data_root_and_seed_mean_the_same_key_on_every_command(command, tmp_path, capsys):
    cfg = _printed(command, tmp_path, capsys, "--set", "eval.steps=7", "--data-root", "/some/where",
                   "--seed", "5")
    assert cfg["eval"]["steps"] == 7 and cfg["data"]["root"] == "/some/where" and cfg["run"]["seed"] == 5


@pytest.mark.parametrize("command", ["run", "tune"])
def test_scale_flags_set_the_scale_keys(command, tmp_path, capsys):
    cfg = _printed(command, tmp_path, capsys, "--num-workers", "3", "--address", "127.0.0.1:1",
                   "--mlflow", "file:/m")
    assert (cfg["scale"]["num_workers"], cfg["scale"]["address"], cfg["run"]["mlflow"]) == (3, "127.0.0.1:1", "file:/m")


@pytest.mark.parametrize("command", COMMANDS)
def test_print_config_lists_every_key_of_the_config_dataclasses(command, tmp_path, capsys):
    from metanas_ray.config import flat_keys
    cfg = _printed(command, tmp_path, capsys)

    def keys(d, prefix=""):
        return {k2 for k, v in d.items() for k2 in (keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k])}
    assert keys(cfg) == set(flat_keys())


def test_evaluate_refuses_keys_that_shape_the_trained_network(tmp_path, capsys):
    from metanas_ray.evaluate import main
    run = _saved_run(tmp_path)
    for key in ("model.layers=3", "data.n_way=3", "task.lr_w=1"):
        assert main([str(run), "--set", key, "--print-config"]) == 2
        err = capsys.readouterr().err
        assert f"evaluate cannot change '{key.split('=')[0]}'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("script", ["metanas-run", "metanas-tune", "metanas-evaluate", "metanas-predict"])
def test_console_scripts_are_installed_for_each_command(script):
    from importlib.metadata import entry_points
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == script]
    assert re.fullmatch(r"metanas_ray\.(run|tune|evaluate|predict):main", ep.value)
    assert callable(ep.load())
