"""Networks written the way users write them: every probe case and common hand-written patterns.

Loaded by path as a user's model file (``user_patterns.py:build``, kwarg ``name``). Each is
small enough that calibrate -> prune -> export takes about a second on 16x16 (or, for the
tutorial network, 32x32) inputs.
"""
import collections

import torch
import torch.nn as nn
import torch.nn.functional as F


class TutorialNet(nn.Module):
    """PyTorch's CIFAR tutorial shape: (conv -> relu -> max-pool -> BatchNorm) x 3, then
    ``x.view(-1, C * 2 * 2)`` into a three-layer MLP and a log_softmax tail (32x32 inputs).
    The BatchNorm after the pooling is each conv's statistic point, on a map half its size."""

    def __init__(self, num_classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(3, width, 5)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.fc1 = nn.Linear(4 * width * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.bn1(F.max_pool2d(F.relu(self.conv1(x)), 2))   # 28 -> 14
        x = self.bn2(F.max_pool2d(F.relu(self.conv2(x)), 2))   # 12 -> 6
        x = self.bn3(F.max_pool2d(F.relu(self.conv3(x)), 2))   # 4 -> 2
        x = x.view(-1, 4 * self.width * 2 * 2)
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        return F.log_softmax(self.fc3(x), dim=1)


class SoftmaxTemperatureNet(nn.Module):
    """softmax of a temperature-scaled, flattened output."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.bn1(self.conv1(x))), 4).flatten(1)
        return torch.softmax(self.fc2(F.relu(self.fc1(x))).view(-1, self.fc2.out_features) / 2.0, dim=1)


class NormAfterPoolAndReluNet(nn.Module):
    """BatchNorm after MaxPool, after ReLU, after an addition (no unique source)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)          # conv1 -> maxpool -> bn1
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)          # conv2 -> relu -> bn2
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(8)          # bn3 reads conv3 + b
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        a = self.bn1(F.max_pool2d(self.conv1(x), 2))
        b = self.bn2(F.relu(self.conv2(a)))
        c = self.bn3(self.conv3(b) + b)
        return self.fc(c.mean((2, 3)))


class OutOfOrderNet(nn.Module):
    """Layers created in another order than they are called."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.head = nn.Linear(12, num_classes)
        self.late = nn.Conv2d(8, 12, 3, padding=1)
        self.late_bn = nn.BatchNorm2d(12)
        self.early = nn.Conv2d(3, 8, 3, padding=1)
        self.early_bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.early_bn(self.early(x)))
        x = F.relu(self.late_bn(self.late(F.max_pool2d(x, 2))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class CalledTwiceNet(nn.Module):
    """One convolution applied twice (shared weights), and a defined but unused module."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.unused = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.fc(x.mean((2, 3)))


class FlattenNet(nn.Module):
    """Four ways into the classifier: ``torch.flatten``, ``view``, ``reshape``, ``nn.Flatten``."""

    def __init__(self, num_classes: int = 3, how: str = "flatten") -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AvgPool2d(4)             # fixed pooling: 16x16 -> 4x4
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(8 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        if self.how == "flatten":
            x = torch.flatten(x, 1)
        elif self.how == "view":
            x = x.view(x.size(0), -1)
        elif self.how == "reshape":
            x = x.reshape(-1, 8 * 4 * 4)
        else:
            x = self.flat(x)
        return self.fc2(F.relu(self.fc1(x)))


class NoNormNet(nn.Module):
    """No normalisation layer at all; dropout between the layers."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc1 = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = self.drop(F.relu(self.conv2(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(self.drop(F.relu(self.fc1(x))))


class GroupNormNet(nn.Module):
    """GroupNorm instead of BatchNorm, Dropout2d, AdaptiveAvgPool2d as a module."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn2 = nn.GroupNorm(2, 8)
        self.drop = nn.Dropout2d(0.2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.gn1(self.conv1(x)))
        x = self.drop(F.relu(self.gn2(self.conv2(x))))
        return self.fc(self.pool(x).flatten(1))


class PReLUNet(nn.Module):
    """PReLU with one slope per channel (a parameter pruned with its channels), LeakyReLU, no BatchNorm first."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.PReLU(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.act2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = F.max_pool2d(self.act2(self.bn2(self.conv2(x))), 2)
        return self.fc(F.leaky_relu(self.conv3(x), 0.1).mean((2, 3)))


class DepthMultiplierNet(nn.Module):
    """A depthwise convolution with channel multiplier 2 (groups=8, 16 outputs), ReLU6, a 1x1 conv classifier."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        x = F.relu6(self.bn(self.dw(self.stem(x))))
        return self.head(self.pw(x)).mean((2, 3))


class LayerScaleNet(nn.Module):
    """A residual branch scaled by a free per-channel parameter (``x + gamma * f(x)``), as ConvNeXt does."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((16, 1, 1), 0.5))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.gamma * self.conv2(F.relu(self.conv1(x)))
        return self.head(x.mean((-2, -1)))


class HandWrittenSENet(nn.Module):
    """Squeeze-excitation written inline: mean over the map, two Linears, sigmoid, broadcast product."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.squeeze = nn.Linear(16, 4)
        self.excite = nn.Linear(4, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.conv1(x)))))
        s = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3))))))
        return self.fc((x * s[:, :, None, None]).mean((2, 3)))


