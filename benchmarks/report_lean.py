"""REPORT.md sections for the lean control plane and data path: control-plane CPU per request, bytes per hop,
step caches on top of SR, and the serving figures before and after (each read from the JSON its benchmark wrote)."""
from __future__ import annotations

from typing import Any

from report_plots import SETUP_LABELS, med


def _mmm(s: dict | None, digits: int = 1) -> str:
    if not s:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def _cpu_table(cp: dict[str, Any]) -> list[str]:
    lines = ["| code | JobStore raw | Ingress raw | both raw | JobStore marginal | Ingress marginal | both marginal |",
             "|---|---|---|---|---|---|---|"]
    for name, s in cp["summary"].items():
        code = f"{name} (`{cp['setting']['baseline']}`)" if name == "baseline" else name
        lines.append(f"| {code} | {_mmm(s['jobstore_ms'])} | {_mmm(s['ingress_ms'])} | {_mmm(s['control_plane_ms'])} "
                     f"| {_mmm(s['jobstore_marginal_ms'])} | {_mmm(s['ingress_marginal_ms'])} "
                     f"| {_mmm(s['control_plane_marginal_ms'])} |")
    return lines


def control_plane_section(cp: dict[str, Any], serve_mode: dict[str, Any] | None = None
                          ) -> tuple[list[str], list[tuple]]:
    """`serve_mode`: a second run of the benchmark against the commit before Serve's throughput mode."""
    st, opts = cp["summary"], cp["setting"]
    lines = ["## Control plane: CPU per request", "",
             f"`benchmarks/control_plane_cpu.py`: `srserve serve deployments/local.yaml` (srd-tiny on CPU, one "
             f"replica per stage), {opts['requests']} default requests sent {opts['concurrency']} at a time, each "
             f"client polling its job every {opts['poll_s']:g} s; CPU (utime + stime from /proc) of the JobStore and "
             f"Ingress replicas over the load, per request. Every Serve replica also burns CPU idle (Ray's core "
             f"worker, Serve's metrics and health loops), whatever srserve does: that floor is measured on the same "
             f"server for {opts['idle_s']:g} s before the load, and *marginal* = raw minus floor x duration / "
             f"requests. {opts['repeats']} repeats, the current code and the baseline (commit "
             f"`{opts.get('baseline') or '-'}`) alternating in one run; ms per request, median [min, max].", "",
             *_cpu_table(cp)]
    if serve_mode:
        lines += ["", f"Serve's throughput mode alone (`srserve/serving/serve_env.py`: HAProxy in front, the "
                      f"Ingress serving HTTP itself, JobStore calls over gRPC): a second run of the same load, the "
                      f"code with it (`{serve_mode['setting'].get('commit') or 'current'}`) against "
                      f"`{serve_mode['setting']['baseline']}`, the code just before it, "
                      f"{serve_mode['setting']['repeats']} repeats alternating:", "", *_cpu_table(serve_mode)]
    floors = {name: rs[0]["idle_ms_per_s"] for name, rs in cp["runs"].items()}
    for name, f in floors.items():
        parts = ", ".join(f"{k.replace('replica ', '')} {v:.1f}" for k, v in sorted(f.items()) if v >= 1.0)
        lines.append(f"\nIdle floor ({name}, first repeat, ms of CPU per second): {parts}.")
    lines += ["", "What changed: progress reports follow time (one `report` call per denoising replica per "
              "`progress_interval_s`, default 1 s, for all its jobs; a DELETE stops a running stage at the first "
              "step boundary after the next report); stage starts and ends ride with the job and reach the store "
              "with Decode's result; leases renew in a column (one `watch` call per ingress per second); polls for "
              "jobs an ingress drives are answered from its last watchdog round; the job's first attempt begins "
              "in the `create` call; the store's methods run on its event loop; Serve's metrics flush once a "
              "second, not ten times (`RAY_SERVE_METRICS_EXPORT_INTERVAL_MS=1000`, set by `srserve serve` and the "
              "k8s manifests); `srserve serve` runs Serve's throughput mode behind HAProxy, so a status poll costs "
              "the Ingress a uvicorn request instead of a proxy hop plus a handle call, and a store call goes over "
              "gRPC; `complete_and_get` hands the driver the final record, so a client's last polls read no "
              "store.", ""]
    goals = []
    if "current" in st:
        m, raw = st["current"]["control_plane_marginal_ms"]["median"], st["current"]["control_plane_ms"]["median"]
        base = st.get("baseline", {}).get("control_plane_ms", {}).get("median")
        goals.append(("JobStore + Ingress CPU <= 30 ms per request (marginal: above Ray's idle floor)",
                      f"{m:.1f} ms marginal, {raw:.1f} ms raw" + (f" (baseline {base:.0f} ms raw)" if base else ""),
                      m <= 30.0))
    return lines, goals


