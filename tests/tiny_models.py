"""Tiny models used as 'user model files' by the tests (loaded by path, not imported)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(8 * width, 16), nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class ViewNet(nn.Module):
    """Flattens with x.view(-1, C*H*W) into a Linear layer, as older code does."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv2(x))), 4)
        x = x.view(-1, 8 * 4 * 4)
        return self.fc2(F.relu(self.fc1(x)))


class DynamicViewNet(ViewNet):
    """The same network flattening with x.view(x.size(0), -1): the width may change."""

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv2(x))), 4)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class ConcatNet(nn.Module):
    """Two branches concatenated along channels, then a 1x1 convolution."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(5)
        self.b = nn.Conv2d(3, 7, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(7)
        self.mix = nn.Conv2d(12, 6, 1)
        self.bn_mix = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        y = torch.cat([F.relu(self.bn_a(self.a(x))), F.relu(self.bn_b(self.b(x)))], dim=1)
        y = F.relu(self.bn_mix(self.mix(y)))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class DepthwiseNet(nn.Module):
    """A MobileNet-style block: pointwise, depthwise, pointwise."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw2 = nn.Conv2d(8, 10, 1)
        self.bn3 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.pw1(x)))
        x = F.relu(self.bn2(self.dw(x)))
        x = F.relu(self.bn3(self.pw2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build(name: str = "tiny", num_classes: int = 3):
    return {"tiny": TinyCNN, "view": ViewNet, "dynview": DynamicViewNet, "concat": ConcatNet, "depthwise": DepthwiseNet}[name](num_classes)


class SlowCNN(TinyCNN):
    """TinyCNN whose forward sleeps ``delay`` seconds: a run long enough to interrupt."""

    def __init__(self, delay: float = 0.0, **kw) -> None:
        super().__init__(**kw)
        self.delay = delay

    def forward(self, x):
        import time

        time.sleep(self.delay)
        return super().forward(x)
