import pytest
import torch

from metanas_ray.config import MetaConfig
from metanas_ray.meta_update import MetaLearner
from metanas_ray.state import clone


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"weights": {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)},
            "alphas": {"alpha_normal": torch.randn(5, 7, generator=g), "beta_normal": torch.randn(5, generator=g)}}


@pytest.mark.parametrize("lr, frac", [(1.0, 1.0), (0.5, 0.5)])
def test_reptile_with_one_task_moves_the_given_fraction(lr, frac):
    meta, adapted = _state(0), _state(1)
    start = clone(meta)
    learner = MetaLearner(MetaConfig(lr_w=lr, lr_alpha=lr, anneal="constant"), total_steps=10)
    learner.step(meta, adapted, step=0)
    for part in meta:
        for k in meta[part]:
            expect = adapted[part][k] if frac == 1.0 else (start[part][k] + adapted[part][k]) / 2
            if frac == 1.0:
                assert torch.equal(meta[part][k], expect), (part, k)  # exactly on the adapted parameters
            else:
                torch.testing.assert_close(meta[part][k], expect)


def test_separate_meta_learning_rates_and_warmup():
    meta, adapted = _state(0), _state(1)
    start = clone(meta)
    learner = MetaLearner(MetaConfig(lr_w=1.0, lr_alpha=1.0, anneal="constant", warmup_steps=3), total_steps=10)
    learner.step(meta, adapted, step=2)  # still in warm-up: only w moves
    for k in meta["alphas"]:
        assert torch.equal(meta["alphas"][k], start["alphas"][k])
    for k in meta["weights"]:
        assert torch.equal(meta["weights"][k], adapted["weights"][k])
    learner.step(meta, adapted, step=3)
    for k in meta["alphas"]:
        assert torch.equal(meta["alphas"][k], adapted["alphas"][k])


def test_meta_learning_rate_annealing():
    learner = MetaLearner(MetaConfig(lr_w=1.0, lr_alpha=0.5, anneal="linear", warmup_steps=2), total_steps=10)
    assert learner.learning_rates(0) == (1.0, 0.0)
    assert learner.learning_rates(5) == pytest.approx((0.5, 0.25))
    assert learner.learning_rates(9)[0] == pytest.approx(0.1)


def test_fomaml_descends_the_mean_query_gradient():
    meta, grad = _state(0), _state(1)
    start = clone(meta)
    MetaLearner(MetaConfig(algorithm="fomaml", lr_w=0.1, lr_alpha=0.2, anneal="constant"), 10).step(meta, grad, 0)
    torch.testing.assert_close(meta["weights"]["a"], start["weights"]["a"] - 0.1 * grad["weights"]["a"])
    torch.testing.assert_close(meta["alphas"]["beta_normal"],
                               start["alphas"]["beta_normal"] - 0.2 * grad["alphas"]["beta_normal"])


def test_adam_meta_optimizer_state_round_trips(tmp_path):
    cfg = MetaConfig(optimizer="adam", lr_w=0.01, lr_alpha=0.01, anneal="constant")
    a, b = MetaLearner(cfg, 10), MetaLearner(cfg, 10)
    meta_a, meta_b, target = _state(0), _state(0), _state(1)
    a.step(meta_a, target, 0)
    snapshot = a.state_dict()
    saved = {key: {k: v.clone() for k, v in snapshot[key].items()} for key in "mv"}
    torch.save(snapshot, tmp_path / "opt.pt")
    b.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    b_meta = clone(meta_a)
    a.step(meta_a, target, 1)
    b.step(b_meta, target, 1)
    for k in meta_a["weights"]:
        assert torch.equal(meta_a["weights"][k], b_meta["weights"][k])
        assert not torch.equal(meta_a["weights"][k], meta_b["weights"][k])
    # a state_dict is a snapshot: the next step does not change what a checkpoint payload already holds
    # (a payload kept in memory, or written later, must be the moments of its own step)
    for key in "mv":
        for k, v in snapshot[key].items():
            assert torch.equal(v, saved[key][k]) and not torch.equal(v, a.adam[key][k])
