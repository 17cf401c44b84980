"""model.kind: genotype, the found network: built from a run's genotype.json or a published genotype, meta-trained
by the same pipeline without α, with drop-path, and its parameter count in summary.json."""
import json

import pytest
import torch

from metanas_ray.config import ConfigError, load
from metanas_ray.genotype import Genotype
from metanas_ray.genotype_net import GenotypeNetwork, drop_path_masks, load_genotype, published
from metanas_ray.run import main
from metanas_ray.state import build_network, init_state

from conftest import ROOT, SMOKE

pytestmark = pytest.mark.timeout(300)


def test_the_published_omniglot_genotype_builds_and_counts_its_parameters():
    """The paper's final Omniglot model (run_og_upscaled.sh): metanas_og_v2, 96 channels, 5 cells, 20-way."""
    cfg = load(ROOT / "tune_configs" / "omniglot_20way_1shot_upscaled.yaml")
    net = build_network(cfg, 1)
    assert isinstance(net, GenotypeNetwork) and len(net.cells) == 5
    assert [c.reduction for c in net.cells] == [False, True, False, True, False]
    state = init_state(cfg, net)
    assert state["alphas"] == {}
    count = sum(v.numel() for v in state["weights"].values())
    assert count == sum(p.numel() for p in net.parameters()) and 1_000_000 < count < 5_000_000
    # each cell holds exactly the genotype's 6 operations
    assert [op for _, _, op in net.cells[0].edge_list] == [op for node in published()["metanas_og_v2"]["normal"]
                                                          for op, _ in node]
    logits = net(torch.rand(3, 1, 28, 28))
    assert logits.shape == (3, 20)


def test_a_runs_genotype_json_is_accepted_and_a_bad_one_names_the_key(tmp_path):
    g = Genotype({"normal": [[("conv_3x3", 0), ("skip_connect", 1)], [("max_pool_3x3", 2), ("conv_3x3", 0)]],
                  "reduce": [[("skip_connect", 0), ("avg_pool_3x3", 1)], [("sep_conv_3x3", 2), ("conv_3x3", 1)]]}, 2)
    g.save(tmp_path / "genotype.json")
    assert load_genotype(str(tmp_path / "genotype.json")).cells == g.cells
    with pytest.raises(ConfigError, match="model.genotype: 'nowhere.json' is neither"):
        load_genotype("nowhere.json")
    with pytest.raises(ConfigError, match="model.genotype"):
        load(SMOKE, {"model.kind": "genotype"})  # no genotype given


def test_drop_path_masks_spare_the_identity_and_scale_the_rest(smoke_cfg):
    cfg = smoke_cfg.override({"model.kind": "genotype", "model.genotype": "metanas_og_v2", "model.nodes": 3})
    net = build_network(cfg, 1)
    masks = drop_path_masks(net, 500, 0.2, torch.Generator().manual_seed(0))
    for l, cell in enumerate(net.cells):
        m = masks[f"drop_{l}"]
        for k, (_, i, op) in enumerate(cell.edge_list):
            if op == "skip_connect" and not (cell.reduction and i < 2):
                assert (m[:, k] == 1).all()
            else:
                assert set(m[:, k].unique().tolist()) == {0.0, 1.25} and 0.1 < (m[:, k] == 0).float().mean() < 0.3


@pytest.mark.slow
def test_a_genotype_run_meta_trains_resumes_and_reports_its_parameter_count(tmp_path):
    """The smoke run with the published cells: drop-path, Adam with kept moments, weight decay; 10 meta-steps,
    then a resume from meta-step 5 ends at the same weights."""
    common = ["--set", "model.kind=genotype", "--set", "model.genotype=metanas_og_v2", "--set", "model.nodes=3",
              "--set", "task.drop_path=0.2", "--set", "task.optimizer=adam", "--set", "task.adam_moments=kept",
              "--set", "task.lr_w=0.005", "--set", "task.weight_decay=0.0001", "--set", "eval.every=5",
              "--set", "eval.test_tasks=4"]
    out = tmp_path / "g"
    assert main(["--config", str(SMOKE), "--output", str(out), "--in-process", *common]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "genotype" and summary["weights"] > 0
    assert summary["meta_test_accuracy_soft"] == summary["meta_test_accuracy_hard"]  # no α: nothing to prune
    assert (out / "plots" / "learning_curves.png").is_file()
    from metanas_ray import checkpoint
    final = checkpoint.load(checkpoint.latest(out / "checkpoints"))
    (out / "checkpoints" / "step_0000010.pt").unlink()
    (out / "summary.json").unlink()
    assert main(["--resume", str(out), "--in-process"]) == 0
    again = checkpoint.load(checkpoint.latest(out / "checkpoints"))
    for k, v in final["state"]["weights"].items():
        assert torch.equal(v, again["state"]["weights"][k]), k


@pytest.mark.parametrize("name", ["omniglot_20way_1shot_upscaled", "miniimagenet_5way_1shot_upscaled",
                                  "miniimagenet_5way_5shot_upscaled"])
@pytest.mark.slow
def test_an_upscaled_config_runs_on_synthetic_data(tmp_path, name):
    cfg = load(ROOT / "tune_configs" / f"{name}.yaml")
    small = ["data.dataset=synthetic", f"data.image_size={min(cfg.data.image_size, 28)}",
             "data.synthetic_classes=24", "data.synthetic_per_class=20", "model.init_channels=4", "meta.meta_batch=2",
             "run.meta_steps=2", "eval.every=2", "eval.val_tasks=2", "eval.test_tasks=2", "eval.steps=3",
             "run.threads=1"]
    out = tmp_path / name
    args = ["--config", str(ROOT / "tune_configs" / f"{name}.yaml"), "--output", str(out), "--in-process"]
    assert main(args + [a for kv in small for a in ("--set", kv)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta_steps"] == 2 and summary["model"] == "genotype" and summary["n_way"] == cfg.data.n_way


@pytest.mark.parametrize("name", sorted(published()))
def test_every_shipped_genotype_builds_and_classifies(smoke_cfg, name):
    cfg = smoke_cfg.override({"model.kind": "genotype", "model.genotype": name})
    net = build_network(cfg, 1)
    assert published()[name]["source"].startswith("boschresearch/metanas")
    assert net(torch.rand(2, 1, 16, 16)).shape == (2, 5)
