"""Typed settings of a training run. Plain frozen dataclasses; gin binds them only at the CLI edge.

``register_gin()`` (called by ``pythia_jax.gin_setup.register_configurables``) makes every class here
configurable under its own name, e.g. ``TrainConfig.num_steps = 100``, ``OptimizerConfig.max_lr = 6e-4``,
``MeshConfig.fsdp = 8``. The sub-configs are built separately by ``build_train_config()``; binding
``TrainConfig.optimizer`` etc. directly is refused (bind the sub-config's fields instead).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from typing import Any, Mapping

from pythia_jax.config import ConfigError, ModelConfig, check_field_types, check_seed
from pythia_jax.io_utils import is_url
from pythia_jax.mesh_config import MeshConfig  # re-exported: train.config.MeshConfig


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The Pythia AdamW recipe (Pythia paper, appendix E). ``min_lr`` None → 0.1·max_lr;
    ``warmup_steps`` None → ``warmup · decay_steps``, unrounded as in GPT-NeoX (1430 for 143,000
    steps, 0.2 for 20); ``decay_steps`` None → the run's ``num_steps``; ``decay_style``: GPT-NeoX's
    ``lr_decay_style`` (cosine, linear, exponential, constant; ``train/optimizer.py``)."""
    max_lr: float = 1.0e-3
    min_lr: float | None = None
    warmup_steps: float | None = None
    decay_steps: int | None = None
    warmup: float = 0.01  # GPT-NeoX's `warmup`: the fraction of decay_steps spent warming up
    decay_style: str = "cosine"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    # fp16-style dynamic loss scaling (DeepSpeed DynamicLossScaler as in Pythia's configs).
    loss_scaling: bool = False
    initial_scale_power: int = 12
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    # GPT-NeoX tensor-parallel size of the run being reproduced or continued: with the parallel
    # residual each rank adds its own copy of the row-parallel biases, so their sum moves this many
    # Adam steps per step (train/optimizer.py). Pythia-6.9b: 2, Pythia-12b: 4, the others: 1.
    row_parallel_bias_copies: int = 1

    def __post_init__(self) -> None:
        check_field_types(self)
        for name, ok, allowed in (
                ("b1", 0 <= self.b1 < 1, "in [0, 1)"), ("b2", 0 <= self.b2 < 1, "in [0, 1)"),
                ("eps", self.eps >= 0, ">= 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
                ("clip_norm", self.clip_norm >= 0, ">= 0 (0: no clipping)"),
                ("warmup", 0 <= self.warmup <= 1, "in [0, 1] (a fraction of decay_steps)"),
                ("decay_steps", self.decay_steps is None or self.decay_steps > 0, "> 0 or None"),
                ("loss_scale_window", self.loss_scale_window >= 1, ">= 1"),
                ("hysteresis", self.hysteresis >= 1, ">= 1"),
                ("min_loss_scale", self.min_loss_scale > 0, "> 0")):
            if not ok:
                raise ConfigError(f"OptimizerConfig.{name} must be {allowed}, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training and evaluation rows come from (``pythia_jax.data.pipeline``).

    prefix: indexed dataset prefix (``prefix.bin``/``prefix.idx``, local or URL); "demo" = the
      bundled Wikipedia training set.
    order: "neox" (GPT-NeoX GPT2Dataset order of the raw documents at ``prefix``, seed ``seed``) or
      "preshuffled" (rows already in training order, one seq+1-token item each).
    eval_prefix: a separate held-out dataset read in file order ("demo" = the bundled held-out
      Wikipedia set); None → held-out rows of the training order after the training range.
    cache_dir: directory for GPT-NeoX index-map caches (None → next to the dataset).
    transform: a row transform applied to the training rows (``pythia_jax.data.transforms``: e.g.
      "gender_swap", "gender_swap_tokenmap_2022", "gender_swap_text_2023", or
      "package.module:function"), with ``transform_params`` (a dict, e.g. {"direction": "f2m"}),
      only in the steps ``transform_steps = (start, stop)`` (None: every step). Rows outside the
      window are untouched; the transform is recorded in every checkpoint and a resume with
      another one is refused.
    """
    prefix: str = "demo"
    order: str = "neox"
    seed: int = 1234
    eval_prefix: str | None = None
    cache_dir: str | None = None
    num_threads: int = 2
    prefetch: int = 2
    transform: str | None = None
    transform_params: Any = None
    transform_steps: tuple | None = None

    def __post_init__(self) -> None:
        # a dict from gin is kept as sorted (key, value) pairs, so the config stays hashable
        if isinstance(self.transform_params, Mapping):
            object.__setattr__(self, "transform_params", tuple(sorted(self.transform_params.items())))
        if isinstance(self.transform_steps, list):
            object.__setattr__(self, "transform_steps", tuple(self.transform_steps))
        check_field_types(self)
        check_seed("DataConfig.seed", self.seed)
        if self.order not in ("neox", "preshuffled"):
            raise ConfigError(f"DataConfig.order must be 'neox' or 'preshuffled', got {self.order!r}")
        for name in ("num_threads", "prefetch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"DataConfig.{name} must be >= 0, got {getattr(self, name)}")

    def transform_spec(self):
        """The ``TransformSpec`` of ``transform`` (None without one); ConfigError if malformed."""
        from pythia_jax.data.transforms import TransformSpec

        if not self.transform:
            if self.transform_params or self.transform_steps is not None:
                raise ConfigError("DataConfig.transform_params / transform_steps are set but "
                                  "DataConfig.transform is not")
            return None
        params = self.transform_params or ()
        try:
            params = dict(params)
        except (TypeError, ValueError):
            raise ConfigError(f"DataConfig.transform_params must be a dict, got {self.transform_params!r}") from None
        return TransformSpec.create(self.transform, params, self.transform_steps)

    def resolved_prefix(self) -> str:
        from pythia_jax.data import demo_data_prefix

        return demo_data_prefix() if self.prefix == "demo" else self.prefix

    def resolved_eval_prefix(self) -> str | None:
        from pythia_jax.data import demo_eval_prefix

        return demo_eval_prefix() if self.eval_prefix == "demo" else self.eval_prefix


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """``jax.distributed.initialize`` settings. On TPU VMs leave all None (auto-detected)."""
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple | None = None
    initialize: str = "auto"  # "auto": when multi-process settings are given or on a TPU VM; "yes"; "no"

    def __post_init__(self) -> None:
        check_field_types(self)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Step n consumes global rows [batch·n, batch·(n+1)) whatever the mesh."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    output_dir: str = "runs/train"
    num_steps: int = 143000
    global_batch: int = 1024
    seq_length: int = 2048
    micro_batches: int = 1  # gradient accumulation: the global batch is split into this many parts
    seed: int = 1234  # parameter init

    # Checkpoints (Pythia's schedule): step 0, the powers of two up to `checkpoint_log_until`, then
    # every `checkpoint_every` steps, plus `checkpoint_extra_steps`; the last step is always saved.
    # checkpoint_every=0 and checkpoint_log_until=-1 turn those parts off.
    checkpoint_every: int = 1000
    checkpoint_log_until: int = 512
    checkpoint_extra_steps: tuple = ()
    keep_checkpoints: int | None = None  # None: keep all (Pythia releases every one)
    async_checkpointing: bool = True
    # Start from other weights instead of a random init: an HF directory (or an HF ``step<N>/``
    # revision folder), a checkpoint directory of this project, or a GPT-NeoX checkpoint
    # (``global_stepN/``, with its ZeRO optimizer states when present). With ``start_step = S``
    # the run branches at step S: it reads step S's rows next, the LR schedule is at step S, and
    # its checkpoints are numbered from S. Adam moments come from the source when it has them (a
    # checkpoint of this project, a GPT-NeoX ZeRO checkpoint), else start at zero (logged, and
    # recorded in the checkpoints' run configuration).
    init_from: str | None = None
    start_step: int = 0
    # Resuming with another num_steps or optimizer setting than the checkpoint's is refused
    # unless this is True (train/loop.py check_resume; a changed data order or model never is).
    allow_schedule_change: bool = False

    log_every: int = 10
    eval_every: int = 1000  # 0: never
    eval_batches: int = 4
    max_nonfinite_steps: int = 10  # N non-finite losses in a row → checkpoint and stop
    tensorboard: bool = True
    progress_bar: bool = True
    peak_flops_per_device: float | None = None  # None: from the device table (metrics.py)

    # After the last step, write an HF directory here: a relative path is inside output_dir
    # ("hf" -> <output_dir>/hf), an absolute path / URL is used as it is (``export_hf_dir``).
    # It may not be output_dir, a folder above it, or one of the run's own entries (checkpoints/ …).
    export_hf: str | None = None
    export_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def export_hf_dir(self) -> str | None:
        """Where the HF export goes: ``export_hf`` joined to ``output_dir`` when relative (to the
        local mirror folder of a ``gs://`` run, where its logs go), else ``export_hf`` itself."""
        if not self.export_hf:
            return None
        path = os.path.expanduser(str(self.export_hf))
        if is_url(path):
            return path
        # normalised: "missing/../hf" names hf, which a check of the unnormalised path (the OS cannot
        # resolve ".." under a folder that does not exist) would not have found
        if os.path.isabs(path):
            return os.path.normpath(path)
        if is_url(self.output_dir):  # logs and exports of a gs:// run go to its local mirror
            from pythia_jax.train.paths import local_output_dir

            return os.path.normpath(os.path.join(local_output_dir(self.output_dir), path))
        return os.path.normpath(os.path.join(self.output_dir, path))

    @property
    def warmup_steps(self) -> float:
        """GPT-NeoX's ``warmup_iter = warmup · lr_decay_iters``, a float (not rounded)."""
        w = self.optimizer.warmup_steps
        return self.optimizer.warmup * self.decay_steps if w is None else float(w)

    @property
    def decay_steps(self) -> int:
        d = self.optimizer.decay_steps
        return self.num_steps if d is None else int(d)

    @property
    def min_lr(self) -> float:
        m = self.optimizer.min_lr
        return 0.1 * self.optimizer.max_lr if m is None else float(m)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_length

    def validate(self) -> None:
        """Checks that need no devices (mesh/batch divisibility is checked in ``sharding``)."""
        check_field_types(self)  # types first: the checks below compare and compute with the values
        check_seed("TrainConfig.seed", self.seed)
        for name in ("num_steps", "global_batch", "seq_length", "micro_batches", "log_every", "eval_batches"):
            v = getattr(self, name)
            if v <= 0:
                raise ConfigError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        for name, low in (("start_step", 0), ("eval_every", 0), ("checkpoint_log_until", -1)):
            if getattr(self, name) < low:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError(f"TrainConfig.keep_checkpoints must be >= 1 or None (keep all), got "
                              f"{self.keep_checkpoints!r}")
        if self.start_step and not self.init_from:
            raise ConfigError(f"TrainConfig.start_step = {self.start_step} needs TrainConfig.init_from "
                              "(the run to branch from)")
        if self.start_step >= self.num_steps:
            raise ConfigError(f"TrainConfig.start_step {self.start_step} must be below num_steps "
                              f"{self.num_steps}")
        spec = self.data.transform_spec()
        if spec is not None:
            spec.check_within(self.num_steps)
            spec.build()  # an unknown name or bad parameters fail here, before any work
        if self.global_batch % self.micro_batches:
            raise ConfigError(f"TrainConfig.global_batch {self.global_batch} is not divisible by "
                              f"micro_batches {self.micro_batches}")
        if self.seq_length > self.model.max_position_embeddings:
            raise ConfigError(f"seq_length {self.seq_length} exceeds the model's max_position_embeddings "
                              f"{self.model.max_position_embeddings}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"TrainConfig.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.optimizer.max_lr < 0 or self.min_lr > self.optimizer.max_lr:
            raise ConfigError(f"need 0 <= min_lr <= max_lr, got min_lr {self.min_lr}, "
                              f"max_lr {self.optimizer.max_lr}")
        from pythia_jax.train.optimizer import DECAY_STYLES
        if self.optimizer.decay_style not in DECAY_STYLES:
            raise ConfigError(f"OptimizerConfig.decay_style must be one of {DECAY_STYLES}, got "
                              f"{self.optimizer.decay_style!r}")
        if not 0 <= self.warmup_steps <= self.decay_steps:
            raise ConfigError(f"warmup_steps {self.warmup_steps} must be in [0, decay_steps "
                              f"{self.decay_steps}]")
        copies = self.optimizer.row_parallel_bias_copies
        if copies < 1:
            raise ConfigError(f"OptimizerConfig.row_parallel_bias_copies must be >= 1, got {copies}")
        if copies > 1 and not self.model.use_parallel_residual:
            raise ConfigError("OptimizerConfig.row_parallel_bias_copies > 1 only applies to the parallel "
                              "residual (with a sequential residual GPT-NeoX adds the bias once, after "
                              "the all-reduce)")
        if self.max_nonfinite_steps <= 0:
            raise ConfigError("TrainConfig.max_nonfinite_steps must be positive")
        if self.distributed.initialize not in ("auto", "yes", "no"):
            raise ConfigError("DistributedConfig.initialize must be 'auto', 'yes' or 'no'")
        for a in ("slices", "data", "fsdp", "tensor"):
            v = getattr(self.mesh, a)
            if not isinstance(v, int) or (v <= 0 and v != -1):
                raise ConfigError(f"MeshConfig.{a} must be a positive integer or -1, got {v!r}")
        self._validate_export()

    def _validate_export(self) -> None:
        """Refuse an ``export_hf`` that would replace the run: ``output_dir`` itself, a folder above
        it, or one of the run's own entries (checkpoints/, tensorboard/, index_maps/,
        metrics.jsonl) or a folder inside them. Symlinks of local paths are resolved."""
        export = self.export_hf_dir
        if export is None:
            return
        if not isinstance(self.export_hf, str):
            raise ConfigError(f"TrainConfig.export_hf must be a path string or None, got {self.export_hf!r}")

        def norm(path: str) -> str:
            if is_url(path):
                scheme, rest = path.split("://", 1)
                return scheme + "://" + posixpath.normpath("/" + rest).lstrip("/")
            return os.path.realpath(os.path.expanduser(path))

        out, exp = norm(self.output_dir), norm(export)

        def inside(a: str, b: str) -> bool:  # a == b or a below b
            return a == b or a.startswith(b.rstrip("/") + "/")

        fix = (f"use a new folder, e.g. TrainConfig.export_hf = \"hf\" (that is {self.output_dir}/hf), "
               "or an absolute path outside the run")
        if inside(out, exp):
            raise ConfigError(f"TrainConfig.export_hf {export!r} is {'' if out == exp else 'above '}the "
                              f"run's output_dir {self.output_dir!r}: the export would replace the run "
                              f"(checkpoints, metrics); {fix}")
        from pythia_jax.train.paths import RUN_ENTRIES

        for entry in RUN_ENTRIES:
            own = norm(posixpath.join(self.output_dir, entry) if is_url(self.output_dir)
                       else os.path.join(self.output_dir, entry))
            if inside(exp, own):
                raise ConfigError(f"TrainConfig.export_hf {export!r} is inside the run's {entry} "
                                  f"({own}); {fix}")

    def checkpoint_schedule(self):
        """The ``pythia_jax.checkpoint.CheckpointSchedule`` of this run (the last step added)."""
        from pythia_jax.checkpoint.schedule import CheckpointSchedule

        return CheckpointSchedule(max_step=self.num_steps, log_until=self.checkpoint_log_until,
                                  every=self.checkpoint_every,
                                  extra_steps=tuple(int(s) for s in self.checkpoint_extra_steps) + (self.num_steps,))


_SECTIONS = ("model", "optimizer", "mesh", "data", "distributed")


def register_gin() -> None:
    """Make the classes above gin-configurable (module ``pythia_jax``)."""
    import gin

    for cls in (MeshConfig, OptimizerConfig, DataConfig, DistributedConfig):
        gin.external_configurable(cls, module="pythia_jax")
    gin.external_configurable(TrainConfig, module="pythia_jax", denylist=list(_SECTIONS))


def build_train_config(**overrides) -> TrainConfig:
    """A ``TrainConfig`` from the parsed gin bindings (call ``gin_setup.parse`` first).

    Every section is built from its own configurable; ``overrides`` replace top-level fields.
    """
    import gin

    def configured(cls):
        return gin.get_configurable(f"pythia_jax.{cls.__name__}")()

    sections = {name: configured(cls) for name, cls in
                (("model", ModelConfig), ("optimizer", OptimizerConfig), ("mesh", MeshConfig),
                 ("data", DataConfig), ("distributed", DistributedConfig))}
    sections.update(overrides)
    return gin.get_configurable("pythia_jax.TrainConfig")(**sections)


def pythia_recipe(model_name: str, **overrides) -> TrainConfig:
    """The released Pythia recipe for a preset (batch 1024 × 2048, 143,000 steps, its LR), in Python."""
    from pythia_jax.config import PRESET_MAX_LR, PRESET_TENSOR_PARALLEL, parse_preset_name

    base = parse_preset_name(model_name).base  # ConfigError for an unknown name
    model = ModelConfig.preset(model_name)
    opt = OptimizerConfig(max_lr=PRESET_MAX_LR[base], loss_scaling=base != "pythia-1b",
                          row_parallel_bias_copies=PRESET_TENSOR_PARALLEL.get(base, 1))
    fields = dict(model=model, optimizer=opt, num_steps=143000, global_batch=1024, seq_length=2048)
    fields.update(overrides)
    return TrainConfig(**fields)
