"""Data sources, preprocessing and stratified sampling.

Names are imported on first use, so ``data.options`` (read by the CLI's parser) does not import
torch."""
from __future__ import annotations

from ..lazy import lazy

_WHERE = {"BatchStream": ".loader", "take_images": ".loader", "ArraySource": ".sources",
          "ImageFolderSource": ".sources", "Preprocess": ".sources", "Source": ".sources", "open_source": ".sources",
          "stratified_indices": ".sources"}

__getattr__ = lazy(__name__, _WHERE)


__all__ = sorted(_WHERE)
