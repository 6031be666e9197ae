"""A data-only unpickler for the community's data set files (see :mod:`.pickles`).

Those files are pickles (and ``.npz`` files with pickled object arrays), shared like
checkpoints, and a pickle can name any function and call it while loading. This reads
only numpy arrays, numpy scalars and plain containers and values, and never lets numpy's
own unpickling helpers touch the file's bytes: ``numpy._core.multiarray._reconstruct``,
``scalar`` and ``numeric._frombuffer`` are replaced by builders here that check every
shape, length and type and build the arrays through numpy's public constructors, from
dtypes rebuilt from their type strings. (numpy's helpers trust their input: an object
dtype whose pickled state drops its has-objects flag, an object array's list shorter
than its shape, or a second BUILD on an array each made arrays over raw memory, that is,
segfaults or worse; helper reviews found each of them.)

Refused: any other name, a BUILD on anything but a fresh array or dtype, structured,
void and datetime dtypes, and ``bytes(n)`` / ``bytearray(n)`` allocations.
"""
from __future__ import annotations

import _compat_pickle
import math
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["safe_load"]


class Refused(pickle.UnpicklingError):
    """The file names or does something a data pickle does not."""


def _string_dtype(obj: Any) -> np.dtype:
    """A dtype from a plain type string; no fields, sub-arrays, voids or datetimes."""
    if isinstance(obj, bytes):
        obj = obj.decode("latin1")
    if not isinstance(obj, str):
        raise Refused(f"a dtype built from {type(obj).__name__}")
    try:
        dtype = np.dtype(obj)
    except TypeError:
        raise Refused(f"an unknown dtype {obj!r}") from None
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind in "VMm":
        raise Refused(f"a {dtype} dtype (structured, void or datetime)")
    return dtype


class _Dtype:
    """``numpy.dtype(obj, align, copy)`` as unpickled: a type string and a byte order."""

    def __init__(self, obj: Any, align: Any = False, copy: Any = True) -> None:
        self.dtype = _string_dtype(obj)

    def build(self, state: Any) -> None:
        # numpy pickles (version, byte order, ...): only the byte order is taken.
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)
        elif order not in ("|", "="):
            raise Refused(f"a dtype state {state!r}")


def _dtype_of(value: Any) -> np.dtype:
    if isinstance(value, _Dtype):
        return value.dtype
    return _string_dtype(value)       # _reconstruct's typecode, e.g. b'b'


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
        raise Refused(f"an array shape {value!r}")
    return value


def _from_bytes(data: Any, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    """A fresh array of ``dtype`` and ``shape`` from exactly as many bytes as it holds."""
    if isinstance(data, str):              # Python 2 pickles, read as latin1
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)) or dtype.hasobject:
        raise Refused(f"{dtype} array data given as {type(data).__name__}")
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise Refused(f"{len(data)} bytes for a {dtype} array of shape {shape}")
    flat = np.frombuffer(bytes(data), dtype=dtype).copy()
    return flat.reshape(shape, order="F" if order == "F" else "C")


class _Array:
    """``_reconstruct(ndarray, shape, dtype)`` as unpickled: its BUILD makes the array,
    which takes its place (in the memo too, when the load ends: see _resolved)."""

    array: np.ndarray | None = None

    def build(self, state: Any) -> np.ndarray:
        if not isinstance(state, tuple) or len(state) != 5:
            raise Refused(f"an array state of {type(state).__name__}")
        _, shape, dtype, fortran, data = state
        shape, dtype = _shape(shape), _dtype_of(dtype)
        if not dtype.hasobject:
            return _from_bytes(data, dtype, shape, "F" if fortran else "C")
        if not isinstance(data, list) or len(data) != math.prod(shape):
            raise Refused(f"an object array of shape {shape} from {type(data).__name__}")
        out = np.empty(len(data), dtype=object)
        out[:] = data
        return out.reshape(shape, order="F" if fortran else "C")


class _Token:
    """What ``numpy.ndarray`` unpickles as: an argument of ``_reconstruct`` only."""

    def __init__(self, *args: Any) -> None:
        raise Refused("it calls numpy.ndarray directly")


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> _Array:
    if subtype is not _Token:
        raise Refused("_reconstruct of something other than numpy.ndarray")
    _dtype_of(dtype)
    return _Array()


