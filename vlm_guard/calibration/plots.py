"""PNG plots of a head map, written beside it by ``calibrate``: the VHD heatmap (layers x heads, VHR
heads marked) and the sink-dimension profile (first-token ratio per hidden dimension, tau and the
"near tau" threshold drawn, sink dims labelled).

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change).

Example (not run: needs a calibrated head map)::

    save_plots(head_map, "maps/llava-7b")
    # [PosixPath('maps/llava-7b/vhd_heatmap.png'), PosixPath('maps/llava-7b/sink_dims.png')]
"""

from __future__ import annotations

from pathlib import Path

VHD_PLOT = "vhd_heatmap.png"
SINK_PLOT = "sink_dims.png"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_vhd(head_map, path: str | Path) -> Path:
    """Heatmap of the mean VHD ``[L, H]``; dots mark the selected VHR heads."""
    layers, heads = head_map.num_layers, head_map.num_heads
    from matplotlib.ticker import MaxNLocator

    figure = _figure(min(16.0, 5.5 + 0.3 * heads), min(12.0, 3.5 + 0.25 * layers))
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(
        head_map.vhd_mean.float().numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest"
    )
    figure.colorbar(
        image, ax=axes, label=f"VHD ({head_map.distance}), mean over {head_map.calibration.get('n_images', '?')} images"
    )
    selected = head_map.vhr_heads.nonzero()
    if len(selected):
        axes.scatter(selected[:, 1].numpy(), selected[:, 0].numpy(), s=6, c="white", marker="o", label="VHR heads")
        axes.legend(loc="upper right", fontsize=7, framealpha=0.6)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    from vlm_guard.checks import (
        display_model_name,  # the model's name, not the folders of the machine that made the map
    )

    name = (
        display_model_name(head_map.fingerprint)
        if head_map.fingerprint.get("name_or_path")
        else head_map.fingerprint.get("family")
    )
    axes.set_title(f"vision-aware head divergence: {name}", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    from vlm_guard.fileio import atomic_path

    with atomic_path(path) as temporary:  # a failed or interrupted save keeps the previous plot
        figure.savefig(temporary)
    return path


def plot_sink_dims(head_map, path: str | Path) -> Path:
    """First-token magnitude ratio ``|x_d| / rms`` per hidden dimension, with tau and tau/2."""
    figure = _figure(9.0, 3.5)
    axes = figure.add_subplot(1, 1, 1)
    profile = head_map.sink_dim_profile
    if profile is None:
        axes.text(0.5, 0.5, "sink dimensions were not measured", ha="center", va="center", transform=axes.transAxes)
    else:
        values = profile.float().numpy()
        axes.vlines(range(len(values)), 0, values, linewidth=0.6, color="tab:blue")
        axes.axhline(
            head_map.sink_threshold,
            color="tab:red",
            linestyle="--",
            linewidth=0.8,
            label=f"tau = {head_map.sink_threshold:g}",
        )
        axes.axhline(
            head_map.sink_dim_min_ratio,
            color="tab:orange",
            linestyle=":",
            linewidth=0.8,
            label=f"sink-dim rule >= {head_map.sink_dim_min_ratio:g}",
        )
        for dim, ratio in zip(head_map.sink_dims, head_map.sink_dim_ratios):
            axes.annotate(f"{dim}", (dim, ratio), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
        axes.set_xlim(-1, len(values))
        axes.legend(loc="upper right", fontsize=7)
    axes.set_xlabel("hidden dimension")
    axes.set_ylabel("first-token |x_d| / rms")
    found = ", ".join(map(str, head_map.sink_dims)) or "none (VAR off)"
    axes.set_title(f"massive activations (median over middle layers); sink dims: {found}", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    from vlm_guard.fileio import atomic_path

    with atomic_path(path) as temporary:
        figure.savefig(temporary)
    return path


def save_plots(head_map, directory: str | Path) -> list[Path]:
    """Write :data:`VHD_PLOT` and :data:`SINK_PLOT` into ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [plot_vhd(head_map, directory / VHD_PLOT), plot_sink_dims(head_map, directory / SINK_PLOT)]
