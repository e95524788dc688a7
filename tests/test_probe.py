"""The model probe follows data flow, so it cannot be fooled by reused tensor ids."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tvsprune.errors import TvsError
from tvsprune.models.probe import probe_model
from user_patterns import NormAfterPoolAndReluNet as NormAfterPoolNet  # the same network, one definition


class LogSoftmaxNet(nn.Module):
    """The PyTorch-tutorial pattern: the classifier's output goes through log_softmax."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.bn1 = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 10)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.bn1(self.conv1(x))), 4)
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        return F.log_softmax(self.fc3(x), dim=1)


class TailNet(LogSoftmaxNet):
    """softmax of a temperature-scaled, flattened output."""

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.bn1(self.conv1(x))), 4).flatten(1)
        x = self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))
        return torch.softmax(x.view(-1, 10) / 2.0, dim=1)


class ShuffledNet(nn.Module):
    """Layers created in another order than they are called; BatchNorms declared first."""

    def __init__(self):
        super().__init__()
        self.norm_b = nn.BatchNorm2d(12)
        self.norm_a = nn.BatchNorm2d(8)
        self.head = nn.Linear(12, 5)
        self.second = nn.Conv2d(8, 12, 3, padding=1)
        self.first = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.norm_a(self.first(x)))
        x = F.relu(self.norm_b(self.second(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


EXPECTED = {
    LogSoftmaxNet: ("fc3", {"conv1": "bn1", "fc1": "fc1", "fc2": "fc2"}, (3, 10, 10)),
    TailNet: ("fc3", {"conv1": "bn1", "fc1": "fc1", "fc2": "fc2"}, (3, 10, 10)),
    NormAfterPoolNet: ("fc", {"conv1": "bn1", "conv2": "bn2", "conv3": "conv3"}, (3, 8, 8)),
    ShuffledNet: ("head", {"first": "norm_a", "second": "norm_b"}, (3, 8, 8)),
}


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_probe_finds_logits_and_statistic_points_for_every_batch_size(cls):
    logits, stats, shape = EXPECTED[cls]
    torch.manual_seed(0)
    model = cls().eval()
    for repeat in range(20):
        for batch in range(1, 65):
            probe = probe_model(model, torch.randn(batch, *shape))
            assert probe.logits_layer == logits, (batch, repeat)
            assert {l.name: l.stat_module for l in probe.layers} == stats, (batch, repeat)


def test_probe_refuses_models_that_return_several_tensors():
    class TwoHeads(ShuffledNet):
        def forward(self, x):
            return {"logits": super().forward(x)}

    with pytest.raises(TvsError, match="returns dict"):
        probe_model(TwoHeads(), torch.zeros(1, 3, 8, 8))


def test_probe_leaves_the_model_as_it_was():
    model = LogSoftmaxNet().train()
    probe_model(model, torch.zeros(2, 3, 10, 10))
    assert model.training and all(p.grad is None for p in model.parameters())
