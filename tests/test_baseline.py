"""Conv4: 4 × (conv3×3 → BN → ReLU → maxpool 2, floor) → flatten → linear(channels·s²), s = ⌊size/16⌋."""
from __future__ import annotations

import pytest
import torch

from metanas_ray.baseline import Conv4
from metanas_ray.config import Config, ConfigError
from metanas_ray.state import build_network


def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _body(c_in: int, c: int = 64) -> int:
    """Conv and BN parameters: (9·c_in·c + c) + 3·(9·c·c + c) + 4·2c."""
    return (9 * c_in * c + c) + 3 * (9 * c * c + c) + 4 * 2 * c


def test_conv4_flattens_a_1x1_map_of_64_channels_at_28_pixels() -> None:
    net = Conv4(1, 5, 64, 28)  # 28 → 14 → 7 → 3 → 1
    assert net.classifier.in_features == 64 * 1 * 1
    assert _n_params(net.classifier) == 64 * 1 * 1 * 5 + 5
    assert _n_params(net) == _body(1) + 64 * 5 + 5 == 112_261
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 5)


def test_conv4_flattens_a_5x5_map_to_1600_features_at_84_pixels() -> None:
    net = Conv4(3, 5, 64, 84)  # 84 → 42 → 21 → 10 → 5
    assert net.classifier.in_features == 64 * 5 * 5 == 1600
    assert _n_params(net) == _body(3) + 1600 * 5 + 5 == 121_093
    assert net(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    assert Conv4(3, 5, 32, 84).classifier.in_features == 32 * 25  # MAML's miniImageNet width: 800


def test_conv4_pools_with_floor_so_20_pixels_end_in_a_1x1_map() -> None:
    net = Conv4(1, 4, 8, 20)  # floor: 20 → 10 → 5 → 2 → 1 (ceil would give 2×2)
    assert net.features(torch.randn(2, 1, 20, 20)).shape == (2, 8, 1, 1)
    assert net.classifier.in_features == 8


def test_conv4_logits_read_each_cell_of_the_final_map_not_its_mean() -> None:
    torch.manual_seed(0)
    net = Conv4(3, 5, 16, 84)
    x = torch.randn(4, 3, 84, 84)
    f = net.features(x)  # [4, 16, 5, 5]
    moved = torch.roll(f, 1, dims=3)  # every feature one cell to the right: the same per-channel means
    torch.testing.assert_close(moved.mean((2, 3)), f.mean((2, 3)))
    torch.testing.assert_close(net(x), net.classifier(f.flatten(1)))
    assert not torch.allclose(net.classifier(moved.flatten(1)), net(x), atol=1e-3)


@pytest.mark.parametrize("size", [8, 15])
def test_conv4_rejects_an_image_size_that_pools_to_nothing(size: int) -> None:
    with pytest.raises(ConfigError, match=rf"data\.image_size {size} is too small for model\.kind: conv4"):
        Conv4(1, 5, 64, size)
    with pytest.raises(ConfigError, match=r"data\.image_size.*model\.kind: conv4"):  # when the config is read
        Config().override({"model.kind": "conv4", "data.n_way": 5, "data.image_size": size})
    assert Conv4(1, 5, 64, 16).classifier.in_features == 64


def test_build_network_sizes_the_conv4_head_from_data_image_size() -> None:
    cfg = Config().override({"model.kind": "conv4", "data.n_way": 5, "data.image_size": 84})
    net = build_network(cfg, 3)
    assert isinstance(net, Conv4) and net.classifier.in_features == 1600
