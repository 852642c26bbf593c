"""Multi-process start-up: ``jax.distributed.initialize`` when the job has several processes."""

from __future__ import annotations

import glob
import os

import jax

from pythia_jax.train.config import DistributedConfig


def maybe_initialize_distributed(cfg: DistributedConfig) -> None:
    """``jax.distributed.initialize`` for multi-process runs (before any device is touched).

    "auto": initialise when a coordinator/process count is configured or a TPU VM is
    detected (its accelerator device files; TPU VMs fill in everything themselves, one host
    too); "yes": always; "no": never. CPU multi-process (tests) uses gloo collectives.
    """
    if cfg.initialize == "no" or jax.distributed.is_initialized():
        return
    explicit = cfg.coordinator_address is not None or (cfg.num_processes or 1) > 1
    if cfg.initialize == "auto" and not (explicit or on_tpu_vm()):
        return
    if "cpu" in os.environ.get("JAX_PLATFORMS", "") and explicit:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in dict(coordinator_address=cfg.coordinator_address,
                                    num_processes=cfg.num_processes, process_id=cfg.process_id,
                                    local_device_ids=list(cfg.local_device_ids) if cfg.local_device_ids else None
                                    ).items() if v is not None}
    jax.distributed.initialize(**kwargs)


def on_tpu_vm() -> bool:
    """True on a Cloud TPU VM (single host or pod worker), checked without touching JAX's backends.

    GCE TPU VMs do not always export ``TPU_WORKER_HOSTNAMES`` (JAX reads the pod layout from the
    metadata server), so the TPU device files are checked too: ``/dev/accel*`` (v2–v4) and
    ``/dev/vfio/<n>`` (v5e, v5p, v6e). ``jax.distributed.initialize()`` then finds the other hosts.
    """
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
