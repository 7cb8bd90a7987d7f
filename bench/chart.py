"""The PNG chart: one small bar chart per headline metric, a bar per target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.targets import TARGETS

COLORS = {
    "direct": "#9e9e9e",
    "mmproxy": "#1f77b4",
    "mmproxy-pinned": "#6baed6",
    "go-mmproxy": "#2ca02c",
    "haproxy": "#d62728",
}
PANELS = (
    ("upload_gbit_s", "upload, Gbit/s (higher is better)"),
    ("download_gbit_s", "download, Gbit/s (higher is better)"),
    ("cpu_s_per_gib", "gateway CPU-s per GiB (lower)"),
    ("conn_per_s", "connections/s (higher)"),
    ("p99_ms", "p99 latency of the rate test, ms (lower)"),
    ("cpu_s_per_1k_conn", "gateway CPU-s per 1,000 conns (lower)"),
    ("rss_kib_per_conn", "RSS KiB per idle connection (lower)"),
    ("fds_per_conn", "fds per idle connection (lower)"),
    ("held", "idle connections held"),
    ("udp_pps_64", "UDP packets/s, 64-byte payload (higher)"),
    ("udp_mbit_s_1400", "UDP Mbit/s each way, 1,400-byte payload (higher)"),
    ("udp_cpu_s_per_mpkt_64", "UDP gateway CPU-s per 1M packets, 64 B (lower)"),
)
COLUMNS = 3


def draw(summary: dict[str, dict[str, Any]], order: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(PANELS) // COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(12, 3 * rows))
    for ax, (metric, label) in zip(axes.flat, PANELS, strict=True):
        keys = [k for k in order if isinstance(summary.get(k, {}).get(metric), int | float)]
        values = [float(summary[k][metric]) for k in keys]
        bars = ax.bar(range(len(keys)), values, color=[COLORS[k] for k in keys])
        ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=7)
        ax.set_xticks(range(len(keys)), [_wrap(TARGETS[k].name) for k in keys], fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.15)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def _short(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _wrap(name: str) -> str:
    return name.replace(" (", "\n(")
