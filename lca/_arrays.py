"""Intake and validation: turn user arguments into arrays the C engine can take.

Every check names the argument and what was expected (SPEC §7): TypeError for a wrong type or
dtype, ValueError for a wrong shape, size or parameter.  Nothing here computes.
"""
import math
import operator

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
INT32_MAX = 2**31 - 1


def as_array(x, name):
    """A NumPy view of x (no copy where possible), or a TypeError naming the argument."""
    if x is None:
        raise TypeError(f"{name}: expected an array, got None")
    if isinstance(x, np.ndarray):
        a = x
    else:
        dev = getattr(x, "device", None)
        if getattr(dev, "type", None) == "cuda" or hasattr(x, "__cuda_array_interface__"):
            raise NotImplementedError(
                f"{name}: a CUDA array the CPU engine cannot read; the CUDA engine takes "
                "PyTorch or CuPy CUDA arrays for every input of a call (see lca.HAS_CUDA)")
        try:
            a = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - report any conversion failure as a type error
            raise TypeError(f"{name}: expected an array, got {type(x).__name__} ({e})") from None
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {a.dtype}")
    return a


def for_engine(a):
    """a itself when the engine can read it through its strides, else a contiguous copy.

    The engine reads any view whose last dimension is contiguous and whose other strides are
    non-negative multiples of the item size (zero-stride broadcasts included)."""
    s = a.strides
    if a.size == 0:
        return a
    ok = (a.ndim == 0 or a.shape[-1] <= 1 or s[-1] == a.itemsize) and \
        all(x >= 0 and x % a.itemsize == 0 for x in s) and a.flags.aligned
    return a if ok else np.require(a, requirements=["C", "A"])   # copies misaligned data too


def same_dtype(arrays, names):
    dt = arrays[0].dtype
    for a, nm in zip(arrays[1:], names[1:]):
        if a.dtype != dt:
            raise TypeError(f"{nm}: dtype {a.dtype} differs from {names[0]}'s {dt}; "
                            "pass all inputs in one dtype")
    return dt


def check_rank(arrays, names, ranks, batched):
    """Each array must have rank ranks[i] (+1 when batched)."""
    for a, nm, r in zip(arrays, names, ranks):
        want = r + int(batched)
        if a.ndim != want:
            lead = "(B, " if batched else "("
            raise ValueError(f"{nm}: expected {want} dimensions {lead}...), got shape {a.shape}"
                             + ("" if batched else "; give every input a batch dim, or none"))


def check_dim(name, shape, axis, axis_name, want, what):
    if shape[axis] != want:
        raise ValueError(f"{name}: {axis_name} is {shape[axis]} but {what} is {want} "
                         f"(shape {shape})")


def int_param(x, name, lo, hi=INT32_MAX):
    """An integer in [lo, hi], or a TypeError/ValueError naming it."""
    if isinstance(x, bool):
        raise TypeError(f"{name}: expected an integer, got bool")
    try:
        v = operator.index(x)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(x).__name__}") from None
    if v < lo or v > hi:
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}], got {v}")
    return v


def window_param(x, L):
    """window >= 0; any value >= L means exact attention, so it is clamped to L."""
    if isinstance(x, bool):
        raise TypeError("window: expected an integer, got bool")
    try:
        v = operator.index(x)
    except TypeError:
        raise TypeError(f"window: expected an integer, got {type(x).__name__}") from None
    if v < 0:
        raise ValueError(f"window: expected an integer >= 0, got {v}")
    return min(v, L)


def float_param(x, name, default=None):
    if x is None and default is not None:
        return float(default)
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__}")
    try:
        v = float(x)
    except OverflowError:                                   # an int beyond float64
        raise ValueError(f"{name}: expected a finite number, got an integer of "
                         f"{int(x).bit_length()} bits") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    return v


def choice_param(x, name, options):
    if not isinstance(x, str) or x not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, got {x!r}")
    return x
