"""A per-tensor progress bar for the converters (tqdm when enabled, otherwise a no-op)."""

from __future__ import annotations

from typing import Any, Callable


class TensorProgress:
    """A tqdm bar (or a no-op) used as ``with TensorProgress(on, total, desc) as step: step()``."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, unit="tensor")

    def __enter__(self) -> Callable[[], None]:
        return self._step

    def _step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()
