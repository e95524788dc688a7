"""``DataOptions``: where images come from and how they are read and preprocessed."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, ValidationInfo, field_validator

from ..errors import TvsError
from ..options import Options

if TYPE_CHECKING:  # sources imports torch: read on first use, so the CLI's parser does not
    from .sources import Preprocess, Source

MAX_SIDE = 4096  # --resize / --crop: pixels per side

Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]


class ReadOptions(Options):
    """Every data option but the folder: the config's ``[data]`` section adds its two
    folders (``calibration``, ``evaluation``) to these."""

    resize: Side | None = None
    crop: Side | None = None
    mean: list[float] | None = None  # None: the checkpoint's, if it records one
    std: list[float] | None = None
    split: Literal["train", "test"] = "test"  # for CIFAR batch folders, and .npz files of both (train_images, ...)
    samples_per_class: PositiveInt | None = None  # None: every image
    seed: NonNegativeInt = 0
    batch_size: PositiveInt = 128
    workers: NonNegativeInt = 0
    skip_bad: bool = False

    @field_validator("mean", "std")
    @classmethod
    def _rgb(cls, v: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if v is not None:
            if len(v) not in (1, 3) or not all(math.isfinite(x) for x in v):
                raise ValueError(f"{_show(v)}: give 1 or 3 finite values (R,G,B)")
            if info.field_name == "std" and any(x <= 0 for x in v):
                raise ValueError(f"{_show(v)}: every value must be positive")
        return v

    def at(self, path: str, **values: Any) -> "DataOptions":
        """These options applied to the folder ``path`` (``values`` changed)."""
        fields = {k: getattr(self, k) for k in ReadOptions.model_fields}
        return DataOptions.build(path=path, **{**fields, **values})


class DataOptions(ReadOptions):
    """Where calibration / evaluation images come from and how they are preprocessed."""

    path: str

    def preprocess(self, model: Any = None, channels: int | None = None) -> Preprocess:
        """Normalisation: what the user gave, each of mean/std completed from the checkpoint
        (``model``: a LoadedModel or None). A bad value is blamed on where it came from. Images
        get luma where the model reads one channel (``channels``, else ``model``'s)."""
        from .sources import Preprocess, model_channels

        channels = 1 if (channels or model_channels(model)) == 1 else None

        saved = (model.normalize if model is not None else None) or {}
        if not isinstance(saved, dict):
            saved = {"mean": saved, "std": saved}
        where = {"mean": "--mean", "std": "--std"}
        for key in ("mean", "std"):
            if getattr(self, key) is None and saved.get(key) is not None:
                where[key] = f"the checkpoint's normalize {key}"
        mean = self.mean if self.mean is not None else saved.get("mean")
        std = self.std if self.std is not None else saved.get("std")
        if (mean is None) != (std is None):
            given = "--mean" if mean is not None else "--std"
            raise TvsError(f"{given} given without {'--std' if given == '--mean' else '--mean'} (and the checkpoint "
                           "records no normalisation): give both")
        if mean is not None:
            for key, values in (("mean", mean), ("std", std)):
                ok = isinstance(values, (list, tuple)) and len(values) in (1, 3) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
                if not ok:
                    raise TvsError(f"{where[key]} {_show(values)}: give 1 or 3 finite values (R,G,B)")
            if any(v <= 0 for v in std):
                raise TvsError(f"{where['std']} {_show(std)}: every value must be positive")
            for key, values in (("mean", mean), ("std", std)):
                if channels == 1 and len(values) != 1:
                    raise TvsError(f"{where[key]} {_show(values)}: the model reads one channel (greyscale): "
                                   "give one value")
        return Preprocess(self.resize, self.crop, [float(v) for v in mean] if mean else None,
                          [float(v) for v in std] if std else None, channels)

    def open(self, model: Any = None, channels: int | None = None) -> Source:
        """The source, its images preprocessed for ``model`` (or with ``channels``: an ONNX file's)."""
        from .sources import open_source

        return open_source(self.path, self.preprocess(model, channels), self.split)


def _show(values: Any) -> str:
    return ",".join(map(str, values)) if isinstance(values, (list, tuple)) else repr(values)[:60]
