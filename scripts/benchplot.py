"""PNG pictures for the benchmarks (``make bench``, ``make bench-scale``, ``make bench-sim``).

matplotlib comes from the ``bench`` extra (``pip install -e '.[bench]'``; the Makefile's
bench targets install it); it is never a runtime dependency of vmem_guest. Without it
a benchmark still prints and writes its JSON, and says that it drew no picture.

A picture lands next to the benchmark's JSON, ``results/bench/<kind>-<time>.png``, and
is copied to ``results/bench/<kind>-latest.png``.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 1 << 30
#: One colour per driver, the same in every picture.
COLOURS = {
    "in-kernel virtio_mem": "tab:blue",
    "vmem_guest": "tab:orange",
    "vmem_guest, auto-online on": "tab:orange",
    "vmem_guest, auto-online off": "tab:green",
}


@dataclass(frozen=True)
class Line:
    """One curve: x and y values, a label; ``steps`` draws a step function (a value
    holds until the next point) extended to ``end``."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    colour: str = ""
    dashed: bool = False
    steps: bool = True
    end: float | None = None
    markers: bool = False


@dataclass(frozen=True)
class Panel:
    """One subplot."""

    title: str
    lines: Sequence[Line]
    xlabel: str = "seconds since qom-set"
    ylabel: str = "GiB"
    xlog: bool = False
    ylog: bool = False
    #: Horizontal reference lines (value, label), drawn dotted, named in the legend.
    marks: Sequence[tuple[float, str]] = ()
    #: Tick positions and their labels on the x axis (empty: matplotlib's own).
    xticks: Sequence[tuple[float, str]] = ()


def time_lines(
    driver: str, size_t: Sequence[float], size_b: Sequence[int], size_end: float,
    mem_t: Sequence[float], mem_b: Sequence[int], mem_end: float, base: int,
) -> list[Line]:  # fmt: skip
    """A driver's two curves of one step: QEMU's plugged size (solid) and MemTotal minus
    the boot MemTotal (dashed), in GiB."""
    colour = COLOURS.get(driver, "")
    return [
        Line(f"{driver}: QEMU size", size_t, [b / GiB for b in size_b], colour, end=size_end),
        Line(
            f"{driver}: MemTotal - boot",
            mem_t,
            [(b - base) / GiB for b in mem_b],
            colour,
            dashed=True,
            end=mem_end,
        ),
    ]


def _draw(ax: Any, panel: Panel) -> None:
    for line in panel.lines:
        if not line.x:
            continue
        x, y = list(line.x), list(line.y)
        if line.steps and line.end is not None and line.end > x[-1]:
            x.append(line.end)
            y.append(y[-1])
        ax.plot(
            x,
            y,
            label=line.label,
            color=line.colour or None,
            linestyle="--" if line.dashed else "-",
            drawstyle="steps-post" if line.steps else "default",
            marker="o" if line.markers else None,
        )
    for value, label in panel.marks:
        ax.axhline(value, color="grey", linestyle=":", linewidth=0.8, label=label)
    ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.xlog:
        ax.set_xscale("log", base=2)
    if panel.ylog:
        ax.set_yscale("log")
    if panel.xticks:
        ax.set_xticks([x for x, _ in panel.xticks], [label for _, label in panel.xticks])
        ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def save_png(json_path: Path, title: str, panels: Sequence[Panel], columns: int = 3) -> Path | None:
    """Draw the panels (a grid, ``columns`` wide) into the PNG next to ``json_path``
    (same name, ``.png``) and copy it to ``<kind>-latest.png``; return its path, or None
    (with one line saying why) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        _draw(ax, panel)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = json_path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    kind = json_path.stem.rsplit("-", 2)[0]
    shutil.copyfile(png, png.with_name(f"{kind}-latest.png"))
    return png
