"""``ckpt-ledger timeline``: one picture of a run — attempts, preemptions, crashes, checkpoints, loss."""

from __future__ import annotations

import html
import io
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import click

from cli.errors import EXIT_USAGE, CliError
from cli.inspect_cmd import last_event_times
from cli.options import open_read_only, run_dir_argument
from ledger import Ledger
from ledger.decisions import is_torn
from ledger.lineage import current_branch
from ledger.events import PreemptionSignalled, StepCompleted
from ledger.statuses import AttemptStatus, CheckpointStatus
from ledger.view import View

FORMATS = {".png": "png", ".svg": "svg", ".html": "html"}
MAX_POINTS = 4000  # per attempt on the loss curve; longer series are thinned evenly

ATTEMPT_COLOURS = {AttemptStatus.COMPLETED: "#2e7d32", AttemptStatus.PREEMPTED: "#ef6c00",
                   AttemptStatus.CRASHED: "#c62828", AttemptStatus.FAILED: "#8e0000", AttemptStatus.FENCED: "#6a1b9a",
                   AttemptStatus.RUNNING: "#1565c0"}
CHECKPOINT_COLOURS = {CheckpointStatus.COMMITTED: "#2e7d32", CheckpointStatus.IN_FLIGHT: "#9e9e9e",
                      CheckpointStatus.ABORTED: "#ef6c00", CheckpointStatus.DELETED: "#cfcfcf",
                      CheckpointStatus.CORRUPT: "#c62828", "torn": "#8d6e63"}  # torn: in flight, never to commit
#: Attempts drawn with a crash mark.
_FAILURES = (AttemptStatus.CRASHED, AttemptStatus.FAILED)


@dataclass
class Series:
    """What the log says beyond the projection: the loss curve and preemption points, per attempt."""

    metric: str | None = None
    loss: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    preemptions: list[tuple[int, int, str]] = field(default_factory=list)  # (epoch, step, signal)


def check_out(out: Path) -> str:
    """The output format for ``out``; refuses an unsupported extension or a place that cannot be written."""
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise CliError(f"--out {out}: unsupported extension {out.suffix or '(none)'!r}; use .png, .svg or .html",
                       EXIT_USAGE)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise CliError(f"--out {out} is a directory; give a file name ending in {out.suffix or '.png'}", EXIT_USAGE)
    if not parent.is_dir():
        raise CliError(f"--out {out}: directory {parent} does not exist; create it first", EXIT_USAGE)
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise CliError(f"--out {out} is not writable; choose another path", EXIT_USAGE)
    return fmt


def read_series(led: Ledger) -> Series:
    """Loss (or the first metric) per attempt from ``step.completed``, and preemption points."""
    series = Series()
    for stored in led.iter_events(tags=["step.completed", "preemption.signalled"]):
        event = stored.event
        if isinstance(event, PreemptionSignalled):
            series.preemptions.append((stored.epoch, event.step, event.signal))
        elif isinstance(event, StepCompleted) and event.metrics:
            if series.metric is None:
                series.metric = "loss" if "loss" in event.metrics else sorted(event.metrics)[0]
            if series.metric in event.metrics:
                series.loss.setdefault(stored.epoch, []).append((event.step, event.metrics[series.metric]))
    return series


