"""The FFCV names this project uses, imported in one place without FFCV's start-up compile.

Importing `ffcv.fields.rgb_image` fills IMAGE_MODES, a two-entry numba typed Dict ('jpg' -> 0,
'raw' -> 1); its first insert compiles numba's dictionary implementation, about 4.9 s of every
process that imports FFCV on a 2-core machine (every `ccfs-fast` command, every build worker start,
every torchrun rank). FFCV reads that dict only from Python (the decoders copy the two ints into
their compiled closures; the writer stores one into the row's metadata), so it is made a plain dict
while FFCV is imported, and numba's Dict is restored straight after. Where FFCV was already imported
(by other code in the process), it is used as it is.

FFCV 1.0.2's `ffcv/pipeline/graph.py` does `from distutils.log import warn`. Python 3.12 has no
distutils (setuptools brings a shim when installed): where it cannot be imported, a `distutils.log`
whose `warn` goes to Python's warnings stands in for it.

Importing FFCV sets torch's and numba's thread counts to 1 (ffcv/pipeline/compiler.py): the CLI sets
ours after importing this module.
"""
# ruff: noqa: E402  (FFCV's names are imported after the import below, on purpose)
from __future__ import annotations

import sys
import types
import warnings

import numba.typed


def _ensure_distutils_log() -> None:
    try:
        from distutils.log import warn  # noqa: F401
    except ImportError:
        log = types.ModuleType("distutils.log")
        log.warn = lambda msg, *args: warnings.warn(msg % args if args else msg, stacklevel=2)
        package = sys.modules.get("distutils") or types.ModuleType("distutils")
        package.log = log
        sys.modules["distutils"], sys.modules["distutils.log"] = package, log


def _import_ffcv_without_typed_dict_compile() -> None:
    if "ffcv.fields.rgb_image" in sys.modules:
        return
    _ensure_distutils_log()
    typed_dict = numba.typed.Dict
    numba.typed.Dict = dict
    try:
        import ffcv  # noqa: F401  (imports ffcv.fields.rgb_image)
    finally:
        numba.typed.Dict = typed_dict


_import_ffcv_without_typed_dict_compile()

from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import (
    CenterCropRGBImageDecoder,
    IntDecoder,
    RandomResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
)
from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder, encode_jpeg, resizer
from ffcv.loader import Loader, OrderOption
from ffcv.memory_managers.base import MemoryManager
from ffcv.reader import Reader
from ffcv.transforms import ToTensor
from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType, get_metadata_type
from ffcv.writer import DatasetWriter

__all__ = [
    "ALLOC_TABLE_TYPE", "CURRENT_VERSION", "TYPE_ID_HANDLER", "CenterCropRGBImageDecoder", "DatasetWriter",
    "FieldDescType", "HeaderType", "IntDecoder", "IntField", "Loader", "MemoryManager", "OrderOption",
    "RGBImageField", "RandomResizedCropRGBImageDecoder", "Reader", "ResizedCropRGBImageDecoder",
    "SimpleRGBImageDecoder", "ToTensor", "encode_jpeg", "get_metadata_type", "resizer",
]
