"""The one FLOP / parameter counter, pinned on hand-counted layers."""

import torch
from torch import nn

from taskgrouping.flops import count_flops, count_parameters


def test_linear_and_conv_flops_are_two_per_multiply_accumulate():
    # Linear 8 -> 5: 8 * 5 multiply-accumulates; conv 3 -> 4 channels, 3x3, on 6x6 -> 4x4 output:
    # 4 * 4 * 4 outputs x 3 * 9 inputs each.
    assert count_flops(nn.Linear(8, 5), (8,)) == 2 * 8 * 5
    assert count_flops(nn.Conv2d(3, 4, 3), (3, 6, 6)) == 2 * (4 * 4 * 4) * (3 * 9)
    grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    assert count_flops(grouped, (4, 5, 5)) == 2 * (4 * 5 * 5) * (2 * 9)


def test_counting_leaves_the_mode_and_parameters_alone():
    net = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 2)).train()
    before = [p.detach().clone() for p in net.parameters()]
    assert count_flops(net, (4,)) == 2 * (4 * 3 + 3 * 2)
    assert net.training
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_parameter_count_with_exclusions():
    net = nn.Linear(4, 3)
    assert count_parameters(net) == 4 * 3 + 3
    assert count_parameters(net, exclude=[net.bias]) == 12
