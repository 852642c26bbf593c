"""``torch.load`` for DeepSpeed checkpoints on machines without DeepSpeed or Megatron installed.

Engine and optimizer states pickle DeepSpeed / Megatron objects (enums, configs); their classes
are replaced by stubs that keep the pickled arguments, so the tensors inside can be read.
"""

from __future__ import annotations

import pickle
import types
from typing import Any

from pythia_jax.errors import CheckpointError


class _Stub:
    """Stands in for classes of packages that are not installed (deepspeed, megatron) when
    unpickling engine / optimizer states; keeps constructor args and pickled state."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._args = args
        self._kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __call__(self, *args: Any, **kwargs: Any) -> "_Stub":  # stubbed functions
        return _Stub(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<stub {type(self).__module__}.{type(self).__name__} {self._args!r}>"


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {"__module__": module})


_tolerant_pickle = types.SimpleNamespace(
    Unpickler=_TolerantUnpickler,
    load=lambda f, **kw: _TolerantUnpickler(f, **kw).load(),
    __name__="pythia_jax_tolerant_pickle")


def require_torch():
    """The ``torch`` module; ``CheckpointError`` saying how to install it when it is missing."""
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading or writing GPT-NeoX checkpoints needs PyTorch "
                              "(pip install torch)") from None
    return torch


def torch_load(file: str, *, tensors_only: bool = False) -> Any:
    """``torch.load`` on CPU, memory-mapped when possible; DeepSpeed objects become stubs.

    ``tensors_only``: try the safe ``weights_only`` loader first (layer files are plain dicts).
    """
    torch = require_torch()
    attempts: list[dict[str, Any]] = []
    if tensors_only:
        attempts += [dict(weights_only=True, mmap=True), dict(weights_only=True)]
    attempts += [dict(weights_only=False, mmap=True, pickle_module=_tolerant_pickle),
                 dict(weights_only=False, pickle_module=_tolerant_pickle)]
    error: Exception | None = None
    for kwargs in attempts:
        try:
            return torch.load(file, map_location="cpu", **kwargs)
        except FileNotFoundError:
            raise CheckpointError(f"{file} does not exist") from None
        except Exception as e:  # noqa: BLE001 - torch raises many types for unreadable files
            error = e
    raise CheckpointError(f"cannot read {file}: {error}")


def plain_value(x: Any) -> Any:
    """Plain Python value of an int/float, 0-d tensor or a stubbed enum."""
    if isinstance(x, _Stub):
        return plain_value(x._args[0]) if x._args else None
    if hasattr(x, "item") and getattr(x, "numel", lambda: 1)() == 1:
        return x.item()
    return x
