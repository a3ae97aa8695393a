"""The charts (matplotlib, the optional extra ``darkspec[bench]``): one PNG per op and pass.

Left: % of the same-run copy bandwidth at the largest size, one bar per contender in each configuration. Right: the
median time against the bytes the case must move, log-log, one line per contender and configuration.
"""

from __future__ import annotations

from pathlib import Path

from darkspec.bench.cases import size_label
from darkspec.bench.report import summary


def matplotlib_reason() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return f"matplotlib is not importable ({type(error).__name__}): pip install 'darkspec[bench]'"
    return None


def chart_name(group: str) -> str:
    return f"bench-{group.replace(' ', '-')}.png"


def write_charts(report: dict, folder: Path) -> list[str]:
    """Writes one chart per group into ``folder``; returns the file names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    largest, groups = summary(report)
    names = []
    for group, configs in groups.items():
        contenders = list(dict.fromkeys(b for row in configs.values() for b in row))
        colors = {name: f"C{k}" for k, name in enumerate(contenders)}
        fig = Figure(figsize=(15, 1.5 + 0.22 * len(configs) * len(contenders)))
        FigureCanvasAgg(fig)
        bars, lines = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        height = 0.8 / max(1, len(contenders))
        for k, name in enumerate(contenders):
            ys = [g + k * height for g in range(len(configs))]
            values = [row.get(name) for row in configs.values()]
            bars.barh(ys, [v or 0.0 for v in values], height=height, label=name, color=colors[name])
            for y, v in zip(ys, values):
                bars.text(v or 0.0, y, " n/a" if v is None else f" {v:.0f}%", va="center", fontsize=6)
        bars.set_yticks([g + height * (len(contenders) - 1) / 2 for g in range(len(configs))], list(configs),
                        fontsize=7)
        bars.invert_yaxis()
        bars.axvline(100, color="grey", linewidth=0.8)
        bars.set_xlabel(f"% of copy bandwidth at {size_label(largest)} (median over dtypes and threads)")
        bars.legend(loc="lower right", fontsize=7)
        series: dict = {}
        for r in report["results"]:
            if r["group"] == group and r["gbps"]:
                series.setdefault((r["backend"], r["configuration"], r["dtype"], r["case_threads"]), []).append(
                    (r["bytes"], r["time"]["median_s"]))
        for (name, *_), points in series.items():
            points.sort()
            lines.plot([b for b, _ in points], [t for _, t in points], marker=".", linewidth=0.6,
                       color=colors.get(name, "black"), alpha=0.7)
        lines.set_xscale("log")
        lines.set_yscale("log")
        lines.set_xlabel("bytes the case must move")
        lines.set_ylabel("median time (s)")
        lines.grid(True, which="both", linewidth=0.3)
        fig.suptitle(f"darkspec bench: {group} ({report['machine']['cpu_model']}, "
                     f"{report['machine']['usable_cores']} cores)")
        fig.tight_layout()
        name = chart_name(group)
        fig.savefig(folder / name, dpi=90)
        names.append(name)
    return names