def _thin(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = len(points) / MAX_POINTS
    return [points[int(i * stride)] for i in range(MAX_POINTS)] + [points[-1]]


def _status_label(attempt) -> str:  # noqa: ANN001 - AttemptState
    if attempt.status == AttemptStatus.FENCED and attempt.fenced_by:
        return f"fenced by epoch {attempt.fenced_by}"
    return attempt.status


def draw(view: View, series: Series, title: str, last_seen: dict[int, float] | None = None):  # noqa: ANN201 - Figure
    """The timeline figure (matplotlib's object-oriented API: no pyplot, no global state).

    Panels: attempts over steps with an arrow from the checkpoint each resumed from (the
    lineage; abandoned checkpoints faded), the loss with one colour per attempt, and the
    attempts on the wall clock, where overlaps (zombies) and gaps (queue time) show.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    attempts = view.attempts
    checkpoints = list(view.checkpoints.values())
    has_loss = any(series.loss.values())
    # "tight", not "constrained": the constraint solver's float results vary from run to run in the last
    # digits, which changes SVG clip-path ids; the same ledger must always render the same bytes.
    fig = Figure(figsize=(11, 8.5 if has_loss else 6.0), layout="tight")
    ratios = [1.2, 1, 0.7] if has_loss else [1.2, 0.7]
    grid = fig.add_gridspec(len(ratios), 1, height_ratios=ratios)
    axes = [fig.add_subplot(grid[0])]
    if has_loss:
        axes.append(fig.add_subplot(grid[1], sharex=axes[0]))
    clock_ax = fig.add_subplot(grid[-1])
    ax = axes[0]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    attempt_colour = {a.epoch: palette[i % len(palette)] for i, a in enumerate(attempts)}
    ax.set_title(title, fontsize=11, loc="left")
    rows = {a.epoch: i + 1 for i, a in enumerate(attempts)}
    for attempt in attempts:
        y = rows[attempt.epoch]
        end = attempt.last_step if attempt.last_step is not None else attempt.first_step
        ax.barh(y, max(end - attempt.first_step, 0.4), left=attempt.first_step, height=0.5,
                color=ATTEMPT_COLOURS.get(attempt.status, "#757575"), alpha=0.85)
        ax.text(end, y, f"  {_status_label(attempt)}", va="center", fontsize=8)
        if attempt.status in _FAILURES:
            ax.plot([end], [y], marker="X", color="#c62828", markersize=11, markeredgecolor="black", zorder=5)
    for epoch, step, _signal in series.preemptions:
        if epoch in rows:
            ax.plot([step], [rows[epoch]], marker="v", color="#ef6c00", markersize=11, markeredgecolor="black", zorder=5)
    ck_row = len(attempts) + 1.2
    shown = {c.checkpoint_id: "torn" if is_torn(view.state, c) else c.status for c in checkpoints}
    branch = current_branch(view.state)
    for ckpt in checkpoints:
        abandoned = branch is not None and ckpt.checkpoint_id not in branch
        ax.plot([ckpt.step], [ck_row], marker="|", markersize=18, mew=2.5, alpha=0.35 if abandoned else 1.0,
                color=CHECKPOINT_COLOURS.get(shown[ckpt.checkpoint_id], "#757575"))
    for attempt in attempts:  # lineage: each attempt starts from the checkpoint it resumed from
        source = view.checkpoints.get(attempt.resumed_from) if attempt.resumed_from else None
        if source is not None:
            arrow = ax.annotate("", xy=(attempt.first_step, rows[attempt.epoch] + 0.25), xytext=(source.step, ck_row),
                                arrowprops={"arrowstyle": "->", "color": attempt_colour[attempt.epoch], "lw": 1.2,
                                            "alpha": 0.8, "shrinkA": 6, "shrinkB": 2})
            arrow.arrow_patch.set_gid(f"lineage-e{attempt.epoch}-from-{source.checkpoint_id}")
    # latest just above the ticks, best above that: both stay readable when they are the same checkpoint.
    marks = []
    if view.latest is not None:
        marks.append(("latest", view.latest.step, 0.35, "s", "#1565c0"))
    if view.best is not None:
        marks.append((f"best {view.best.metric}={view.best.value:.4g}", view.best.step, 0.7, "*", "#f9a825"))
    for label, step, lift, marker, colour in marks:
        ax.plot([step], [ck_row + lift], marker=marker, color=colour, markersize=11, markeredgecolor="black", zorder=6)
        ax.annotate(label, (step, ck_row + lift), xytext=(7, -3), textcoords="offset points", fontsize=8)
    ax.set_yticks([*rows.values(), ck_row],
                  [*(f"attempt {a.epoch}" + (f"\njob {a.job_id}" if a.job_id else "") for a in attempts), "checkpoints"],
                  fontsize=8)
    ax.set_ylim(0.3, ck_row + 1.2)
    # Room on the right for the end-of-bar and best/latest labels, so they never run into the legend.
    right = max([c.step for c in checkpoints] + [a.last_step or a.first_step for a in attempts] + [1])
    ax.set_xlim(left=min(0, ax.get_xlim()[0]), right=right * 1.22 + 1)
    ax.grid(axis="x", alpha=0.3)
    legend = [Line2D([], [], color=c, lw=6, label=f"attempt {s}") for s, c in ATTEMPT_COLOURS.items()
              if any(a.status == s for a in attempts)]
    if any(a.resumed_from for a in attempts):
        legend.append(Line2D([], [], color="#555555", lw=1.2, label="resumed from (arrow)"))
    if branch is not None and any(c.checkpoint_id not in branch for c in checkpoints):
        legend.append(Line2D([], [], color="#2e7d32", alpha=0.35, marker="|", lw=0, markersize=12, mew=2.5,
                             label="abandoned branch"))
    legend += [Line2D([], [], color=c, marker="|", lw=0, markersize=12, mew=2.5, label=f"checkpoint {s}")
               for s, c in CHECKPOINT_COLOURS.items() if s in shown.values()]
    if series.preemptions:
        legend.append(Line2D([], [], color="#ef6c00", marker="v", lw=0, label="preemption"))
    if any(a.status in _FAILURES for a in attempts):
        legend.append(Line2D([], [], color="#c62828", marker="X", lw=0, label="crash"))
    if legend:
        ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if has_loss:
        lax = axes[1]
        for epoch, points in sorted(series.loss.items()):
            points = _thin(points)
            lax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2, label=f"attempt {epoch}",
                     color=attempt_colour.get(epoch, "#757575"))
        lax.set_ylabel(series.metric or "", fontsize=9)
        lax.grid(alpha=0.3)
        lax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1].set_xlabel("step")
    _draw_wall_clock(clock_ax, attempts, rows, attempt_colour, last_seen or {})
    return fig


def _draw_wall_clock(ax, attempts, rows, colours, last_seen: dict[int, float]) -> None:  # noqa: ANN001
    """Attempts on the wall clock (seconds from the first start): overlaps are zombies, gaps queue time."""
    ax.set_gid("wall-clock")
    if not attempts:
        return
    origin = min(a.started_at for a in attempts)
    for attempt in attempts:
        end = attempt.ended_at if attempt.ended_at is not None else last_seen.get(attempt.epoch, attempt.started_at)
        ax.barh(rows[attempt.epoch], max(end - attempt.started_at, 1e-3), left=attempt.started_at - origin, height=0.5,
                color=colours[attempt.epoch], alpha=0.85,
                hatch="//" if attempt.status == AttemptStatus.FENCED else None,
                edgecolor=ATTEMPT_COLOURS.get(attempt.status, "#757575"))
        ax.text(end - origin, rows[attempt.epoch], f"  {_status_label(attempt)}", va="center", fontsize=7)
    ax.set_xlim(left=0, right=ax.get_xlim()[1] * 1.15)  # room for the end labels
    ax.set_yticks(list(rows.values()), [f"attempt {a.epoch}" for a in attempts], fontsize=8)
    ax.set_xlabel("wall clock (s since the first attempt started)")
    ax.grid(axis="x", alpha=0.3)


def render(fig, fmt: str, title: str, summary: str) -> bytes:  # noqa: ANN001 - a matplotlib Figure
    """The file's bytes: PNG, SVG, or an HTML page that embeds the SVG (no external resources)."""
    from matplotlib import rc_context

    buf = io.BytesIO()
    if fmt == "png":
        fig.savefig(buf, format="png", dpi=110)
        return buf.getvalue()
    # No date and a fixed id salt: the same ledger always renders the same SVG.
    with rc_context({"svg.hashsalt": "ckpt-ledger"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue().decode()
    if fmt == "svg":
        return svg.encode()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline SVG needs neither
    page = (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
            "<style>body{font-family:system-ui,sans-serif;margin:2em;color:#222}svg{max-width:100%;height:auto}</style>\n"
            f"</head>\n<body>\n<h1>{html.escape(title)}</h1>\n<p>{html.escape(summary)}</p>\n{svg}\n</body>\n</html>\n")
    return page.encode()


def write_atomically(out: Path, data: bytes) -> None:
    """Write ``out`` via a temp file in the same directory and a rename: readers never see half a file."""
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CliError(f"could not write --out {out}: {err.strerror or err}; choose another path", EXIT_USAGE) from err


@click.command("timeline")
@run_dir_argument
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Where to write the picture: .png, .svg, or .html (a self-contained page).")
def timeline_command(run_dir: Path, out: Path) -> None:
    """Draw a run as one picture: attempts as bars over steps, preemptions and crashes marked,
    checkpoints as ticks coloured by status, best and latest marked, and the loss curve.

    \b
    Examples:
      ckpt-ledger timeline runs/exp1 --out exp1.png
      ckpt-ledger timeline runs/exp1 --out report/exp1.html
    """
    fmt = check_out(out)
    try:
        import matplotlib  # noqa: F401 - only to give a clear message when the plot extra is missing
    except ImportError:
        raise CliError("timeline needs matplotlib: pip install 'ckpt-ledger[plot]'", EXIT_USAGE) from None
    with open_read_only(run_dir) as led:
        view = led.projection()
        series = read_series(led)
        last_seen = last_event_times(led, view)
    run_id = view.run.run_id if view.run else run_dir.name
    title = f"run {run_id} — {len(view.attempts)} attempt(s), goodput {view.goodput:.1%}"
    best = view.best
    summary = (f"as of event {view.seq}; resume {view.resume.checkpoint_id if view.resume else '-'}; "
               f"latest {view.latest.checkpoint_id if view.latest else '-'}; "
               f"best {best.checkpoint_id + f' ({best.metric}={best.value:.4g})' if best else '-'}; "
               f"{view.state.steps_lost} of {view.state.steps_run} steps lost to restarts")
    write_atomically(out, render(draw(view, series, title, last_seen), fmt, title, summary))
    click.echo(f"wrote {out} ({fmt})")
