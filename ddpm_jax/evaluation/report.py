"""Evaluation outputs: JSON reports, Markdown tables and matplotlib charts (PNG).

- :func:`write_report`: one evaluation's JSON report and a PNG grid of its samples;
- :func:`write_sweep`: a sweep (:func:`ddpm_jax.evaluation.sweep.sweep`) as ``sweep.json``,
  ``sweep.md`` (:func:`sweep_markdown`), ``sweep_steps.png`` (FID against the number of steps,
  one line per method) and ``sweep_guidance.png`` (FID, and class accuracy or Inception Score,
  against the guidance scale), each with the test split's value as a dashed line;
- :func:`plot_run`: a run's training loss, and any evaluation metric its ``metrics.jsonl`` holds
  (``fid``, ``digits_fid``, ``eval/accuracy``, ...), against the step.

Charts are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
state) and written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ddpm_jax import data, images
from ddpm_jax.errors import UsageError
from ddpm_jax.evaluation.evaluate import METRICS
from ddpm_jax.workdir import JsonLines, atomic_open, write_json

DPI = 100
PANEL_SIZE = (6.4, 4.2)  # inches: 640 x 420 pixels per panel at DPI
_FLOOR_LABEL = "test split (floor)"


# ----------------------------------------------------------------------------- charts


def _figure(
    rows: int, cols: int, panel: tuple[float, float] = PANEL_SIZE, sharex: bool = False
) -> tuple[Figure, list]:
    fig = Figure(figsize=(panel[0] * cols, panel[1] * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=sharex)
    return fig, list(axes.ravel())


def _save(fig: Figure, path: str) -> str:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    return path


def _line_panel(
    ax,
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    hline: tuple[str, float] | None = None,
    marker: str = "o",
    first_color: int = 0,
) -> None:
    """Draws one line with markers per series (colors C0, C1, ...) and an optional dashed line.

    Args:
      ax: a matplotlib Axes.
      series: ``{label: [(x, y), ...]}``.
      title / xlabel / ylabel: text.
      log_x: logarithmic x axis, ticks at the series' x values.
      hline: optional ``(label, y)`` dashed gray horizontal line (e.g. the floor).
      marker: the points' marker (``""``: none).
      first_color: the color cycle index of the first series.
    """
    xs = set()
    for k, (label, points) in enumerate(series.items()):
        points = sorted((x, y) for x, y in points if np.isfinite(y))
        if points:
            x, y = zip(*points, strict=True)
            color = f"C{(first_color + k) % 10}"
            ax.plot(x, y, marker=marker, markersize=6, linewidth=2, color=color, label=label)
            xs.update(x)
    if hline is not None and np.isfinite(hline[1]):
        ax.axhline(hline[1], color="gray", linestyle="--", linewidth=1.5, label=hline[0])
    if log_x and xs and min(xs) > 0:
        ax.set_xscale("log")
        ticks = sorted(xs)
        ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _fid_name(result: dict) -> str:
    return "digits-FID" if result["dataset"] == data.DIGITS else "FID"


def _write_sweep_charts(result: dict, steps_png: str, guidance_png: str) -> tuple[str, str]:
    """Writes the sweep's two charts.

    ``steps_png``: one panel, FID against the number of steps (log scale), one line per method.
    ``guidance_png``: FID against the guidance scale, plus a panel of the class accuracy or the
    Inception Score when the cells have it. Each panel is 640 x 420 pixels.

    Returns:
      ``(steps_png, guidance_png)``.
    """
    fid = _fid_name(result)
    floor = result.get("floor")

    def floor_line(key: str) -> tuple[str, float] | None:
        if floor and key in floor["metrics"]:
            return _FLOOR_LABEL, floor["metrics"][key]
        return None

    by_method: dict[str, list] = {}
    for r in result["steps"]:
        by_method.setdefault(r["method"], []).append((r["num_steps"], r["metrics"]["fid"]))
    fig, (ax,) = _figure(1, 1)
    _line_panel(
        ax,
        by_method,
        title=f"{fid} vs sampling steps",
        xlabel="sampling steps (log scale)",
        ylabel=f"{fid} (lower is better)",
        log_x=True,
        hline=floor_line("fid"),
    )
    _save(fig, steps_png)

    g = result["guidance"]
    label = f"{g[0]['method']}, {g[0]['num_steps']} steps" if g else ""
    keys = ["fid"] + [k for k in ("accuracy", "inception_score") if g and k in g[0]["metrics"]]
    names = {"fid": f"{fid} (lower is better)", "accuracy": "class accuracy"}
    names["inception_score"] = "Inception Score"
    fig, axes = _figure(1, len(keys))
    for ax, key in zip(axes, keys, strict=True):
        _line_panel(
            ax,
            {label: [(r["guidance_scale"], r["metrics"][key]) for r in g]},
            title=f"{names[key].split(' (')[0]} vs guidance scale",
            xlabel="guidance scale",
            ylabel=names[key],
            hline=floor_line(key),
        )
    _save(fig, guidance_png)
    return steps_png, guidance_png


def _eval_metric_keys(records: Sequence[dict]) -> list[str]:
    """Keys that name an evaluation metric: ``fid`` or ``<prefix>_fid`` / ``<prefix>/fid`` (and
    the same for the other names of ``METRICS``), in first-seen order."""
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            if k in keys or not isinstance(v, int | float) or isinstance(v, bool):
                continue
            if any(k == m or k.endswith(("_" + m, "/" + m)) for m in METRICS):
                keys.append(k)
    return keys


def plot_run(workdir: str | os.PathLike, out_png: str | os.PathLike) -> str:
    """A PNG of a run's training loss and evaluation metrics against the step.

    The first panel is the loss of every ``metrics.jsonl`` record that has one (log scale when
    positive); each evaluation metric found in the records (see module docstring) gets its own
    panel below, sharing the step axis.

    Args:
      workdir: the run's work directory (``metrics.jsonl`` is read).
      out_png: the PNG to write (atomically; parents created).

    Returns:
      ``out_png`` as a string.

    Raises:
      UsageError: ``metrics.jsonl`` is missing or has no loss record.
    """
    path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    records = JsonLines(path).read()
    loss = [(r["step"], float(r["loss"])) for r in records if _number(r.get("loss"))]
    if not loss:
        raise UsageError(f"{path} has no training loss record: is {workdir!r} a training run?")
    keys = _eval_metric_keys(records)
    fig, axes = _figure(1 + len(keys), 1, panel=(8.0, 3.2), sharex=True)
    name = os.path.basename(os.path.abspath(os.fspath(workdir)))
    _line_panel(
        axes[0],
        {"training loss": loss},
        title=f"{name}: training loss",
        xlabel="step",
        ylabel="loss",
        marker="" if len(loss) > 50 else "o",
    )
    if all(y > 0 for _, y in loss):
        axes[0].set_yscale("log")
    for k, (ax, key) in enumerate(zip(axes[1:], keys, strict=True)):
        points = [(r["step"], float(r[key])) for r in records if _number(r.get(key))]
        _line_panel(
            ax, {key: points}, title=f"{name}: {key}", xlabel="step", ylabel=key, first_color=k + 1
        )
    return _save(fig, os.fspath(out_png))


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


# ----------------------------------------------------------------------------- files


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def sweep_markdown(result: dict) -> str:
    """The sweep as two Markdown tables (steps, guidance) plus the test-split floor."""
    present = {k for r in result["steps"] + result["guidance"] for k in r["metrics"]}
    keys = [k for k in METRICS if k in present]
    head = "| " + " | ".join(keys) + " | sample s |"
    sep = "|" + "---|" * (len(keys) + 1)

    def row(prefix: str, r: dict) -> str:
        vals = " | ".join(_fmt(r["metrics"].get(k)) for k in keys)
        return f"| {prefix} | {vals} | {r['sample_s']:.1f} |"

    lines = ["| method | steps | N " + head, "|---|---|---" + sep]
    lines += [
        row(f"{r['method']} | {r['num_steps']} | {r['num_samples']}", r) for r in result["steps"]
    ]
    if result.get("floor"):
        f = result["floor"]
        vals = " | ".join(_fmt(f["metrics"].get(k)) for k in keys)
        lines.append(f"| {_FLOOR_LABEL} | – | {f['num_images']} | {vals} | – |")
    lines += ["", "| guidance scale | method | steps | N " + head, "|---|---|---|---" + sep]
    lines += [
        row(f"{r['guidance_scale']:g} | {r['method']} | {r['num_steps']} | {r['num_samples']}", r)
        for r in result["guidance"]
    ]
    return "\n".join(lines) + "\n"


def write_sweep(result: dict, out_dir: str) -> dict[str, str]:
    """Writes ``sweep.json``, ``sweep.md``, ``sweep_steps.png`` and ``sweep_guidance.png``.

    Args:
      result: from :func:`ddpm_jax.evaluation.sweep.sweep`.
      out_dir: the directory (created).

    Returns:
      ``{"json", "markdown", "steps_plot", "guidance_plot"}`` paths.
    """
    paths = {
        k: os.path.join(out_dir, f)
        for k, f in (
            ("json", "sweep.json"),
            ("markdown", "sweep.md"),
            ("steps_plot", "sweep_steps.png"),
            ("guidance_plot", "sweep_guidance.png"),
        )
    }
    write_json(paths["json"], result)
    with atomic_open(paths["markdown"], "w") as f:
        f.write(sweep_markdown(result))
    _write_sweep_charts(result, paths["steps_plot"], paths["guidance_plot"])
    return paths


def write_report(report: dict, imgs: np.ndarray, out: str) -> tuple[str, str]:
    """Writes the JSON report at ``out`` and a PNG grid next to it (``.png``).

    Args:
      report: from :meth:`ddpm_jax.evaluation.sweep.RunEvaluator.evaluate`; the grid's path
        is added as ``"grid"``.
      imgs: ``[N, H, W, C]`` uint8; the grid shows the first ``min(N, 100)`` rounded down to
        whole rows of ``min(10, N)``.
      out: the ``.json`` path (parents created).

    Returns:
      ``(out, grid)``.
    """
    grid = os.path.splitext(out)[0] + ".png"
    n = min(imgs.shape[0], 100)
    ncols = min(10, n)
    images.save_png_grid(grid, imgs[: (n // ncols) * ncols], ncols)
    write_json(out, dict(report, grid=grid))
    return out, grid


__all__ = [
    "plot_run",
    "sweep_markdown",
    "write_report",
    "write_sweep",
]
