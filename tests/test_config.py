import pytest

from metanas_ray.config import Config, ConfigError, flat_keys, load, parse_overrides, save


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = Config()
    save(cfg, tmp_path / "c.yaml")
    assert load(tmp_path / "c.yaml") == cfg


def test_yaml_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  n_way: 5\ntask:\n  lr_w: 0.2\n")
    cfg = load(tmp_path / "c.yaml", parse_overrides(["task.lr_w=0.05", "model.reduction_layers=[0]", "meta.algorithm=fomaml"]))
    assert cfg.data.n_way == 5 and cfg.task.lr_w == 0.05
    assert cfg.model.reduction_layers == (0,) and cfg.meta.algorithm == "fomaml"
    assert cfg.override({"run.seed": 3}).run.seed == 3 and cfg.run.seed == 0


@pytest.mark.parametrize("text, needle", [
    ("data:\n  n_wya: 5\n", "data.n_wya"),
    ("dataa:\n  n_way: 5\n", "dataa"),
    ("task:\n  lr_w: -0.1\n", "task.lr_w"),
    ("meta:\n  lr_alpha: .nan\n", "meta.lr_alpha"),
    ("data:\n  n_way: 1\n", "data.n_way"),
    ("data:\n  n_way: five\n", "data.n_way"),
    ("task:\n  tau_alpha_end: 2.0\n", "task.tau_alpha_end"),
    ("model:\n  ops: [conv_3x3, conv_9x9]\n", "conv_9x9"),
    ("model:\n  reduction_layers: [7]\n", "model.reduction_layers"),
    ("run:\n  keep_freed_memory_mb: -1\n", "run.keep_freed_memory_mb"),
    ("scale:\n  workers_per_gpu: 2\n", "scale.workers_per_gpu"),  # without GPUs
    ("scale:\n  num_gpus: 1\n  workers_per_gpu: 0\n", "scale.workers_per_gpu"),
    ("data: [1, 2]\n", "data"),
    ("data:\n  n_way: [1\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, needle):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load(tmp_path / "c.yaml")
    assert needle in str(info.value)


@pytest.mark.parametrize("value, needle", [
    ([0.5, 0.5], "must be 3 positive fractions"),
    ([0.8, 0.4, -0.2], "must be 3 positive fractions"),
    ([0.6, 0.0, 0.4], "must be 3 positive fractions"),
    ([64, 16, 20], "must sum to 1"),
    ("[.nan, 0.5, 0.5]", "must be 3 positive fractions"),
    ("[a, b, c]", "must be a number"),
])
def test_bad_split_fractions_is_an_error_naming_the_key(value, needle):
    with pytest.raises(ConfigError) as info:
        load(None, {"data.dataset": "folder", "data.split_fractions": value})
    assert "data.split_fractions" in str(info.value) and needle in str(info.value)


def test_split_fractions_is_read_by_folder_only_and_printed_with_its_default():
    cfg = load(None, parse_overrides(["data.dataset=folder", "data.split_fractions=[0.7, 0.1, 0.2]"]))
    assert cfg.data.split_fractions == (0.7, 0.1, 0.2)
    assert load(None, {"data.dataset": "folder", "data.split_fractions": "0.6,0.2,0.2"}).data.split_fractions == \
        (0.6, 0.2, 0.2)
    with pytest.raises(ConfigError, match="data.split_fractions.*folder only.*'synthetic'"):
        load(None, {"data.dataset": "synthetic", "data.split_fractions": [0.7, 0.1, 0.2]})
    from metanas_ray.config import describe
    line = next(line for line in describe(Config()).splitlines() if "split_fractions" in line)
    assert line.startswith("  split_fractions: [0.64, 0.16, 0.2]  # folder only") and "64/16/20" in line


def test_unknown_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="task.lr"):
        load(None, {"task.lr": 0.1})
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["task.lr_w"])
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.yaml")


def test_configs_are_frozen():
    with pytest.raises(Exception):
        Config().task.lr_w = 1.0  # type: ignore[misc]


def test_shipped_configs_load():
    from pathlib import Path
    for path in sorted((Path(__file__).parents[1] / "tune_configs").glob("*.yaml")):
        if path.name.startswith("sweep_"):  # sweep files are read by metanas_ray.tune
            continue
        load(path)
    assert "task.lr_w" in flat_keys()
