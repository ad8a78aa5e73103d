"""A ``CheckpointManager``'s arguments, checked before anything is created, and its loop-argument checks.

Every argument is checked (in the order a user reads them) before the manager joins a
process group or opens a ledger: bad input raises :class:`BadInputError` with one line
naming the argument, and changes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from ledger import RetentionPolicy
from ledger.run_address import parse_run_address
from ledger.time_retention import parse_duration
from trainer.dcp_codec import CHECKPOINT_CODECS
from trainer.errors import BadInputError


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointSettings:
    """What a :class:`~trainer.CheckpointManager` was asked for, checked and normalised (see its docstring)."""

    run_dir: str
    """The run: a directory or a ``postgresql://`` address (no password)."""
    save_every: int | None
    save_every_seconds: float | None
    """Seconds (``"6h"`` and the like already parsed)."""
    retention: RetentionPolicy
    best_metric: str
    best_mode: str
    async_save: bool
    codec: str
    blobs: str | None
    """Where shard blobs go: ``None`` (the run directory), an absolute local directory or a credential-free URL."""
    resume: str | None
    pretrained: str | None
    config: dict[str, Any]
    log_every: int
    stack: str | None
    topology: dict[str, int] | None

    @classmethod
    def checked(cls, run_dir: str, *, save_every: int | None, save_every_seconds: float | str | None,
                keep_last: int | None, keep_every: int | None, keep_best: int | None,
                keep_every_seconds: float | str | None, keep_for: float | str | None, keep_without_metric: bool,
                best_metric: str, best_mode: str, async_save: bool, codec: str, blobs: str | None,
                resume: str | None, pretrained: str | None, config: Mapping[str, Any] | None, log_every: int,
                stack: str | None, topology: Mapping[str, int] | None) -> CheckpointSettings:
        """The settings, or :class:`BadInputError` naming the first bad argument."""
        run_dir = str(run_dir) if run_dir is not None else ""
        if not run_dir:
            raise BadInputError("run_dir must be a non-empty path")
        try:
            parse_run_address(run_dir)  # a postgresql:// run must be well-formed and carry no password
        except ValueError as err:
            raise BadInputError(str(err)) from None
        _positive("save_every", save_every, integer=True)
        if save_every_seconds is not None:
            try:
                save_every_seconds = parse_duration(save_every_seconds, name="save_every_seconds")
            except ValueError as err:
                raise BadInputError(str(err)) from None
        _positive("log_every", log_every, integer=True)
        if best_mode not in ("min", "max"):
            raise BadInputError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if not isinstance(best_metric, str) or not best_metric:
            raise BadInputError("best_metric must be a non-empty metric name")
        if codec not in CHECKPOINT_CODECS:
            raise BadInputError(f"codec must be one of {', '.join(CHECKPOINT_CODECS)}, got {codec!r}")
        if not isinstance(async_save, bool):
            raise BadInputError(f"async_save must be True or False, got {async_save!r}")
        if resume is not None and (not isinstance(resume, str) or not resume.strip()):
            raise BadInputError("resume must be a checkpoint id, 'latest' or 'best'")
        if pretrained is not None and (not isinstance(pretrained, str) or not pretrained):
            raise BadInputError("pretrained must be a path to a torch state-dict file")
        try:
            retention = RetentionPolicy(keep_last=keep_last, keep_every=keep_every, keep_best=keep_best,
                                        keep_every_seconds=keep_every_seconds, keep_for=keep_for,
                                        keep_without_metric=keep_without_metric)
        except ValueError as err:
            raise BadInputError(str(err).split("\n")[0]) from None
        return cls(
            run_dir=run_dir, save_every=save_every, save_every_seconds=save_every_seconds, retention=retention,
            best_metric=best_metric, best_mode=best_mode, async_save=async_save, codec=codec,
            blobs=blob_location(run_dir, blobs), resume=resume, pretrained=pretrained, config=dict(config or {}),
            log_every=log_every, stack=stack, topology=dict(topology) if topology is not None else None,
        )


def blob_location(run_dir: str, blobs: str | None) -> str | None:
    """Where shard blobs go: ``None`` (the run directory), a local directory (made absolute, so
    read commands find it from anywhere) or an fsspec URL without credentials."""
    if blobs is None or str(blobs) == run_dir:
        return None
    text = os.fspath(blobs)
    if "://" not in text:
        if "://" not in run_dir and os.path.abspath(text) == os.path.abspath(run_dir):
            return None  # the run directory itself, however it was spelled
        return os.path.abspath(text)
    from ledger.blobs_remote import check_blob_url

    try:
        return check_blob_url(text)
    except ValueError as err:
        raise BadInputError(str(err)) from None


def _positive(name: str, value: object, *, integer: bool) -> None:
    if value is None:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise BadInputError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")


# -- the loop's arguments -----------------------------------------------------------------------

def check_step(what: str, step: object, *, floor: int) -> int:
    """``step`` for ``what()``: an integer >= 1 that does not go below ``floor``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise BadInputError(f"{what}(step={step!r}): step must be an integer >= 1")
    if step < floor:
        raise BadInputError(f"{what}(step={step}): steps must not go backwards (already at step {floor}); "
                            "pass the loop's current step")
    return step


def check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metric values as floats (a tensor's ``float()`` included), or one line naming the one that is not a number."""
    values = {}
    for name, value in metrics.items():
        try:
            values[name] = float(value)
        except (TypeError, ValueError):
            raise BadInputError(f"metric {name!r}={value!r} is not a number; pass floats "
                                "(e.g. float(loss))") from None
    return values
