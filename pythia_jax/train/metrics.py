"""Model FLOPs, MFU, throughput and the metric writers (console progress bar + TensorBoard).

FLOPs per trained token (forward + backward = 3 × forward, matmuls only)::

    6 · N_matmul  +  6 · L · H · T

* ``N_matmul`` = all parameters except the input embedding ``embed_in`` (a gather, no matmul):
  the layers' QKV / dense / MLP weights, the untied output head ``embed_out`` (and the few
  bias/LayerNorm weights, counted for simplicity). Each weight costs 2 FLOPs per token forward.
* Attention: per layer and token the scores Q·Kᵀ and the weighted sum A·V each cost 2·T·H FLOPs
  forward over all heads (T = sequence length) → 4·L·H·T forward, 12·L·H·T with backward; a causal
  mask makes only half of the T×T pairs useful, so 6·L·H·T ("causal-halved", as the issue asks).

MFU = (FLOPs per token × tokens/s) / (number of devices × peak FLOP/s per device), with the peak dense
bf16 numbers of ``PEAK_FLOPS`` or ``TrainConfig.peak_flops_per_device``; with neither (CPUs), no MFU
is reported.
Only process 0 writes anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

import jax

from pythia_jax.config import ModelConfig
from pythia_jax.io_utils import json_safe

logger = logging.getLogger(__name__)

# Peak dense bf16 FLOP/s per chip (vendor data sheets). Keys are matched against jax's device_kind.
PEAK_FLOPS: dict[str, float] = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,  # v5p reports "TPU v5"
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "h100 pcie": 756e12,
    "h100": 989e12,  # SXM
    "h200": 989e12,
    "a100": 312e12,
}


def flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token (see the module docstring): 6·(params − V·H) + 6·L·H·T."""
    n_matmul = config.num_params() - config.vocab_size * config.hidden_size
    attention = 6 * config.num_layers * config.hidden_size * seq_length
    return float(6 * n_matmul + attention)


def peak_flops_for_kind(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s for a ``device.device_kind`` string, or None when unknown."""
    kind = device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # most specific first
        if key in kind:
            return PEAK_FLOPS[key]
    return None


def peak_flops_per_device(override: float | None = None, device: jax.Device | None = None) -> float | None:
    """``override`` if given, else the data-sheet value for the device (``PEAK_FLOPS``), else None.

    None (CPUs and unlisted accelerators): no MFU is reported, since a guessed peak (a measured
    matmul rate swings severalfold between identical runs on a shared CPU) would make it noise.
    Set ``TrainConfig.peak_flops_per_device`` to get MFU against your own peak.
    """
    if override:
        return float(override)
    device = device or jax.devices()[0]
    return peak_flops_for_kind(device.device_kind)



def _not_a_nan_warning(record: logging.LogRecord) -> bool:
    return "NaN or Inf found" not in str(record.getMessage())

class Throughput:
    """Tokens/s, tokens/s/chip and MFU over the steps since the last ``measure`` call."""

    def __init__(self, config: ModelConfig, seq_length: int, tokens_per_step: int, num_devices: int,
                 peak_flops: float | None):
        self.flops_per_token = flops_per_token(config, seq_length)
        self.tokens_per_step = tokens_per_step
        self.num_devices = num_devices
        self.peak_flops = peak_flops
        self._t0: float | None = None
        self._steps = 0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._steps = 0

    def add_steps(self, n: int = 1) -> None:
        self._steps += n

    def measure(self) -> dict[str, float]:
        """Metrics since ``start`` (then restarts the window). Empty when nothing was timed."""
        if self._t0 is None or self._steps == 0:
            return {}
        dt = time.perf_counter() - self._t0
        tokens_s = self._steps * self.tokens_per_step / dt
        out = {"step_time_s": dt / self._steps, "tokens_per_s": tokens_s,
               "tokens_per_s_per_chip": tokens_s / self.num_devices}
        if self.peak_flops:  # only against a known peak (see peak_flops_per_device)
            out["mfu"] = tokens_s * self.flops_per_token / (self.num_devices * self.peak_flops)
        self.start()
        return out


class MetricWriter:
    """Console progress bar (tqdm) and TensorBoard event files; silent on processes other than 0."""

    def __init__(self, logdir: str | None, total_steps: int, initial_step: int = 0,
                 progress_bar: bool = True, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        if tensorboard and logdir:
            from tensorboardX import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self._tb = SummaryWriter(logdir)
            # tensorboardX warns "NaN or Inf found in input tensor." at every non-finite scalar: a
            # non-finite step is already reported once per step by the trainer's own line and counter
            logging.getLogger("tensorboardX.x2num").addFilter(_not_a_nan_warning)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        """Scalars to TensorBoard (``prefix/name``) and a one-line summary on the console."""
        if not self.enabled:
            return
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{prefix}/{k}", float(v), step)
            self._tb.flush()
        line = f"{prefix} step {step}: " + " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        self.message(line)

    def message(self, text: str) -> None:
        """One line for the console: above the progress bar, or (without one) an INFO log record
        of this module's logger (the CLI shows INFO; a library caller decides with ``logging``)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            logger.info("%s", text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt(v: float) -> str:
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.3e}"
    return f"{v:.4f}"


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, strict JSON (a NaN loss is ``null``).

    One training row per step: a resumed run first calls :meth:`restart_at` with the step it
    restored, which drops the rows of the steps after it (the interrupted run's steps that are
    about to be redone), so every step appears once. Evaluation rows (``{"step", "eval_loss"}``)
    are separate lines. Written by process 0 only.
    """

    def __init__(self, path: str, enabled: bool | None = None):
        self.path = path
        self.enabled = jax.process_index() == 0 if enabled is None else enabled

    def restart_at(self, step: int) -> int:
        """Keep only rows with ``step <= step`` (an atomic rewrite); returns how many were dropped.

        Lines that are not JSON (the last line of a killed run, cut mid-write) are dropped too.
        """
        if not self.enabled or not os.path.exists(self.path):
            return 0
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        keep, dropped, broken = [], 0, 0
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)  # also reads the bare NaN of files written before null
            except ValueError:
                broken += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] > step:
                dropped += 1
                continue
            keep.append(json.dumps(json_safe(row), allow_nan=False))
        if not dropped and not broken and len(keep) == len(lines):
            return 0
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in keep))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if dropped or broken:
            logger.info("%s: dropped %d row(s) after step %d (redone now)%s", self.path, dropped, step,
                        f" and {broken} unreadable line(s)" if broken else "")
        return dropped

    def append(self, row: Mapping[str, Any]) -> None:
        """Append one row (a JSON object; non-finite values written as null)."""
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(dict(row)), allow_nan=False) + "\n")
