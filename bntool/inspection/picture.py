"""The picture of an inspection: running_mean and running_var per BatchNorm, in network order (matplotlib).

A renderer beside ``console.py``'s tables, for the Python API
(``bntool.plot``) and ``bntool inspect --plot``. matplotlib is
imported when a plot is drawn, never with bntool.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import InputError, named
from ..io.outputs import atomic_write, check_output_path
from ..norms import DEFAULT_EPS


def plot(report: Any, path: str | Path, *, title: str | None = None, force: bool = False) -> Path:
    """Draw running_mean and running_var per BN of an ``InspectReport`` in network order (box = quartiles,
    whiskers = min/max).

    An existing ``path`` is replaced only with ``force``; the image is written atomically.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError(f"{named('`bntool.plot`')} needs matplotlib; install it with `pip install bntool[plot]`") from None

    path = check_output_path(path, force=force, what="`path`")
    rows = [r for r in report.rows if r.running_var is not None or r.running_mean is not None]
    if not rows:
        raise InputError("there is nothing to plot: no BatchNorm layer with running statistics")
    flagged = {n for f in report.findings if f.severity != "info" for n in f.layers}
    fig = Figure(figsize=(max(6.0, 0.28 * len(rows) + 2.5), 6.5), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax_mean, ax_var = fig.subplots(2, 1, sharex=True)
    positions = list(range(len(rows)))
    for ax, field, label in ((ax_mean, "running_mean", "running_mean"), (ax_var, "running_var", "running_var (log)")):
        stats, where, colors = [], [], []
        for i, r in enumerate(rows):
            s = getattr(r, field)
            if s is None:
                ax.annotate("NaN", (i, 0.5), xycoords=("data", "axes fraction"), color="red", ha="center", fontsize=7)
                continue
            floor = 0.01 * min(r.eps or DEFAULT_EPS for r in rows) if field == "running_var" else -math.inf
            stats.append({"med": max(s.median, floor), "q1": max(s.q1, floor), "q3": max(s.q3, floor),
                          "whislo": max(s.min, floor), "whishi": max(s.max, floor), "mean": s.mean, "fliers": []})
            where.append(i)
            colors.append("#d62728" if r.name in flagged else "#1f77b4")
        if stats:
            boxes = ax.bxp(stats, positions=where, widths=0.6, showfliers=False, patch_artist=True)
            for box, color in zip(boxes["boxes"], colors):
                box.set(facecolor=color, alpha=0.35, edgecolor=color)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    ax_var.set_yscale("log")
    eps = [r.eps if r.eps is not None else DEFAULT_EPS for r in rows]
    if any(r.running_var is None or r.running_var.min <= 100 * e for r, e in zip(rows, eps)):  # eps matters
        ax_var.scatter(positions, eps, marker="_", s=120, color="black",
                       label="eps" + (" (assumed)" if rows[0].eps is None else ""))
        ax_var.legend(loc="best", fontsize=8)
    ax_var.set_xticks(positions)
    ax_var.set_xticklabels([r.name or "(root)" for r in rows], rotation=90, fontsize=7)
    for tick, r in zip(ax_var.get_xticklabels(), rows):
        if r.name in flagged:
            tick.set_color("#d62728")
    fig.suptitle((f"{title}\n" if title else "") + "BatchNorm running statistics per layer, in network order\n"
                 "(box: quartiles, whiskers: min / max, red: a layer with an error or warning)", fontsize=9)
    with atomic_write(path, force=force, what="`path`") as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    return path