def hop_section(hb: list[dict[str, Any]]) -> list[str]:
    lines = ["## Bytes per hop", "",
             "`benchmarks/hop_bytes.py`: what each hop of a disaggregated request moves in srserve's wire form. "
             "srd-tiny states come from the engine; the Wan2.1 480p x 81 state is built without weights (latents "
             "16x21x60x104 float32, embeddings 2 x 512 x 4096 bfloat16, UniPC stepped to k with random outputs, so "
             "its multistep history has its real size). Decode gets the latents and the family's state only; the "
             "embeddings are put into the object store once and fetched by both denoising stages.", "",
             "| model | hop | state (kB) | + embeddings by reference (kB) | whole state, for contrast (kB) |",
             "|---|---|---|---|---|"]
    for r in hb:
        for name, h in r["hops"].items():
            if "->" in name:
                lines.append(f"| {r['model']} ({r['shape']}, k={r['switch_step']}) | {name} | "
                             f"{h['state'] / 1e3:,.1f} | {h['embeddings_by_reference'] / 1e3:,.1f} | "
                             f"{h['whole_state'] / 1e3:,.1f} |")
        lines.append(f"| | all hops | {r['hops']['total_moved'] / 1e3:,.1f} | (put once: "
                     f"{r['hops']['embeddings_put_once'] / 1e3:,.1f}) | |")
    return lines + [""]


def cache_section(cc: dict[str, Any]) -> tuple[list[str], list[tuple]]:
    rows = cc["rows"]
    sr = next(r for r in rows if r["config"] == "sr")
    lines = ["## Step caches on top of SR", "",
             f"`benchmarks/cache_compare.py`: {cc.get('videos', '?')} held-out prompt x seed pairs of srd-tiny, SR "
             f"(`{sr.get('switch', 'adaptive')}`) with each diffusers cache on the sketch or the render model, in "
             "one process, configurations alternating per video; accuracy in %, PSNR against large-only (`none`) "
             "and against SR alone; speedup = SR's denoising seconds / the configuration's, paired per video.", "",
             "| config | color | shape | motion | PSNR vs none | PSNR vs SR | large steps | speedup vs SR |",
             "|---|---|---|---|---|---|---|---|"]
    best = None
    for r in rows:
        p = r["speedup_vs_sr_paired"]
        vs_none = "ref" if r["config"] == "none" else f"{r['psnr']:.1f}"
        lines.append(f"| `{r['config']}` | {r['color_acc']:.1f} | {r['shape_acc']:.1f} | {r['motion_acc']:.1f} "
                     f"| {vs_none} "
                     f"| {r['psnr_vs_sr']:.1f} | {r['large_steps_mean']:.1f} | {r['speedup_vs_sr']:.2f}x "
                     f"[{p['min']:.2f}, {p['max']:.2f}] |")
        if r["config"] in ("sr", "none"):
            continue
        lossless = all(r[k] >= sr[k] - 1.0 for k in ("color_acc", "shape_acc", "motion_acc"))
        if lossless and (best is None or r["speedup_vs_sr"] > best["speedup_vs_sr"]):
            best = r
    ok = best is not None and best["speedup_vs_sr"] >= 1.3
    measured = "no configuration within 1 point on every attribute" if best is None else \
        f"best within 1 point: `{best['config']}` at {best['speedup_vs_sr']:.2f}x"
    return lines + [""], [("SR + one cache >= 1.3x over SR alone at <= 1 point loss on every attribute",
                           measured, ok)]


def before_after_section(before: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], list[tuple]]:
    """Key serving figures of the run before the lean path (its date) beside this run's, and the ratio goal."""
    rows = []
    for setup in SETUP_LABELS:
        b, n = before["summary"].get(setup, {}), now["summary"].get(setup, {})
        if not (b or n):
            continue
        cells = []
        for src in (b, n):
            sat, u = src.get("saturation", {}), src.get("unloaded", {})
            cells.append((med(sat.get("throughput_rps")), med(u.get("p50")), med(u.get("handoff_s")),
                          med(u.get("handoff_bytes"))))
        rows.append((setup, cells))
    lines = ["## Serving before and after the lean path", "",
             f"The same benchmark (`serving_compare.py`) before (run of {before['date'][:10]}, commit 8b74458: "
             f"`benchmarks/results/before-lean/`) and now ({now['date'][:10]}). Different days on a shared machine: "
             "compare the ratios within each run, not absolute figures across runs.", "",
             "| setup | saturation req/s before | now | unloaded p50 s before | now | all hops ms before | now "
             "| bytes moved per request kB before | now |", "|---|---|---|---|---|---|---|---|---|"]

    def g(x: float | None, d: int, scale: float = 1.0) -> str:
        return "-" if x is None else f"{x * scale:.{d}f}"

    for setup, (b, n) in rows:
        lines.append(f"| {SETUP_LABELS[setup]} | {g(b[0], 2)} | {g(n[0], 2)} | {g(b[1], 3)} | {g(n[1], 3)} "
                     f"| {g(b[2], 1, 1e3)} | {g(n[2], 1, 1e3)} | {g(b[3], 0, 1e-3)} | {g(n[3], 0, 1e-3)} |")
    goals = []
    for label, src in (("before", before), ("now", now)):
        t = {k: med(src["summary"].get(k, {}).get("saturation", {}).get("throughput_rps")) for k in SETUP_LABELS}
        if t.get("colocated-sr") and t.get("disaggregated-sr"):
            ratio = t["disaggregated-sr"] / t["colocated-sr"]
            lines.append(f"\nDisaggregated / colocated saturation throughput, {label}: {ratio:.2f}.")
            if label == "now":
                goals.append((f"disaggregated >= 0.90x colocated saturation throughput at {now['workers']} workers",
                              f"{t['disaggregated-sr']:.2f} vs {t['colocated-sr']:.2f} req/s: {ratio:.2f}x "
                              f"(before: see the table)", ratio >= 0.90))
    return lines + [""], goals
