"""``TrainerConfig``: everything one training run is configured by, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ledger.run_address import parse_run_address

#: Config fields that say *how* this process runs, not *what* experiment it is. They are
#: left out of the canonical config (and so of the config hash) recorded in ``run.started``.
OPERATIONAL_FIELDS = frozenset({"run_dir", "resume", "print_every", "dist_timeout_s", "async_checkpoint",
                                "checkpoint_codec", "blobs"})


@dataclass(kw_only=True, slots=True)
class TrainerConfig:
    """Configuration of one training run (one run directory, any number of attempts)."""

    run_dir: str
    """Run directory: holds ``ledger.db`` and the shard blobs. Created if missing. Or a run in a PostgreSQL
    database, ``postgresql://USER@HOST:PORT/DB?run=NAME`` (password only via PGPASSWORD/~/.pgpass/PGSERVICE)."""

    stack: str = "ddp"
    """Parallelism stack, a name in :func:`trainer.stacks.available_stacks` (``ddp``, ``fsdp``)."""

    tp: int = 1
    """Tensor-parallel degree (only stacks that declare tensor parallelism accept > 1)."""

    pp: int = 1
    """Pipeline-parallel degree (only stacks that declare pipeline parallelism accept > 1)."""

    pp_schedule: str = "1F1B"
    """Pipeline schedule of pipeline-parallel stacks: ``1F1B`` or ``GPipe``."""

    pp_microbatches: int | None = None
    """Microbatches per step of pipeline-parallel stacks (``None``: one per pipeline stage)."""

    steps: int = 300
    """The run's total step target. A resumed attempt continues until the run reaches it."""

    ckpt_every: int = 50
    """Commit a checkpoint every this many steps (and always at the final step)."""

    eval_every: int = 50
    """Record ``eval_loss`` every this many steps; 0 disables evaluation."""

    log_every: int = 10
    """Append the buffered ``step.completed`` events every this many steps."""

    print_every: int = 50
    """Rank 0 prints step, loss and steps/s every this many steps; 0 disables."""

    async_checkpoint: bool = True
    """Write periodic checkpoints in the background: the training thread only copies the state
    into reused host buffers and goes on; the final and the preemption checkpoints are always
    synchronous. ``False``: every checkpoint blocks training until it is committed."""

    checkpoint_codec: str = "none"
    """How checkpoint files store each item: ``none``, ``zstd`` or ``zstd-bg`` (byte-grouped zstd,
    smaller for float weights, slower to write). Any attempt reads checkpoints of every codec."""

    blobs: str | None = None
    """Where shard blobs go: ``None`` for the run directory, a local directory, or an fsspec URL such
    as ``s3://bucket/prefix`` (``ckpt-ledger[s3]``). Endpoint and credentials come from the
    environment/config (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws``), never the URL.
    Recorded in ``run.started``; a resumed run uses the recorded place (giving another is an error)."""

    ckpt_every_seconds: float | None = None
    """Also commit a checkpoint once this many wall-clock seconds passed since the last one (decided on
    rank 0, the same step on every rank); ``None``: by steps only. Text durations work: ``30m``."""

    keep_last: int | None = None
    """Retention: keep the K highest-step committed checkpoints (``None``: no such rule)."""

    keep_every: int | None = None
    """Retention: keep checkpoints whose step is a multiple of N (``None``: no such rule)."""

    keep_best: int | None = None
    """Retention: keep the K best checkpoints by ``best_metric`` (``None``: no such rule)."""

    keep_every_seconds: float | None = None
    """Retention: keep the first checkpoint committed in each window of this many seconds (``None``: no such rule)."""

    keep_for: float | None = None
    """Retention: keep every checkpoint committed less than this many seconds ago (``None``: no such rule)."""

    keep_without_metric: bool = False
    """Retention: with ``keep_best``, also keep checkpoints without a ``best_metric`` value."""

    best_metric: str = "eval_loss"
    """Metric that ranks checkpoints for the ``best`` alias."""

    best_mode: str = "min"
    """Whether a lower (``min``) or higher (``max``) ``best_metric`` is better."""

    resume: str | None = None
    """Explicit source: a checkpoint id, ``latest`` or ``best``. Missing or invalid is an error."""

    pretrained: str | None = None
    """Model-only initialisation from a plain torch state-dict file, used when nothing is resumed."""

    seed: int = 0
    """Seed of every random number generator (model init, data, dropout)."""

    lr: float = 3e-3
    """Peak learning rate of AdamW."""

    weight_decay: float = 0.01
    """AdamW weight decay."""

    warmup_steps: int = 20
    """Linear warm-up steps before the cosine decay to 10% of ``lr`` at ``steps``."""

    dist_timeout_s: float = 120.0
    """Timeout of every collective: a lost peer fails the attempt instead of hanging it."""

    job: dict[str, Any] = field(default_factory=dict)
    """Free-form description of the model and data (recorded as part of the experiment identity)."""

    def __post_init__(self) -> None:
        # Imported here: the registry imports torch, the config must stay cheap to build.
        from trainer.stacks import PLANNED_STACKS, available_stacks, get_stack

        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ValueError("run_dir must be a non-empty path")
        parse_run_address(self.run_dir)  # a postgresql:// run must be well-formed and carry no password
        if self.stack in PLANNED_STACKS:
            raise ValueError(f"stack {self.stack!r} is not implemented yet: {PLANNED_STACKS[self.stack]}")
        if self.stack not in available_stacks():
            raise ValueError(f"stack must be one of {', '.join(available_stacks())}, got {self.stack!r}")
        for name in ("tp", "pp", "steps", "ckpt_every", "log_every", "warmup_steps"):
            _require_int(name, getattr(self, name), minimum=0 if name == "warmup_steps" else 1)
        # The stack's tp/pp limits and its own options (pp_schedule, pp_microbatches).
        get_stack(self.stack, self).topology(self.tp * self.pp, tp=self.tp, pp=self.pp)
        for name in ("eval_every", "print_every"):
            _require_int(name, getattr(self, name), minimum=0)
        for name in ("keep_last", "keep_best"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name), minimum=0)
        if self.keep_every is not None:
            _require_int("keep_every", self.keep_every, minimum=1)
        from ledger import RetentionPolicy
        from ledger.time_retention import parse_duration

        if self.ckpt_every_seconds is not None:
            self.ckpt_every_seconds = parse_duration(self.ckpt_every_seconds, name="ckpt_every_seconds")
        policy = RetentionPolicy(keep_every_seconds=self.keep_every_seconds, keep_for=self.keep_for,
                                 keep_without_metric=self.keep_without_metric)
        self.keep_every_seconds, self.keep_for = policy.keep_every_seconds, policy.keep_for
        if not isinstance(self.async_checkpoint, bool):
            raise ValueError(f"async_checkpoint must be True or False, got {self.async_checkpoint!r}")
        from trainer.dcp_codec import CHECKPOINT_CODECS

        if self.checkpoint_codec not in CHECKPOINT_CODECS:
            raise ValueError(f"checkpoint_codec must be one of {', '.join(CHECKPOINT_CODECS)}, "
                             f"got {self.checkpoint_codec!r}")
        if self.blobs is not None:
            if not isinstance(self.blobs, str) or not self.blobs:
                raise ValueError("blobs must be a directory or a URL such as s3://bucket/prefix")
            if "://" in self.blobs:
                from ledger.blobs_remote import check_blob_url

                check_blob_url(self.blobs)
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if not self.best_metric:
            raise ValueError("best_metric must be a non-empty metric name")
        if self.resume is not None and (not isinstance(self.resume, str) or not self.resume.strip()):
            raise ValueError("resume must be a checkpoint id, 'latest' or 'best'")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            raise ValueError("pretrained must be a path to a torch state-dict file")
        _require_int("seed", self.seed, minimum=0)
        if self.seed >= 2**32:
            raise ValueError(f"seed must be below 2**32 (numpy's limit), got {self.seed}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.dist_timeout_s, (int, float)) and self.dist_timeout_s > 0):
            raise ValueError(f"dist_timeout_s must be a positive number of seconds, got {self.dist_timeout_s!r}")
        if not isinstance(self.job, dict):
            raise ValueError("job must be a dict describing the model and data")

    def canonical(self) -> dict[str, Any]:
        """The experiment-defining fields, as recorded in ``run.started`` and hashed."""
        return {k: v for k, v in asdict(self).items() if k not in OPERATIONAL_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """Every field (picklable, JSON-able): how the launcher hands the config to workers."""
        return asdict(self)


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