def _scalar(dtype: Any, data: Any = None) -> Any:
    dtype = _dtype_of(dtype)
    if dtype.hasobject:
        return data
    return _from_bytes(data, dtype, (), "C")[()]


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return _from_bytes(buffer, _dtype_of(dtype), _shape(shape), order)


def _sized(kind: type) -> Any:
    def make(value: Any = b"", *args: Any) -> Any:
        if isinstance(value, int):
            raise Refused(f"{kind.__name__}({value}): an allocation, not data")
        return kind(value, *args)
    return make


_NUMPY = {"_reconstruct": _reconstruct, "scalar": _scalar, "_frombuffer": _frombuffer}
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(m, n): f for m in ("numpy.core.multiarray", "numpy._core.multiarray",
                           "numpy.core.numeric", "numpy._core.numeric")
       for n, f in _NUMPY.items()},
    ("numpy", "ndarray"): _Token, ("numpy", "dtype"): _Dtype,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "bytes"): _sized(bytes), ("builtins", "bytearray"): _sized(bytearray),
    **{("builtins", k.__name__): k for k in (dict, list, tuple, set, frozenset, int, float,
                                             complex, str, bool)},
}


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Python 3's protocol-2 pickles spell bytes as ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding != "latin1":
        raise Refused("_codecs.encode other than of a str as latin1")
    return text.encode("latin1")


_ALLOWED[("_codecs", "encode")] = _codecs_encode


class _Unpickler(pickle._Unpickler):
    """The pure-Python unpickler over :data:`_ALLOWED`, its BUILD only on a fresh
    ``_Array`` (replaced by the array it makes) or ``_Dtype``."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 pickles spell builtins __builtin__.*: mapped as the unpickler maps them.
        mapped = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        if mapped not in _ALLOWED:
            raise Refused(f"it names {module}.{name}")
        return _ALLOWED[mapped]

    def load_build(self) -> None:
        stack = self.stack  # type: ignore[attr-defined]
        state = stack.pop()
        inst = stack[-1]
        built: set[int] = self.__dict__.setdefault("_built", set())
        if not isinstance(inst, (_Array, _Dtype)) or id(inst) in built:
            raise Refused(f"a BUILD on {type(inst).__name__}")
        built.add(id(inst))
        if isinstance(inst, _Dtype):
            inst.build(state)
            return
        inst.array = stack[-1] = inst.build(state)

    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]


_CONTAINERS = (_Array, _Dtype, dict, list, tuple, set, frozenset, np.ndarray)


def _resolved(obj: Any, seen: set[int] | None = None) -> Any:
    """``obj`` with every unpickled dtype made a numpy dtype; Refused where an array
    stand-in was never built (a file that used it before its BUILD)."""
    seen = set() if seen is None else seen
    if isinstance(obj, _Dtype):
        return obj.dtype
    if isinstance(obj, _Array):
        if obj.array is None:
            raise Refused("an array used before it was built")
        return obj.array
    if id(obj) in seen or not isinstance(obj, (dict, list, tuple, set, frozenset, np.ndarray)):
        return obj
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _resolved(obj[k], seen)
        return obj
    if isinstance(obj, list):
        obj[:] = [_resolved(v, seen) for v in obj]
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            for i, v in enumerate(obj.flat):
                if isinstance(v, _CONTAINERS):
                    obj.flat[i] = _resolved(v, seen)
        return obj
    return type(obj)(_resolved(v, seen) for v in obj)


def safe_load(f: Any, path: Path) -> Any:
    """Unpickle data only from the open binary file ``f``; ValueError naming ``path`` for
    a pickle that names or does anything else, or one that does not unpickle."""
    start = f.tell()
    try:
        try:
            return _resolved(_Unpickler(f).load())
        except UnicodeDecodeError:
            # Python 2 pickles hold numpy buffers as str; latin1 maps them byte for byte.
            f.seek(start)
            return _resolved(_Unpickler(f, encoding="latin1").load())
    except Refused as exc:
        raise ValueError(f"{path} is not a data pickle of arrays, lists and dicts ({exc}); "
                         f"it is not loaded, as a pickle can run code") from None
    except RecursionError:
        raise ValueError(f"{path} does not unpickle: nested too deeply") from None
    except Exception as exc:   # a damaged or foreign file: whatever unpickling raised
        raise ValueError(f"{path} does not unpickle: {type(exc).__name__}: {exc}") from None
