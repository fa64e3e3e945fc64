"""Plots of fronts and the self-contained HTML / Markdown reports `moalign eval` and the benchmarks write.

A person compares trade-offs faster by looking at fronts than by reading tables, so every evaluation
writes a PNG and an HTML page that embeds it (base64: the page can be mailed or attached alone).
"""

from __future__ import annotations

import base64
import html
import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moalign.run import atomic_write, atomic_write_text

MAX_PANELS = 6  # pairwise projections drawn for N ≥ 3 objectives
MARKERS = "osD^vP*X"  # one marker shape per run when points are coloured by weight


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def _label(front: dict[str, Any]) -> str:
    return f"{front.get('name', 'run')} ({front.get('method', '?')})"


def _weight_label(preference: Sequence[float]) -> str:
    if len(preference) == 2:
        return f"{preference[0]:g}"
    return "(" + ",".join(f"{w:g}" for w in preference) + ")"


def _draw_pair(ax, fronts: Sequence[dict[str, Any]], i: int, j: int, annotate: bool, lines: bool = True) -> None:
    """Objective i on x, objective j on y: a line through the grid (N = 2) or markers coloured by w1 (N ≥ 3),
    non-dominated points filled, each point's 95% interval as error bars."""
    names = fronts[0]["objectives"]
    colors = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    labels: list[tuple[float, float, str, str]] = []
    for index, front in enumerate(fronts):
        color = colors[index % len(colors)]
        points = np.asarray(front["points"], dtype=float)
        if lines:
            ax.plot(points[:, i], points[:, j], "-o", color=color, mfc="white", ms=5, lw=1.2, label=_label(front))
        else:  # N ≥ 3: grid neighbours are not neighbours in a projection; colour each point by its weight w1
            weights = np.asarray(front["preferences"], dtype=float)[:, 0]
            ax.scatter(
                points[:, i],
                points[:, j],
                c=weights,
                cmap="viridis",
                marker=MARKERS[index % len(MARKERS)],
                s=28,
                vmin=0,
                vmax=1,
                edgecolor=color,
                lw=0.8,
                label=_label(front),
            )
        bounds = front.get("point_intervals")
        if bounds is not None:  # the 95% bootstrap interval of each mean, over prompts
            bounds = np.asarray(bounds, dtype=float)
            ax.errorbar(
                points[:, i],
                points[:, j],
                xerr=np.abs(bounds[:, i, :].T - points[:, i]),
                yerr=np.abs(bounds[:, j, :].T - points[:, j]),
                fmt="none",
                ecolor=color,
                alpha=0.35,
                lw=0.8,
                zorder=1,
            )
        best = list(front.get("non_dominated", []))
        if best and lines:
            ax.scatter(points[best, i], points[best, j], color=color, s=40, zorder=3, edgecolor="black", lw=0.6)
        elif best:  # keep the weight's colour: ring the non-dominated points instead of filling them
            ax.scatter(points[best, i], points[best, j], facecolors="none", edgecolors="black", s=70, lw=0.8, zorder=3)
        if annotate:
            # Preferences served alike land on one point: label it once, with the range of weights.
            shared: dict[tuple[float, float], list[str]] = {}
            for preference, (x, y) in zip(front["preferences"], points[:, [i, j]]):
                shared.setdefault((float(x), float(y)), []).append(_weight_label(preference))
            labels += [(x, y, ws[0] if len(ws) == 1 else f"{ws[0]}…{ws[-1]}", color) for (x, y), ws in shared.items()]
    reference = fronts[0].get("reference_point")
    if reference is not None:
        ax.scatter([reference[i]], [reference[j]], marker="x", color="black", s=50, zorder=4, label="reference point")
        ax.axvline(reference[i], color="grey", lw=0.6, ls=":")
        ax.axhline(reference[j], color="grey", lw=0.6, ls=":")
    ax.margins(0.08)  # room for the labels at the edges
    ax.set_xlabel(f"{names[i]} (mean)")
    ax.set_ylabel(f"{names[j]} (mean)")
    ax.grid(alpha=0.3)
    _place_labels(ax, labels)


