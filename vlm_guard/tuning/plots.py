"""One PNG per tuned method: the objective against the method's strength, one line per layer band, greedy dashed.

Drawn from the smallest rung (the only one every setting of the grid ran on), with matplotlib's object API and the
Agg canvas (no pyplot, no global backend change).

Example (not run: draws and writes a PNG per method, seconds of matplotlib)::

    plot_method_curves(head_map.tuned, "maps/default-tuned")
    # [PosixPath('maps/default-tuned/tune_vhr.png'), ...]
"""

from __future__ import annotations

from pathlib import Path

from vlm_guard.fileio import atomic_path
from vlm_guard.tuning.space import STRENGTH_FIELD


def plot_method_curves(tuned: dict, out_dir: str | Path) -> list[Path]:
    """Write ``tune_<method>.png`` for every method the tuning table measured; returns the paths."""
    from vlm_guard.calibration.plots import _figure

    out = Path(out_dir)
    paths = []
    methods = [m for m in STRENGTH_FIELD if any(row.get("stage") == m for row in tuned.get("table", []))]
    for method in methods:
        rows = [row for row in tuned.get("table", []) if row.get("stage") == method and row.get("rung") == 0]
        if not rows:
            continue
        strength = STRENGTH_FIELD[method]
        figure = _figure(6.0, 4.0)
        axes = figure.add_subplot(1, 1, 1)
        bands: dict[str, list[tuple[float, float, bool]]] = {}
        for row in rows:
            value = row["methods"][method].get(strength)
            layers = next((v for k, v in row["methods"][method].items() if k.endswith("layers")), "absent")
            band = row.get("band") or method
            if layers not in ("absent", None):
                band = f"{band} ({','.join(map(str, layers))})"
            bands.setdefault(band, []).append((float(value), float(row["score"]), bool(row["feasible"])))
        for band, points in sorted(bands.items()):
            points.sort()
            line = axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=band)[0]
            infeasible = [p for p in points if not p[2]]
            if infeasible:
                axes.scatter(
                    [p[0] for p in infeasible],
                    [p[1] for p in infeasible],
                    marker="x",
                    s=60,
                    color=line.get_color(),
                    zorder=3,
                )
        axes.axhline(float(rows[0]["greedy_score"]), color="black", linestyle="--", label="greedy")
        chosen = tuned.get("settings", {}).get(method)
        title = (
            ("chosen " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
            if chosen
            else "no feasible setting: released defaults"
        )
        axes.set_title(f"{method}: {title}", fontsize=9)
        axes.set_xlabel(f"{method} {strength}")
        axes.set_ylabel("CHAIR_I + adv. POPE error (%)  [x: infeasible]")
        n = rows[0].get("n", {})
        axes.text(
            0.01,
            0.01,
            "smallest rung: " + ", ".join(f"{k} n={v}" for k, v in n.items()),
            transform=axes.transAxes,
            fontsize=7,
        )
        axes.legend(fontsize=7)
        figure.tight_layout()
        path = out / f"tune_{method}.png"
        with atomic_path(path) as temporary:  # a failed or interrupted save keeps the previous plot
            figure.savefig(temporary)
        paths.append(path)
    return paths


__all__ = ["plot_method_curves"]
