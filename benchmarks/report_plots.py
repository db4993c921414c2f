"""The report's PNG plots (matplotlib, Agg): single request, quality vs latency, serving latency and throughput."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SETUP_LABELS = {"large-only": "(a) large-only", "colocated-sr": "(b) colocated SR",
                "disaggregated-sr": "(c) disaggregated SR"}
COLORS = {"large-only": "tab:gray", "colocated-sr": "tab:blue", "disaggregated-sr": "tab:orange"}


def med(s: dict | None) -> float | None:
    return None if not s else s["median"]


def plot_single_request(sr: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["policy"] for r in sr["policies"]]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [r["limit"] for r in sr["policies"]], 0.4, label="limit N/(k+(N-k)/r)",
           color="lightgray")
    ax.bar([x + 0.2 for x in xs], [r["denoise_speedup"] for r in sr["policies"]], 0.4, label="measured (denoise)",
           color="tab:orange")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("speedup over large-only")
    ax.legend()
    ax.set_title("Single request: SR speedup vs limit")
    fig.tight_layout()
    fig.savefig(out / "sr_speedup.png", dpi=120)
    plt.close(fig)


def plot_quality(points: list[tuple[float, float, str]], frontier: set[str], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (x, y, name) in enumerate(sorted(points)):  # labels alternate above and below, so neighbours stay apart
        ax.scatter(x, y, color="tab:red" if name in frontier else "tab:blue", zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 6 if i % 2 else -12), fontsize=8)
    fr = sorted((x, y) for x, y, n in points if n in frontier)
    ax.plot([p[0] for p in fr], [p[1] for p in fr], color="tab:red", lw=1, ls="--", label="Pareto frontier")
    ax.set_xlabel("seconds per video (median, denoise + decode)")
    ax.set_ylabel("color & shape & motion correct (%)")
    ax.set_ylim(0, 102)
    ax.set_title("srd-tiny: quality vs latency, all policies")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "quality_pareto.png", dpi=120)
    plt.close(fig)


def plot_serving(s: dict, setups: list[str], levels: list[str], b: dict | None, out: Path) -> None:
    summ = s["summary"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for setup in setups:
        xs, p50, p99 = [], [], []
        for phase in ["unloaded", *levels]:
            e = summ[setup].get(phase)
            if not e or not e.get("p50"):
                continue
            xs.append(med(e.get("offered_rps")) or 0.0)
            p50.append(med(e["p50"]))
            p99.append(med(e["p99"]))
        ax.plot(xs, p50, marker="o", color=COLORS[setup], label=f"{SETUP_LABELS[setup]} p50")
        ax.plot(xs, p99, marker="^", ls="--", color=COLORS[setup], label=f"{SETUP_LABELS[setup]} p99")
        sat = med(summ[setup].get("saturation", {}).get("throughput_rps"))
        if sat:
            ax.axvline(sat, color=COLORS[setup], ls=":", lw=1)
    ax.set_xlabel("offered load, requests/s (0 = unloaded; dotted: saturation throughput)")
    ax.set_ylabel("latency, s (server)")
    ax.set_title(f"Latency vs load, {s['workers']} workers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_load.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for i, setup in enumerate(setups):
        t = summ[setup].get("saturation", {}).get("throughput_rps")
        if t:
            ax.bar(i, t["median"], color=COLORS[setup], yerr=[[t["median"] - t["min"]], [t["max"] - t["median"]]])
    if b:
        ax.axhline(b["bound"], color="black", ls="--", lw=1, label="compute bound N/(k+(N-k)/r)")
        ax.axhline(b["amdahl_bound"], color="black", ls=":", lw=1, label="bound counting encode + decode")
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xticks(range(len(setups)), [SETUP_LABELS[x] for x in setups], fontsize=8)
    ax.set_ylabel("requests/s at saturation")
    ax.set_title(f"Throughput, {s['workers']} workers (median, min-max)")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)
