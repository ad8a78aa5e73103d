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
from cli.options import open_read_only, run_dir_argument
from ledger import Ledger
from ledger.decisions import is_torn
from ledger.events import PreemptionSignalled, StepCompleted
from ledger.view import View

FORMATS = {".png": "png", ".svg": "svg", ".html": "html"}
MAX_POINTS = 4000  # per attempt on the loss curve; longer series are thinned evenly

ATTEMPT_COLOURS = {"completed": "#2e7d32", "preempted": "#ef6c00", "crashed": "#c62828", "failed": "#8e0000",
                   "fenced": "#6a1b9a", "running": "#1565c0"}
CHECKPOINT_COLOURS = {"committed": "#2e7d32", "in_flight": "#9e9e9e", "aborted": "#ef6c00", "deleted": "#cfcfcf",
                      "corrupt": "#c62828", "torn": "#8d6e63"}


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


def draw(view: View, series: Series, title: str):  # noqa: ANN201 - a matplotlib Figure
    """The timeline figure (matplotlib's object-oriented API: no pyplot, no global state)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    attempts = view.attempts
    checkpoints = list(view.checkpoints.values())
    has_loss = any(series.loss.values())
    fig = Figure(figsize=(11, 6.5 if has_loss else 4.2), layout="constrained")
    axes = fig.subplots(2 if has_loss else 1, 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [1.2, 1] if has_loss else [1]})[:, 0]
    ax = axes[0]
    ax.set_title(title, fontsize=11, loc="left")
    rows = {a.epoch: i + 1 for i, a in enumerate(attempts)}
    for attempt in attempts:
        y = rows[attempt.epoch]
        end = attempt.last_step if attempt.last_step is not None else attempt.first_step
        ax.barh(y, max(end - attempt.first_step, 0.4), left=attempt.first_step, height=0.5,
                color=ATTEMPT_COLOURS.get(attempt.status, "#757575"), alpha=0.85)
        ax.text(end, y, f"  {attempt.status}", va="center", fontsize=8)
        if attempt.status in ("crashed", "failed"):
            ax.plot([end], [y], marker="X", color="#c62828", markersize=11, markeredgecolor="black", zorder=5)
    for epoch, step, _signal in series.preemptions:
        if epoch in rows:
            ax.plot([step], [rows[epoch]], marker="v", color="#ef6c00", markersize=11, markeredgecolor="black", zorder=5)
    ck_row = len(attempts) + 1.2
    shown = {c.checkpoint_id: "torn" if is_torn(view.state, c) else c.status for c in checkpoints}
    for ckpt in checkpoints:
        ax.plot([ckpt.step], [ck_row], marker="|", markersize=18, mew=2.5,
                color=CHECKPOINT_COLOURS.get(shown[ckpt.checkpoint_id], "#757575"))
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
    ax.grid(axis="x", alpha=0.3)
    legend = [Line2D([], [], color=c, lw=6, label=f"attempt {s}") for s, c in ATTEMPT_COLOURS.items()
              if any(a.status == s for a in attempts)]
    legend += [Line2D([], [], color=c, marker="|", lw=0, markersize=12, mew=2.5, label=f"checkpoint {s}")
               for s, c in CHECKPOINT_COLOURS.items() if s in shown.values()]
    if series.preemptions:
        legend.append(Line2D([], [], color="#ef6c00", marker="v", lw=0, label="preemption"))
    if any(a.status in ("crashed", "failed") for a in attempts):
        legend.append(Line2D([], [], color="#c62828", marker="X", lw=0, label="crash"))
    if legend:
        ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if has_loss:
        lax = axes[1]
        for epoch, points in sorted(series.loss.items()):
            points = _thin(points)
            lax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2, label=f"attempt {epoch}",
                     color=ATTEMPT_COLOURS.get(view.state.attempts[epoch].status if epoch in view.state.attempts
                                               else "", "#757575"))
        lax.set_ylabel(series.metric or "", fontsize=9)
        lax.grid(alpha=0.3)
        lax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1].set_xlabel("step")
    return fig


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
    run_id = view.run.run_id if view.run else run_dir.name
    title = f"run {run_id} — {len(view.attempts)} attempt(s), goodput {view.goodput:.1%}"
    best = view.best
    summary = (f"as of event {view.seq}; resume {view.resume.checkpoint_id if view.resume else '-'}; "
               f"latest {view.latest.checkpoint_id if view.latest else '-'}; "
               f"best {best.checkpoint_id + f' ({best.metric}={best.value:.4g})' if best else '-'}; "
               f"{view.state.steps_lost} of {view.state.steps_run} steps lost to restarts")
    write_atomically(out, render(draw(view, series, title), fmt, title, summary))
    click.echo(f"wrote {out} ({fmt})")
