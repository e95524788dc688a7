"""Data sources, preprocessing and stratified sampling."""
from .loader import BatchStream, take_images
from .sources import (ArraySource, ImageFolderSource, Preprocess, Source, open_source,
                      stratified_indices)

__all__ = ["ArraySource", "BatchStream", "ImageFolderSource", "Preprocess", "Source",
           "open_source", "take_images", "stratified_indices"]
