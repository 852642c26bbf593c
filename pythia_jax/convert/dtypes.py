"""Weight dtypes of the converters: names, the ``"auto"`` rule, and the params slots filled by readers.

``"auto"`` keeps each tensor in the dtype it is stored in (float16, bfloat16 or float32), so a
conversion is lossless and writes no float32 copy of a half-precision release. transformers'
``from_pretrained(dtype="auto")`` instead loads the whole model in ``config.json``'s ``dtype``
(or the first weight's dtype), casting the others; the two agree on the Pythia releases, whose
tensors are all float16. float64 tensors are read as float32 (JAX's default precision).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from pythia_jax.errors import CheckpointError
from pythia_jax.host_memory import aligned_empty, cast_overflow, copy_cast, plain_pages, to_numpy, widened, widens

AUTO = "auto"
_DTYPE_NAMES = {"float16": "float16", "fp16": "float16", "half": "float16",
                "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float32": "float32", "fp32": "float32", "float": "float32"}


def canonical_dtype(dtype: Any) -> str:
    """``"float16"``, ``"bfloat16"`` or ``"float32"`` from a name (fp16, bf16 …) or numpy dtype."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    try:
        return _DTYPE_NAMES[name.lower()]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use float16, bfloat16 or float32") from None


def numpy_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype of a name accepted by :func:`canonical_dtype` (bfloat16: ``ml_dtypes``)."""
    import ml_dtypes
    name = canonical_dtype(dtype)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def is_auto(dtype: Any) -> bool:
    """True for ``None`` or ``"auto"``: keep each tensor's stored dtype."""
    return dtype is None or (isinstance(dtype, str) and dtype.lower() == AUTO)


def kept_dtype(dtype: Any) -> np.dtype:
    """The dtype ``"auto"`` keeps a stored tensor of ``dtype`` in (float64 -> float32)."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return np.dtype(np.float32)
    return numpy_dtype(dtype)


def check_cast(dst: np.ndarray, src: np.ndarray, what: str, fix: str) -> None:
    """``CheckpointError`` when casting ``src`` into ``dst`` turned finite values into inf (a
    value beyond the narrower dtype's range, e.g. |x| > 65504 in float16): such a tensor is
    refused, never stored or written with an inf. ``what`` names the tensor, ``fix`` the remedy."""
    bad = cast_overflow(dst, src)
    if bad:
        import ml_dtypes
        big = float(np.max(np.abs(np.asarray(src, np.float32)[np.isfinite(np.asarray(src, np.float32))])))
        raise CheckpointError(
            f"{what}: {bad} value(s) beyond {np.dtype(dst.dtype).name}'s range (largest |x| {big:.6g} > "
            f"{float(ml_dtypes.finfo(dst.dtype).max):.6g}) would become inf in {np.dtype(dst.dtype).name}; {fix}")


def torch_to_numpy(value: Any) -> np.ndarray:
    """``host_memory.to_numpy``, but a torch bfloat16 tensor becomes a numpy bfloat16 view
    (lossless, no float32 copy)."""
    if type(value).__module__.startswith("torch"):
        import torch
        if value.dtype == torch.bfloat16:
            import ml_dtypes
            return value.detach().cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return to_numpy(value)


class SlotArrays:
    """The params arrays a reader fills, made at first use (aligned, so ``to_device_tree`` then
    adopts them on CPU without a copy).

    With a fixed ``dtype`` every array has it. With ``"auto"`` an array takes the dtype of the
    first tensor written into it; a layer stack whose layers are stored in different dtypes is
    widened to float32 (the one dtype all of float16, bfloat16 and float32 fit in exactly).
    """

    def __init__(self, shapes: Mapping[Any, tuple[int, ...]], dtype: Any = "float32"):
        self._shapes = shapes
        self.fixed = None if is_auto(dtype) else numpy_dtype(dtype)
        self._arrays: dict[Any, np.ndarray] = {}

    def get(self, path: Any, dtype: Any) -> np.ndarray:
        """The array of slot ``path`` for a tensor stored in ``dtype`` (None: the slot as made)."""
        array = self._arrays.get(path)
        if dtype is None:
            if array is None:
                raise KeyError(f"params slot {path} was never written")
            return array
        want = self.fixed if self.fixed is not None else kept_dtype(dtype)
        if array is None:
            array = self._arrays[path] = self._empty(path, want)
        elif self.fixed is None and array.dtype != want and array.dtype != np.float32:
            wider = self._empty(path, np.dtype(np.float32))
            copy_cast(wider, array)
            array = self._arrays[path] = wider
        return array

    def pop(self, path: Any) -> np.ndarray:
        return self._arrays.pop(path)

    def _empty(self, path: Any, dtype: np.dtype) -> np.ndarray:
        with plain_pages():
            return aligned_empty(self._shapes[path], dtype)


def defer_widening(params: Any, dtype: Any, source: str = "checkpoint") -> tuple[Any, np.dtype | None]:
    """A params tree read with ``"auto"`` -> ``(params, save_dtype)`` for a checkpoint in ``dtype``.

    Arrays that ``dtype`` holds exactly (``host_memory.widens``: float16 / bfloat16 when float32
    is asked) are left as read, for the save to widen chunk by chunk as it writes them
    (``checkpoint.save_params_checkpoint(dtype=save_dtype)``): a float32 checkpoint of a float16
    release then never has a float32 copy of the model in memory. Any other array of another
    dtype (a float32 release asked as float16, float16 asked as bfloat16) is cast here, one
    array at a time, and refused (``CheckpointError``) when a finite value would become inf.
    ``dtype`` None or ``"auto"``: ``(params, None)``, every array as stored.
    """
    if is_auto(dtype):
        return params, None
    import jax

    target = numpy_dtype(dtype)

    def cast(path: Any, x: np.ndarray) -> np.ndarray:
        if x.dtype == target or widens(x.dtype, target):
            return x
        with plain_pages():
            out = aligned_empty(x.shape, target)
        copy_cast(out, x)
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        check_cast(out, x, f"{source}: params {name} ({x.dtype.name})",
                   "convert with dtype 'auto' (each tensor as stored) or 'float32' (--dtype)")
        return out

    return jax.tree_util.tree_map_with_path(cast, params), target


# the dtype an array is stored in by a save with ``save_dtype`` (see :func:`defer_widening`)
saved_dtype = widened
