"""Calibration / evaluation sources: image folders, ``.npz`` arrays, CIFAR python batches.

Every source exposes ``classes``, ``labels`` (one int per sample) and ``load(i)``, which
returns a preprocessed ``float32`` CHW tensor. Nothing here unpickles arbitrary objects:
``.npz`` is read with ``allow_pickle=False`` and CIFAR python batches through an
unpickler that accepts only plain containers and numpy arrays.
"""
from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import TvsError

log = logging.getLogger(__name__)

LUMA = (0.299, 0.587, 0.114)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class Preprocess:
    """Resize (shorter side), center-crop, scale to [0, 1] and normalise, on tensors."""

    resize: int | None = None
    crop: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    channels: int | None = None  # 1: RGB images become luma (a greyscale network); None: as decoded

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float CHW in [0, 1]."""
        if self.channels == 1 and x.shape[0] == 3:  # ITU-R 601 luma, as Pillow's "L" conversion
            x = torch.tensordot(torch.tensor(LUMA, dtype=x.dtype), x, dims=1)[None]
        if self.resize:
            h, w = x.shape[-2:]
            s = self.resize / min(h, w)
            size = (max(1, round(h * s)), max(1, round(w * s)))
            if size != (h, w):
                x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        if self.crop:
            h, w = x.shape[-2:]
            if h < self.crop or w < self.crop:
                raise TvsError(f"cannot center-crop {h}x{w} images to {self.crop}; add --resize")
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
            x = x[..., top:top + self.crop, left:left + self.crop]
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
            x = (x - mean) / std
        return x.contiguous()

    def to_dict(self) -> dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop,
                "mean": list(self.mean) if self.mean is not None else None,
                "std": list(self.std) if self.std is not None else None} | (
                    {"channels": self.channels} if self.channels else {})


def model_channels(model: Any) -> int | None:
    """1 where the model reads one channel (a greyscale network, such as PyTorch's MNIST example):
    its first convolution reads one (a hub's recorded input size may still say 3, as timm's with
    in_chans=1), or its recorded input shape says so; else its recorded channels, or None."""
    module = getattr(model, "module", model)
    if isinstance(module, torch.nn.Module):
        first = next((m for m in module.modules() if isinstance(m, torch.nn.Conv2d)), None)
        if first is not None and first.in_channels == 1:
            return 1
    shape = getattr(model, "input_shape", None)
    return int(shape[0]) if shape else None


class BadSample(Exception):
    """A sample that cannot be decoded; carries the file (or index) it came from."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


class Source:
    """Base class: a labelled, indexable set of images."""

    name: str
    classes: list[str]
    labels: np.ndarray
    preprocess: Preprocess

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        # resolved: a later stage run from another working directory finds the same data
        source = str(Path(self.name).resolve()) if Path(self.name).exists() else self.name
        return {"source": source, "kind": type(self).__name__, "samples": len(self),
                "classes": len(self.classes), "preprocess": self.preprocess.to_dict()}


class ImageFolderSource(Source):
    """``root/<class>/<image>``, classes in sorted order (label = index)."""

    def __init__(self, root: str | Path, preprocess: Preprocess) -> None:
        root = Path(root)
        self.name, self.preprocess = str(root), preprocess
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise TvsError(f"no class folders in {root} (expected {root}/<class>/<image>)")
        self.classes = [p.name for p in class_dirs]
        files: list[Path] = []
        labels: list[int] = []
        self.empty_classes: list[str] = []
        for k, d in enumerate(class_dirs):
            found = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                self.empty_classes.append(d.name)
            files += found
            labels += [k] * len(found)
        if not files:
            nested = [d for d in class_dirs if any(c.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS
                                                                     for f in c.iterdir()) for c in d.iterdir())]
            if nested:  # the folder one level too high: root/calib/<class>/<image>
                raise TvsError(f"no images in {root}: {', '.join(d.name + '/' for d in nested[:3])} hold class "
                               f"folders; did you mean {nested[0]}?")
            raise TvsError(f"no images in {root} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
        if self.empty_classes:
            log.warning("classes with no images in %s: %s", root, ", ".join(self.empty_classes))
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)

    def load(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[i]
        try:
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ValueError(f"it declares {im.width} x {im.height} pixels, over the bound of {MAX_PIXELS:,}")
                x = _pixels(im)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadSample(str(path), f"cannot decode image ({type(e).__name__}: {e})") from None
        return self.preprocess(x)


MAX_PIXELS = 64 * 1024 * 1024  # an image is refused before decoding beyond this many pixels


def _pixels(im) -> torch.Tensor:
    """RGB in [0, 1], [3, H, W]. 16-bit images (Pillow's I;16 modes) are scaled by 65535, not
    clipped at 255 by an 8-bit conversion (which turns them almost white); palette, grey and
    RGBA images go through Pillow's RGB conversion."""
    if im.mode.startswith("I;16"):
        grey = torch.from_numpy(np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0)
        return grey.expand(3, *grey.shape).contiguous()
    if im.mode in ("I", "F"):
        raise ValueError(f"{im.mode}-mode images (32-bit integer or float pixels) have no defined [0, 1] scale; "
                         "save them as 8- or 16-bit")
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def array_layout(name: str, x: np.ndarray) -> str:
    """NHWC or NCHW, read from the shape (a channel axis of 1, 3 or 4 at one end only); when both
    ends could be channels (e.g. 3x3 images), the dtype decides as torchvision's conventions do:
    uint8 is NHWC, float is NCHW. Values: uint8 in 0..255, float in 0..1."""
    first, last = x.shape[1] in (1, 3, 4), x.shape[-1] in (1, 3, 4)
    if first and not last:
        layout = "NCHW"
    elif last and not first:
        layout = "NHWC"
    elif first and last:
        layout = "NHWC" if x.dtype == np.uint8 else "NCHW"
    else:
        raise TvsError(f"{name}: cannot tell the channel axis of x with shape {list(x.shape)} "
                       "(expected N,H,W,C or N,C,H,W with 1, 3 or 4 channels)")
    if x.dtype != np.uint8 and x.size:
        head = np.asarray(x[:256], dtype=np.float64)
        lo, hi = float(head.min()), float(head.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -0.01 or hi > 1.01:
            raise TvsError(f"{name}: float images must hold unnormalised values in 0..1 (found {lo:g}..{hi:g}); "
                           "store uint8 0..255 or values/255 (tvsprune applies --mean/--std itself)")
    return layout


class ArraySource(Source):
    """In-memory arrays: ``x`` as (N, H, W, C) or (N, C, H, W), or (N, H, W) greyscale (MNIST's layout),
    uint8 0..255 or float 0..1; ``y`` labels."""

    def __init__(self, name: str, x: np.ndarray, y: np.ndarray, classes: list[str] | None,
                 preprocess: Preprocess) -> None:
        self.name, self.preprocess = name, preprocess
        grey = x.ndim == 3
        if grey:
            x = x[:, None]
        if x.ndim != 4:
            raise TvsError(f"{name}: x must have 4 dimensions (N,H,W,C uint8 or N,C,H,W float) or 3 (N,H,W "
                           f"greyscale), got shape {x.shape}")
        if len(x) != len(y):
            raise TvsError(f"{name}: x has {len(x)} samples but y has {len(y)}")
        if len(x) == 0:
            raise TvsError(f"{name}: holds no samples")
        self.channels_last = array_layout(name, x) == "NHWC" and not grey
        self.scale = 255.0 if x.dtype == np.uint8 else 1.0
        self.x = x
        y = np.asarray(y).reshape(-1)
        if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all()
                                                       and (y == np.round(y)).all())):
            raise TvsError(f"{name}: labels y must be integers (class indices), got {y.dtype} values such as "
                           f"{y[:3].tolist()}")
        self.labels = y.astype(np.int64)
        if self.labels.min() < 0:
            raise TvsError(f"{name}: negative labels")
        n_classes = int(self.labels.max()) + 1
        self.classes = list(classes) if classes is not None else [str(k) for k in range(n_classes)]
        if n_classes > len(self.classes):
            raise TvsError(f"{name}: label {n_classes - 1} but only {len(self.classes)} class names")
        present = set(np.unique(self.labels).tolist())
        self.empty_classes = [c for k, c in enumerate(self.classes) if k not in present]

    def load(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(self.x[i], dtype=np.float32).copy())
        if self.channels_last:
            x = x.permute(2, 0, 1).contiguous()
        if self.scale != 1.0:
            x.div_(self.scale)
        if x.shape[0] == 1 and self.preprocess.channels != 1:  # RGB, as a grey image file is read
            x = x.expand(3, *x.shape[1:])
        return self.preprocess(x)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_cifar_batch(path: Path) -> dict[str, Any]:
    """Read one CIFAR python batch without running arbitrary code."""
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as e:
        raise TvsError(f"{path} is not a readable CIFAR python batch: {e}") from None
    if not isinstance(obj, dict):
        raise TvsError(f"{path} is not a CIFAR python batch (no dict inside)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_arrays(f: Path, b: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(images NHWC uint8, labels) of one CIFAR batch, its entries checked."""
    labels = b.get("labels", b.get("fine_labels"))
    if "data" not in b:
        raise TvsError(f"{f}: no 'data' entry (not a CIFAR python batch)")
    if labels is None:
        raise TvsError(f"{f}: no 'labels' or 'fine_labels' entry")
    try:
        data = np.asarray(b["data"])
        y = np.asarray(labels)
    except (TypeError, ValueError) as e:
        raise TvsError(f"{f}: 'data' or 'labels' is not an array ({e})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise TvsError(f"{f}: 'data' must be uint8 rows of 3072 values (32 x 32 RGB), got {data.dtype} "
                       f"{tuple(data.shape)}")
    if y.ndim != 1 or len(y) != len(data) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise TvsError(f"{f}: {len(y)} labels for {len(data)} images, or labels that are not non-negative integers")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y.astype(np.int64)


def cifar_batches_source(path: Path, preprocess: Preprocess, split: str = "test") -> ArraySource:
    """CIFAR-10 (``data_batch_*``, ``test_batch``) or CIFAR-100 (``train``, ``test``) batches."""
    if path.is_file():
        files = [path]
        meta_dir = path.parent
    else:
        if split == "train":
            files = sorted(path.glob("data_batch_*")) or ([path / "train"] if (path / "train").exists() else [])
        else:
            files = [p for p in (path / "test_batch", path / "test") if p.exists()]
        meta_dir = path
        if not files:
            raise TvsError(f"no CIFAR {split} batches in {path}")
    xs, ys = [], []
    for f in files:
        xs_f, ys_f = _cifar_arrays(f, read_cifar_batch(f))
        xs.append(xs_f)
        ys.append(ys_f)
    classes = None
    for meta_name, key in (("batches.meta", "label_names"), ("meta", "fine_label_names")):
        if (meta_dir / meta_name).exists():
            names = read_cifar_batch(meta_dir / meta_name).get(key)
            if names:
                classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            break
    return ArraySource(str(path), np.concatenate(xs), np.concatenate(ys), classes, preprocess)


NPZ_NAMES = (("x", "images", "inputs", "data"), ("y", "labels", "targets"))  # images, then labels


def _npz_name(files: list[str], names: tuple[str, ...], split: str) -> str | None:
    """The array among ``files`` for one role: a name of ``names`` (or in capitals), or the
    split's (``test_images``, as MedMNIST's files hold ``train_``, ``val_`` and ``test_`` arrays)."""
    return next((k for n in names for k in (n, n.upper(), f"{split}_{n}") if k in files), None)


def npz_source(path: Path, preprocess: Preprocess, split: str = "test") -> ArraySource:
    try:
        with np.load(path, allow_pickle=False) as z:
            xk, yk = (_npz_name(z.files, names, split) for names in NPZ_NAMES)
            if xk is None or yk is None:
                raise TvsError(f"{path}: an .npz source needs arrays 'x' and 'y' (or 'images' and 'labels', or "
                               f"'{split}_images' and '{split}_labels'; found {', '.join(z.files)})")
            x, y = z[xk], z[yk]
            classes = [str(c) for c in z["classes"]] if "classes" in z else None
    except TvsError:
        raise
    except Exception as e:
        raise TvsError(f"{path} is not a readable .npz file (without pickle): {e}") from None
    return ArraySource(str(path), x, y, classes, preprocess)


def open_source(path: str | Path, preprocess: Preprocess | None = None, split: str = "test") -> Source:
    """Open a data source by path: image folder, ``.npz`` file, or CIFAR python batches."""
    path = Path(path)
    preprocess = preprocess or Preprocess()
    if not path.exists():
        raise TvsError(f"data not found: {path}")
    if path.is_file() and path.suffix == ".npz":
        return npz_source(path, preprocess, split)
    if path.is_file() or (path / "batches.meta").exists() or (path / "meta").exists() \
            or any(path.glob("data_batch_*")):
        return cifar_batches_source(path, preprocess, split)
    if path.is_dir():
        return ImageFolderSource(path, preprocess)
    raise TvsError(f"unsupported data source: {path}")


def stratified_indices(labels: np.ndarray, per_class: int | None, seed: int = 0,
                       exclude: np.ndarray | None = None) -> np.ndarray:
    """Up to ``per_class`` seeded random indices of each class (all when ``None``).

    ``exclude`` removes indices first (to draw a validation split disjoint from
    the calibration samples). The result is sorted, so reading is sequential.
    """
    idx_all = np.arange(len(labels))
    if exclude is not None and len(exclude):
        idx_all = np.setdiff1d(idx_all, exclude)
    if per_class is None:
        return idx_all
    rng = np.random.default_rng(seed)
    chosen = []
    for k in np.unique(labels[idx_all]):
        members = idx_all[labels[idx_all] == k]
        chosen.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)
