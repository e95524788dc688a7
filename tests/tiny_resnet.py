"""A tiny residual network for --structure blocks (tests/test_blocks.py), loaded by path as a
user model file. Kept apart from tiny_models.py, whose size the disk-full test's 4 KiB write
limit is set against."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ResBlock(nn.Module):
    """A residual block whose input and output have the same shape (ResNet's BasicBlock)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class TinyRes(nn.Module):
    """A stem, a residual block, a downsampling convolution and a second residual block in one
    Sequential (which changes the shape), a head: two blocks --structure blocks can replace."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = ResBlock(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  ResBlock(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.down(self.block1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
