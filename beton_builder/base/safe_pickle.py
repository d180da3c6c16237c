"""Pickles read without running code: a restricted unpickler that rebuilds numpy arrays and plain
Python values only (what the CIFAR batches and the published score files hold). Any other global a
pickle names (os.system, builtins.eval, a class with a __reduce__ of its own) is refused before
anything is called."""
from __future__ import annotations

import io
import pickle

# numpy's array reconstructors (numpy 1 `numpy.core`, numpy 2 `numpy._core`): _reconstruct and scalar
# for protocols 0-4, _frombuffer for protocol 5; `_codecs.encode` is how a Python 3 pickle of protocol
# 2 stores bytes. None of them can run code.
ARRAY_GLOBALS = frozenset({(f"numpy{core}.multiarray", name) for core in ("._core", ".core")
                           for name in ("_reconstruct", "scalar")}
                          | {(f"numpy{core}.numeric", "_frombuffer") for core in ("._core", ".core")}
                          | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global that ArrayUnpickler does not rebuild (its message: `module.name`)."""


class ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, dicts, lists, tuples, strings, bytes and numbers only: a global outside
    ARRAY_GLOBALS raises RefusedGlobal naming it, before it is imported or called."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in ARRAY_GLOBALS:
            raise RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def safe_loads(blob: bytes, encoding: str = "ASCII") -> object:
    """pickle.loads through ArrayUnpickler (`encoding` for Python 2 pickles: "bytes" keeps their byte
    strings as bytes, as the CIFAR batches need)."""
    return ArrayUnpickler(io.BytesIO(blob), encoding=encoding).load()
