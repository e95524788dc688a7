"""Train the tutorial-style CNN (tests/user_patterns.py: TutorialNet) on CIFAR-10, for the tests.

The network is PyTorch's CIFAR tutorial shape, (conv -> relu -> max-pool -> BatchNorm) x 3,
``view`` into a three-layer MLP, log_softmax, at width 32 (32/64/128 channels). The checkpoint
it writes, tests/data/tutorial_cnn_cifar10.pt, is what tests/test_user_models.py prunes:

    python benchmarks/train_tutorial_cnn.py --epochs 8

Same recipe as the shared checkpoints (SGD Nesterov 0.9, weight decay 5e-4, one-cycle
learning rate peaking at 0.05, batch 128, random crop with reflect padding 4 and flips).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import REPO, cifar10  # noqa: E402
from user_patterns import TutorialNet  # noqa: E402

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def load(split: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    classes = sorted(d.name for d in split.iterdir() if d.is_dir())
    xs, ys = [], []
    for k, c in enumerate(classes):
        for f in sorted((split / c).iterdir()):
            xs.append(np.asarray(Image.open(f).convert("RGB")))
            ys.append(k)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous().float().div_(255)
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return x, torch.tensor(ys), classes


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    i, j = torch.randint(0, 9, (2,), generator=g).tolist()
    out = padded[:, :, i:i + 32, j:j + 32]
    flip = torch.rand(len(x), generator=g) < 0.5
    out = out.contiguous()
    out[flip] = out[flip].flip(-1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="initialisation and data order (the shipped checkpoint: 0)")
    ap.add_argument("--out", default=str(REPO / "tests" / "data" / "tutorial_cnn_cifar10.pt"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    root = cifar10()
    xtr, ytr, classes = load(root / "train")
    xte, yte, _ = load(root / "test")
    model = TutorialNet(num_classes=10, width=args.width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = args.epochs * (len(xtr) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for b in range(len(xtr) // 128):
            idx = perm[b * 128:(b + 1) * 128]
            loss = F.nll_loss(model(augment(xtr[idx], g)), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = float(torch.cat([model(xte[i:i + 500]).argmax(1) for i in range(0, len(xte), 500)])
                        .eq(yte).float().mean())
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, test top-1 {acc:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": "TutorialNet", "width": args.width, "state_dict": model.state_dict(),
                "test_acc": acc, "epochs": args.epochs, "seed": args.seed, "normalize": {"mean": MEAN, "std": STD}}, args.out)
    print(f"wrote {args.out} (test top-1 {acc:.4f}, {sum(p.numel() for p in model.parameters()):,} params)")


if __name__ == "__main__":
    main()