def _place_labels(ax, labels: list[tuple[float, float, str, str]]) -> None:
    """Write each label beside its point: above-right, else below-right, above-left, below-left, else further
    out, whichever first covers no label already placed (close points would otherwise write over each other)."""
    scale = ax.figure.dpi / 72  # points → pixels
    placed: list[tuple[float, float, float, float]] = []  # left, bottom, right, top of each label, in pixels
    for x, y, text, color in labels:
        px, py = ax.transData.transform((x, y))
        width, height = 4.5 * len(text), 8.0  # a 7-point label, in points
        candidates = [(4, 3), (4, -3 - height), (-4 - width, 3), (-4 - width, -3 - height)]
        candidates += [(4, 3 + k * height) for k in (1, -2, 2, -3)]
        for dx, dy in candidates:
            box = (px + dx * scale, py + dy * scale, px + (dx + width) * scale, py + (dy + height) * scale)
            if not any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in placed):
                break
        placed.append(box)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, color=color, zorder=5)


def plot_fronts(fronts: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Draw one or more runs' fronts into a PNG.

    N = 2: the fronts, each grid point labelled with its weight w1, non-dominated points filled, the
    reference point drawn; N ≥ 3: pairwise projections side by side; N = 1: mean score per run.
    """
    plt = _pyplot()
    names = fronts[0]["objectives"]
    n = len(names)
    if n == 1:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.bar([_label(f) for f in fronts], [np.asarray(f["points"], dtype=float)[:, 0].mean() for f in fronts])
        ax.set_ylabel(f"{names[0]} (mean)")
    elif n == 2:
        fig, ax = plt.subplots(figsize=(6.5, 5))
        annotate = len(fronts) <= 3  # more runs: the labels would hide the lines
        _draw_pair(ax, fronts, 0, 1, annotate=annotate)
        if len(fronts) == 1:
            ax.set_title(_label(fronts[0]))
        else:
            ax.set_title("fronts over the preference grid" + (" (labels: w1)" if annotate else ""))
        ax.legend(fontsize=8, loc="best")
    elif n == 3:
        pairs = list(itertools.combinations(range(n), 2))
        fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.5), squeeze=False)
        for ax, (i, j) in zip(axes[0], pairs):
            _draw_pair(ax, fronts, i, j, annotate=False, lines=False)
        axes[0][0].legend(fontsize=8, loc="best")
        fig.colorbar(axes[0][-1].collections[0], ax=axes[0].tolist(), label=f"weight on {names[0]}")
        fig.suptitle("pairwise projections (colour: weight on the first objective; ringed: non-dominated)")
    else:
        fig, ax = plt.subplots(figsize=(1.6 * n + 3, 4.5))
        _parallel_coordinates(ax, fronts, names)
    if n != 3:  # the colour bar's axes do not take part in tight_layout
        fig.tight_layout()
    return save_figure(fig, path)


def _parallel_coordinates(ax, fronts: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
    """N ≥ 4: one polyline per preference across the objectives, each min-max scaled over all runs; the line
    style tells the runs apart and the colour is the weight on the first objective."""
    plt = _pyplot()
    stacked = np.vstack([np.asarray(f["points"], dtype=float) for f in fronts])
    low, span = stacked.min(axis=0), np.where(np.ptp(stacked, axis=0) > 0, np.ptp(stacked, axis=0), 1.0)
    cmap, styles = plt.get_cmap("viridis"), ["-", "--", ":", "-."]
    x = np.arange(len(names))
    for index, front in enumerate(fronts):
        points = (np.asarray(front["points"], dtype=float) - low) / span
        for k, (preference, row) in enumerate(zip(front["preferences"], points)):
            label = _label(front) if k == 0 else None
            ax.plot(x, row, styles[index % len(styles)], color=cmap(float(preference[0])), lw=1, alpha=0.8, label=label)
    ax.set_xticks(x, [f"{name}\n[{lo:.3g}, {lo + sp:.3g}]" for name, lo, sp in zip(names, low, span)])
    ax.set_ylabel("mean score, min-max scaled over the runs")
    ax.set_title("fronts in parallel coordinates (colour: weight on the first objective)")
    ax.legend(fontsize=8, loc="best")


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as a PNG atomically and close it."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _pyplot().close(fig)
    return path


def plot_selection(
    path: Path,
    points: np.ndarray,
    pool: np.ndarray,
    names: list[str],
    preferences: Sequence[np.ndarray],
    selections: Sequence[np.ndarray],
    max_background: int = 20000,
) -> None:
    """Normalised scores (grey), the first layers (blue), each ray and its selected samples, per objective pair.

    N=2 is one scatter; N≥3 shows every pairwise projection (the rays projected with them).
    """
    plt = _pyplot()
    n = points.shape[1]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.4), squeeze=False)
    rng = np.random.default_rng(0)
    background = np.arange(len(points))
    if len(background) > max_background:
        background = np.sort(rng.choice(background, max_background, replace=False))
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, max(2, len(preferences))))
    single = len(preferences) == 1
    for ax, (i, j) in zip(axes[0], pairs):
        ax.scatter(points[background, i], points[background, j], s=4, c="0.82", label="scored data", rasterized=True)
        ax.scatter(points[pool, i], points[pool, j], s=6, c="tab:blue", alpha=0.5, label="first layers")
        for c, (w, chosen) in enumerate(zip(preferences, selections)):
            w = np.asarray(w, dtype=float)
            end = 1.0 + (w - 1.0) / max(1e-12, float(np.max(1.0 - w)))  # where the ray leaves the unit box
            color = "tab:red" if single else colors[c]
            label = f"w = {', '.join(f'{x:.2g}' for x in w)}"
            ax.plot([1.0, end[i]], [1.0, end[j]], "--", color=color, lw=1.2, label=label)
            ax.scatter(points[chosen, i], points[chosen, j], s=16, color=color, edgecolor="k", lw=0.3, zorder=3)
        ax.set_xlabel(f"{names[i]} (min-max)")
        ax.set_ylabel(f"{names[j]} (min-max)")
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
    title = f"ParetoHqD selection, w = {np.round(preferences[0], 3).tolist()}" if single else "ParetoHqD selections"
    fig.suptitle(title)
    axes[0][0].legend(loc="lower left", fontsize=7, ncol=1 if len(preferences) <= 6 else 2)
    fig.tight_layout()
    save_figure(fig, path)


def _with_interval(value: Any, bounds: Sequence[float] | None, digits: int = 4) -> str:
    """`value [low, high]`: a number with its 95% bootstrap interval, where there is one."""
    if not bounds or any(b is None or not math.isfinite(float(b)) for b in bounds):
        return _number(value, digits)
    return f"{_number(value, digits)} [{_number(float(bounds[0]), 3)}, {_number(float(bounds[1]), 3)}]"


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value + 0.0:.{digits}g}"  # + 0.0 turns -0.0 into 0
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of dict rows; missing cells stay empty, floats get 4 significant digits."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = ["" if row.get(c) is None else _number(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_number(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary(fronts: Sequence[dict[str, Any]]) -> str:
    names = fronts[0]["objectives"]
    header = ["run", "method", "hypervolume [95% interval]", "non-dominated", "collapse rate"]
    header += [f"steerability {n}" for n in names] + ["eval seconds", "generated/s", "training s", "training tokens"]
    rows = []
    for f in fronts:
        training = f.get("training") or {}
        rows.append(
            [f.get("name"), f.get("method"), _with_interval(f.get("hypervolume"), f.get("hypervolume_interval"))]
            + [f"{f.get('n_non_dominated')}/{len(f['points'])}", f"{f.get('collapse_rate', math.nan):.1%}"]
            + [_with_interval(f["steerability"].get(n), f.get("steerability_interval", {}).get(n), 3) for n in names]
            + [f.get("seconds"), f.get("generated_per_second"), training.get("seconds"), training.get("tokens")]
        )
    return _html_table(header, rows)


def _points(front: dict[str, Any]) -> str:
    names = front["objectives"]
    best = set(front.get("non_dominated", []))
    rows = []
    for index, (w, p) in enumerate(zip(front["preferences"], front["points"])):
        rate = front.get("collapse_rates", [None] * len(front["points"]))[index]
        bounds = front.get("point_intervals")
        means = [_with_interval(v, bounds[index][k] if bounds else None) for k, v in enumerate(p)]
        rows.append(
            [_weight_label(w)] + means + ["yes" if index in best else "", "" if rate is None else f"{rate:.0%}"]
        )
    return _html_table(
        ["w1" if len(names) == 2 else "w"] + [f"mean {n}" for n in names] + ["non-dominated", "collapsed"], rows
    )


def _samples(front: dict[str, Any]) -> str:
    parts = []
    for w, samples in zip(front["preferences"], front.get("samples", [])):
        items = []
        for sample in samples:
            scores = ", ".join(f"{k}={_number(v, 3)}" for k, v in sample.get("scores", {}).items())
            flag = " <b>[degenerate]</b>" if sample.get("degenerate") else ""
            items.append(
                f"<li><div class='prompt'>{html.escape(sample['prompt'])}</div>"
                f"<pre>{html.escape(sample['response'])}</pre><small>{html.escape(scores)}{flag}</small></li>"
            )
        parts.append(
            f"<details><summary>w = ({', '.join(f'{x:g}' for x in w)})</summary><ol>{''.join(items)}</ol></details>"
        )
    return "".join(parts)


def _stats(stats: dict[str, Any]) -> str:
    """Normalisation statistics saved with the run (NormStats.to_dict), one row per objective."""
    names = stats.get("names") or []
    keys = [k for k in ("mean", "std", "min", "max") if k in stats]
    if not names or not keys:
        return f"<pre>{html.escape(repr(stats))}</pre>"
    rows = [[name] + [stats[k][i] for k in keys] for i, name in enumerate(names)]
    return _html_table(["objective", *keys], rows)


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.8em 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}pre{white-space:pre-wrap;background:#f8f8f8;padding:4px}
.prompt{color:#555;font-style:italic}img{max-width:100%}details{margin:0.3em 0}
"""


def write_html(
    fronts: Sequence[dict[str, Any]], path: str | os.PathLike, plot: str | os.PathLike | None = None
) -> Path:
    """A self-contained report: numbers, the embedded plot, points, samples per preference, statistics."""
    reference = fronts[0].get("reference_point")
    names = fronts[0]["objectives"]
    title = "moalign evaluation: " + ", ".join(str(f.get("name")) for f in fronts)
    sections = [f"<h1>{html.escape(title)}</h1>", "<h2>Summary</h2>", _summary(fronts)]
    if reference is not None:
        values = ", ".join(f"{n} = {_number(v)}" for n, v in zip(names, reference))
        sections.append(f"<p>Hypervolume reference point (shared by all runs): {html.escape(values)}</p>")
    first = fronts[0]
    sections.append(
        f"<p>{first.get('prompts')} held-out prompts per preference, {len(first['preferences'])} preferences; "
        f"decoding: {html.escape(str(first.get('sampling', {})))}</p>"
    )
    if plot is not None and Path(plot).exists():
        encoded = base64.b64encode(Path(plot).read_bytes()).decode()
        sections.append(f"<img alt='fronts' src='data:image/png;base64,{encoded}'>")
    for front in fronts:
        sections.append(f"<h2>{html.escape(_label(front))}</h2>")
        sections.append(_points(front))
        if front.get("grid") and Path(front["grid"]).exists():  # image runs: rows are preferences
            encoded = base64.b64encode(Path(front["grid"]).read_bytes()).decode()
            sections.append(f"<h3>Images per preference</h3><img alt='grid' src='data:image/png;base64,{encoded}'>")
        if front.get("stats"):
            sections.append("<h3>Normalisation statistics (training scores)</h3>" + _stats(front["stats"]))
        sections.append("<h3>Sample responses per preference</h3>" + _samples(front))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n"
    )
    path = Path(path)
    atomic_write_text(path, page)
    return path