class UpsampleConcatNet(nn.Module):
    """A strided branch upsampled (nearest) and concatenated with the full-resolution map."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dec = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        a = self.enc1(x)
        b = F.interpolate(self.enc2(a), scale_factor=2, mode="nearest")
        return self.fc(self.dec(torch.cat([a, b], 1)).mean((2, 3)))


class MnistNet(nn.Module):
    """PyTorch's MNIST example, narrowed: one input channel (greyscale), dropout, log_softmax. Not
    in PATTERNS, whose tests feed three channels; tests/test_user_models.py runs it on its own."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.dropout = nn.Dropout(0.25)
        self.fc1 = nn.Linear(16 * 12 * 12, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.relu(self.fc1(torch.flatten(self.dropout(x), 1)))
        return F.log_softmax(self.fc2(x), dim=1)


class FeatureHeadNet(nn.Module):
    """Logits beside an embedding head the logits do not read, returned as a dict with a 'logits'
    key, a named tuple with a ``logits`` field, or a plain tuple (refused). Not in PATTERNS, which
    are built in memory: the output is unwrapped where tvsprune builds a model from a spec."""

    Out = collections.namedtuple("Out", "features logits")

    def __init__(self, num_classes: int = 3, how: str = "dict") -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(32)
        self.proj = nn.Linear(32, 8)  # runs before the logits: the probe's order is not the ls-seq order
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        f = x.mean((2, 3))
        features, logits = self.proj(f), self.fc(f)
        if self.how == "dict":
            return {"features": features, "logits": logits}
        return self.Out(features, logits) if self.how == "named" else (features, logits)


class ReparametrizedNet(nn.Module):
    """Convolutions under weight norm or spectral norm, new style (``nn.utils.parametrizations``)
    or old (a forward pre-hook), as GAN discriminators and older code write them. Not in
    PATTERNS: tvsprune bakes the weights where it builds a model from a spec."""

    def __init__(self, num_classes: int = 3, how: str = "weight_norm") -> None:
        super().__init__()
        wrap = {"weight_norm": nn.utils.parametrizations.weight_norm, "weight_norm_old": nn.utils.weight_norm,
                "spectral_norm": nn.utils.parametrizations.spectral_norm,
                "spectral_norm_old": nn.utils.spectral_norm}[how]
        self.conv1 = wrap(nn.Conv2d(3, 16, 3, padding=1))
        self.conv2 = wrap(nn.Conv2d(16, 32, 3, padding=1, stride=2))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


PATTERNS = {
    "tutorial": (TutorialNet, {}),
    "softmax-temperature": (SoftmaxTemperatureNet, {}),
    "norm-after-pool-relu-add": (NormAfterPoolAndReluNet, {}),
    "out-of-order": (OutOfOrderNet, {}),
    "called-twice-and-unused": (CalledTwiceNet, {}),
    "torch-flatten": (FlattenNet, {"how": "flatten"}),
    "view": (FlattenNet, {"how": "view"}),
    "reshape": (FlattenNet, {"how": "reshape"}),
    "nn-flatten": (FlattenNet, {"how": "module"}),
    "no-norm-dropout": (NoNormNet, {}),
    "groupnorm": (GroupNormNet, {}),
    "prelu": (PReLUNet, {}),
    "depth-multiplier": (DepthMultiplierNet, {}),
    "layer-scale": (LayerScaleNet, {}),
    "inline-se": (HandWrittenSENet, {}),
    "upsample-concat": (UpsampleConcatNet, {}),
}


def input_size(name: str) -> int:
    return 32 if name == "tutorial" else 16


def build(name: str = "tutorial", num_classes: int = 3, **kwargs) -> nn.Module:
    cls, own = PATTERNS[name]
    return cls(num_classes=num_classes, **own, **kwargs)
