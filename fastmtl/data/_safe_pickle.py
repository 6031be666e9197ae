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

Refused: any other name, a BUILD on anything but a fresh array or dtype stand-in,
structured, void and datetime dtypes, ``bytes(n)`` / ``bytearray(n)`` allocations, dict
keys and set items that are not plain values (hashing nested shared tuples takes
exponential time), out-of-band buffers, reads past the file's end, and containers that
expand (shared references counted each time) past :data:`_MAX_EXPANDED` elements.
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


_MADE = object()     # the proof that _reconstruct made an _Array


class _Dtype:
    """``numpy.dtype(obj, align, copy)`` as unpickled: a type string and a byte order."""

    built = False

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
    if not isinstance(value, tuple) or len(value) > 32 or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 1 << 48
            for n in value):
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
    built = False

    def __init__(self, token: Any = None) -> None:
        if token is not _MADE:
            raise Refused("an array stand-in made other than by _reconstruct")

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

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise Refused("it calls numpy.ndarray directly")


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> _Array:
    if subtype is not _Token:
        raise Refused("_reconstruct of something other than numpy.ndarray")
    _dtype_of(dtype)
    return _Array(_MADE)


def _scalar(dtype: Any, data: Any = None) -> Any:
    dtype = _dtype_of(dtype)
    if dtype.hasobject:
        return data
    return _from_bytes(data, dtype, (), "C")[()]


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return _from_bytes(buffer, _dtype_of(dtype), _shape(shape), order)


def _sized(kind: type) -> Any:
    def make(value: Any = b"", *args: Any) -> Any:
        if not isinstance(value, (str, bytes, bytearray, list)) or (
                isinstance(value, list) and not all(type(v) is int for v in value)):
            raise Refused(f"{kind.__name__}() of {type(value).__name__}: only of data")
        return kind(value, *args)
    return make


def _plain_key(key: Any) -> bool:
    """A dict key or set item of data: a plain value (hashing nested tuples of shared
    references costs exponential time)."""
    return key is None or type(key) in (str, bytes, int, float, bool)


def _checked_items(kind: type) -> Any:
    def make(items: Any = ()) -> Any:
        return kind(_pairs(items) if issubclass(kind, dict) else _keys(items))
    return make


def _keys(items: Any) -> list[Any]:
    if not isinstance(items, (list, tuple)) or not all(_plain_key(k) for k in items):
        raise Refused("set items that are not plain values")
    return list(items)


def _pairs(items: Any) -> list[Any]:
    if isinstance(items, dict):
        items = list(items.items())
    if not isinstance(items, (list, tuple)) or not all(
            isinstance(p, tuple) and len(p) == 2 and _plain_key(p[0]) for p in items):
        raise Refused("dict items that are not pairs with plain keys")
    return list(items)


_NUMPY = {"_reconstruct": _reconstruct, "scalar": _scalar, "_frombuffer": _frombuffer}
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(m, n): f for m in ("numpy.core.multiarray", "numpy._core.multiarray",
                           "numpy.core.numeric", "numpy._core.numeric")
       for n, f in _NUMPY.items()},
    ("numpy", "ndarray"): _Token, ("numpy", "dtype"): _Dtype,
    ("collections", "OrderedDict"): _checked_items(OrderedDict),
    ("builtins", "bytes"): _sized(bytes), ("builtins", "bytearray"): _sized(bytearray),
    ("builtins", "dict"): _checked_items(dict), ("builtins", "set"): _checked_items(set),
    ("builtins", "frozenset"): _checked_items(frozenset),
}


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Python 3's protocol-2 pickles spell bytes as ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding != "latin1":
        raise Refused("_codecs.encode other than of a str as latin1")
    return text.encode("latin1")


_ALLOWED[("_codecs", "encode")] = _codecs_encode


