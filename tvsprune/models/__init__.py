"""Model specs, the CIFAR zoo and safe checkpoint loading."""
from .spec import LoadedModel, ModelSpec, build_module, load_model, parse_kwargs, read_checkpoint
from .zoo import ZOO

__all__ = ["LoadedModel", "ModelSpec", "ZOO", "build_module", "load_model", "parse_kwargs", "read_checkpoint"]