class _Capped:
    """A file whose reads never ask for more than it has left: a length field of a tiny
    file must not allocate gigabytes."""

    def __init__(self, f: Any, size: int) -> None:
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(self.left if n < 0 else min(n, self.left))
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.f.readline(self.left)
        self.left -= len(line)
        return line


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
        if not isinstance(inst, (_Array, _Dtype)) or inst.built:
            raise Refused(f"a BUILD on {type(inst).__name__}")
        inst.built = True
        if isinstance(inst, _Dtype):
            inst.build(state)
            return
        inst.array = stack[-1] = inst.build(state)

    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]

    # Out-of-band buffers (protocol 5) are never in a data file, and READONLY_BUFFER
    # would show an object array's pointers.
    for _op in (pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        dispatch.pop(_op[0], None)

    def load_setitem(self) -> None:
        if not _plain_key(self.stack[-2]):  # type: ignore[attr-defined]
            raise Refused("a dict key that is not a plain value")
        super().load_setitem()  # type: ignore[misc]

    def _plain_marked(self, step: int = 1) -> None:
        # After a MARK this unpickler's stack holds just the items since it.
        if not all(_plain_key(k) for k in self.stack[::step]):  # type: ignore[attr-defined]
            raise Refused("a dict key or set item that is not a plain value")

    def load_setitems(self) -> None:
        self._plain_marked(2)
        super().load_setitems()  # type: ignore[misc]

    def load_additems(self) -> None:
        self._plain_marked()
        super().load_additems()  # type: ignore[misc]

    def load_frozenset(self) -> None:
        self._plain_marked()
        super().load_frozenset()  # type: ignore[misc]

    dispatch[pickle.SETITEM[0]] = load_setitem  # type: ignore[assignment]
    dispatch[pickle.SETITEMS[0]] = load_setitems  # type: ignore[assignment]
    dispatch[pickle.ADDITEMS[0]] = load_additems  # type: ignore[assignment]
    dispatch[pickle.FROZENSET[0]] = load_frozenset  # type: ignore[assignment]

    def __init__(self, file: _Capped, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.capped = file

    def load_bytearray8(self) -> None:
        # pickle's own allocates the length it reads before reading the bytes
        length = int.from_bytes(self.read(8), "little")  # type: ignore[attr-defined]
        frame = self._unframer.current_frame  # type: ignore[attr-defined]
        framed = frame.getbuffer().nbytes - frame.tell() if frame else 0
        if length > self.capped.left + framed:
            raise pickle.UnpicklingError("BYTEARRAY8 longer than the file")
        self.append(bytearray(self.read(length)))  # type: ignore[attr-defined]

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8  # type: ignore[assignment]


_CONTAINERS = (_Array, _Dtype, dict, list, tuple, set, frozenset, np.ndarray)


# The most elements a file's containers may expand to (shared references count each
# time they are reached): nested shared lists double with every level.
_MAX_EXPANDED = 1 << 31


def _resolved(obj: Any, done: dict[int, tuple[Any, int]] | None = None) -> Any:
    """``obj`` with every stand-in replaced (a dtype by the numpy dtype, an array by the
    array its BUILD made); Refused where an array stand-in was never built or the
    containers expand past :data:`_MAX_EXPANDED` elements."""
    value, size = _resolve(obj, {} if done is None else done)
    if size > _MAX_EXPANDED:
        raise Refused(f"containers that expand to {size} elements")
    return value


def _resolve(obj: Any, done: dict[int, tuple[Any, int]]) -> tuple[Any, int]:
    """(the resolved object, how many elements it expands to)."""
    if isinstance(obj, _Dtype):
        return obj.dtype, 1
    if isinstance(obj, _Array):
        if obj.array is None:
            raise Refused("an array used before it was built")
        return _resolve(obj.array, done)
    if not isinstance(obj, (dict, list, tuple, set, frozenset, np.ndarray)):
        return obj, 1
    key = id(obj)
    if key in done:
        return done[key]
    done[key] = (obj, 1)              # a cycle: counted once
    size = 1
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k], n = _resolve(obj[k], done)
            size += n
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i], n = _resolve(v, done)
            size += n
    elif isinstance(obj, np.ndarray):
        size += obj.size
        if obj.dtype.hasobject:
            for i, v in enumerate(obj.flat):
                if isinstance(v, _CONTAINERS):
                    obj.flat[i], n = _resolve(v, done)
                    size += n
    else:                             # tuple, set, frozenset: plain items or rebuilt
        items = [_resolve(v, done) for v in obj]
        size += sum(n for _, n in items)
        obj = type(obj)(v for v, _ in items)
    done[key] = (obj, min(size, _MAX_EXPANDED + 1))
    return obj, size


def safe_load(f: Any, path: Path, size: int) -> Any:
    """Unpickle data only from the open binary file ``f``, of ``size`` bytes from where it
    stands; ValueError naming ``path`` for a pickle that names or does anything else, or
    one that does not unpickle."""
    start = f.tell()
    try:
        try:
            return _resolved(_Unpickler(_Capped(f, size)).load())
        except UnicodeDecodeError:
            # Python 2 pickles hold numpy buffers as str; latin1 maps them byte for byte.
            f.seek(start)
            return _resolved(_Unpickler(_Capped(f, size), encoding="latin1").load())
    except Refused as exc:
        raise ValueError(f"{path} is not a data pickle of arrays, lists and dicts ({exc}); "
                         f"it is not loaded, as a pickle can run code") from None
    except RecursionError:
        raise ValueError(f"{path} does not unpickle: nested too deeply") from None
    except Exception as exc:   # a damaged or foreign file: whatever unpickling raised
        raise ValueError(f"{path} does not unpickle: {type(exc).__name__}: {exc}") from None
