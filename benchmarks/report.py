"""Write benchmarks/results/REPORT.md and its PNG plots from the JSON the benchmarks wrote.

    .venv/bin/python benchmarks/report.py --results benchmarks/results

Reads sr_speedup.json (single request), quality.json (the srd-tiny quality table), serving.json (the serving
comparison), control_plane_cpu.json, hop_bytes.json, cache_compare.json, before-lean/serving.json (the serving
comparison before the lean path, for the figures beside), pools_sim.json, pools_sim_slo.json, fleets.json and
load_step.json (simulated pools, benchmarks/pools_all.sh) and, when present, run_all.json (the wall time of each step). Missing inputs leave their section out.
The goals are stated with what was measured; nothing here changes a measurement.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_lean import before_after_section, cache_section, control_plane_section, hop_section  # noqa: E402
from report_notes import serving_notes  # noqa: E402
from report_pools import pools_section  # noqa: E402
from report_plots import SETUP_LABELS, med, plot_quality, plot_serving, plot_single_request  # noqa: E402


def load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def mmm(s: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    """median [min, max] of a spread."""
    if not s:
        return "-"
    if s["min"] == s["max"]:
        return f"{s['median'] * scale:.{digits}f}"
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}, {s['max'] * scale:.{digits}f}]"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "**met**" if ok else "**not met**"


# --- sections ---------------------------------------------------------------------------------------------------
def single_request(sr: dict, out: Path) -> tuple[list[str], list[tuple]]:
    lines = ["## Single request: SR speedup against the compute-bound limit", "",
             f"`benchmarks/sr_speedup.py`, in-process, {sr['threads']} torch thread, {sr['steps']} steps, "
             f"{sr.get('size', '')} x {sr.get('frames', '')} frames, {sr['repeats']} repeats alternating policies. "
             f"Per guided step: sketch {mmm(sr['sketch_step_seconds'], 1, 1e3)} ms, render "
             f"{mmm(sr['render_step_seconds'], 1, 1e3)} ms, so r = {sr['per_step_ratio_r']:.2f}. "
             "Speedup is of the denoising loop over `none` (large model only); limit = N / (k + (N - k) / r); "
             "end to end adds encode and decode, which SR does not shorten.", "",
             "| policy | switch step k | limit | denoise speedup, median [min, max] | fraction of limit "
             "| end-to-end speedup |", "|---|---|---|---|---|---|"]
    goals = []
    for row in sr["policies"]:
        lines.append(f"| `{row['policy']}` | {row['switch_step']:g} | {row['limit']:.2f}x "
                     f"| {mmm(row['denoise_speedup_repeats'], 2)} | {row['fraction_of_limit']:.3f} "
                     f"| {row['end_to_end_speedup']:.2f}x |")
        goals.append((f"single-request SR `{row['policy']}` >= 0.97 of the limit",
                      f"{row['fraction_of_limit']:.3f} of {row['limit']:.2f}x", row["fraction_of_limit"] >= 0.97))
    plot_single_request(sr, out)
    return lines + ["", "![single request](sr_speedup.png)", ""], goals


def quality_section(q: dict, out: Path) -> list[str]:
    lines = ["## Quality next to speed (srd-tiny quality table)", "",
             f"`srserve tiny quality`: {q['videos']} held-out prompt x seed pairs, {q['steps']} steps, "
             f"{q['torch_threads']} torch thread(s), one request at a time. Accuracy in %; PSNR/SSIM against the "
             "large-only video of the same seed; cost = large-model steps per video and wall seconds (denoise + "
             "decode, median [min, max]).", "",
             "| policy | color | shape | motion | all three | PSNR dB | SSIM | large steps | seconds | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in q["rows"]:
        ref = r["policy"] == "none"
        psnr = "ref" if ref else ("inf" if r["psnr"] in (None, float("inf")) else f"{r['psnr']:.1f}")
        lines.append(f"| `{r['policy']}` | {r['color_acc']:.1f} | {r['shape_acc']:.1f} | {r['motion_acc']:.1f} "
                     f"| {r['all_acc']:.1f} | {psnr} | {'ref' if ref else f(r['ssim'])} | "
                     f"{r['large_steps_mean']:.1f} | {mmm(r['seconds'])} | {r['speedup_vs_none']:.2f}x |")
    points = [(r["seconds"]["median"], r["all_acc"], r["policy"]) for r in q["rows"]]
    frontier, best = set(), -1.0
    for x, y, name in sorted(points):
        if y > best:
            frontier.add(name)
            best = y
    plot_quality(points, frontier, out)
    lines += ["", f"Pareto-optimal (no policy is both faster and more accurate): {', '.join(sorted(frontier))}.",
              "", "![quality vs latency](quality_pareto.png)", ""]
    return lines


def serving_section(s: dict, out: Path) -> tuple[list[str], list[tuple]]:
    cal, split, summ = s["calibration"], s["pool_split"], s["summary"]
    setups = [k for k in SETUP_LABELS if k in summ]
    levels = sorted({p for v in summ.values() for p in v if p.startswith("load-")}, key=lambda p: float(p[5:]))
    sr = cal["in_process"]["sr"]
    slo_common = (s.get("slo_s") or {}).get("2x_large_only_unloaded")
    lines = [
        "## Serving: large-only vs colocated SR vs disaggregated SR", "",
        f"`benchmarks/serving_compare.py`: one local Ray cluster, {s['workers']} workers "
        f"({'one pinned core each' if s['pinned'] else 'unpinned'}, {s['threads_per_replica']} torch thread per "
        f"replica), device {s['device']}, model `{s['model']}`, requests of {cal['steps']} steps at {cal['size']} x "
        f"{cal['frames']} frames, SR setups with switch `{cal['switch']}`, prompts cycled over the domain's 72. "
        f"Each repeat deploys the three setups one after the other with `serve.run`, runs all phases of one and "
        f"deletes it before the next (an idle app left deployed on the same cores slowed the measured one by "
        f"~25%); the order rotates each repeat ({s['options']['repeats']} repeats; numbers are median [min, max] "
        f"over repeats). The Ray/Serve control plane, HTTP proxy, ingress, job store and the load generator "
        f"share the same {s['machine']['cores']} cores, unpinned.", "",
        f"- **Pool sizes from the stage cost ratio** (measured in-process at the start of the run): per request the "
        f"sketch pool needs {split['sketch_pool_s_per_request']:.3f} s (k = {sr['switch_step']:g} of "
        f"{cal['steps']} steps at {cal['sketch_step_s'] * 1e3:.1f} ms) and the render pool, which also runs encode "
        f"and decode, {split['render_pool_s_per_request']:.3f} s (render {sr['render_seconds']:.3f}, decode "
        f"{sr['decode_seconds']:.3f}, encode {sr['encode_seconds']:.3f}). The ideal sketch share is "
        f"{split['sketch_share']:.2f} of the workers; with {s['workers']} workers that rounds to "
        f"**{split['sketch_workers']} sketch + {split['render_workers']} render**.",
        f"- **Latency** is the server's (job created -> completed, from `GET /v1/jobs/{{id}}`). p99 over ~30 "
        f"requests is close to the maximum. **SLO** = 2x the unloaded median latency of large-only"
        f"{f' = {slo_common:.2f} s' if slo_common else ''} (same for all setups); *own SLO* = 2x the setup's own "
        f"unloaded median. A refused, failed or unfinished request counts as a miss.",
        f"- **Saturation** = closed loop with {s['options']['concurrency']} requests in flight, throughput between "
        f"the pipeline filling and draining. Open-loop Poisson loads are fractions of the saturation throughput "
        f"the same setup reached in the same repeat ({s['options']['level_count']} requests each; *arrived* is "
        f"the realised arrival rate, *achieved* completions over the span from first arrival to last completion).",
        "",
        "| setup | unloaded p50 s | saturation req/s | busy at saturation | handoff per request | "
        "sketch->render handoff |", "|---|---|---|---|---|---|"]
    for setup in setups:
        u, sat = summ[setup].get("unloaded", {}), summ[setup].get("saturation", {})
        busy = ", ".join(f"{p} {mmm(v, 2)}" for p, v in (sat.get("busy_fraction") or {}).items())
        lines.append(f"| {SETUP_LABELS[setup]} | {mmm(u.get('p50'))} | {mmm(sat.get('throughput_rps'))} | {busy} "
                     f"| {mmm(u.get('handoff_bytes'), 0, 1e-3)} kB, {mmm(u.get('handoff_s'), 1, 1e3)} ms "
                     f"| {mmm(u.get('render_handoff_bytes'), 0, 1e-3)} kB, {mmm(u.get('render_handoff_s'), 1, 1e3)}"
                     f" ms |")
    lines += ["", "Handoff = serialise (sender) + transit (object store and the hop to the next replica) + "
              "deserialise (receiver), summed over the hops that moved a state (encode->sketch->render->decode); "
              "unloaded, so no queueing enters the transit. Colocated setups hand over in memory.", ""]
    lines += handoff_detail(s)
    lines += ["| setup | load | offered req/s | arrived | achieved | p50 s | p90 s | p99 s | SLO attainment | "
              "own SLO | busy |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for setup in setups:
        for phase in ["unloaded", "saturation", *levels]:
            e = summ[setup].get(phase)
            if not e:
                continue
            busy = ", ".join(f"{p} {mmm(v, 2)}" for p, v in (e.get("busy_fraction") or {}).items())
            open_loop = phase.startswith("load-")
            lines.append(f"| {SETUP_LABELS[setup]} | {phase} | {mmm(e.get('offered_rps'), 2)} "
                         f"| {mmm(e.get('arrival_rps'), 2) if open_loop else '-'} "
                         f"| {mmm(e.get('throughput_rps'), 2)} | {mmm(e.get('p50'))} | {mmm(e.get('p90'))} "
                         f"| {mmm(e.get('p99'))} | {mmm(e.get('slo_common'), 2)} | {mmm(e.get('slo_own'), 2)} "
                         f"| {busy} |")
    plot_serving(s, setups, levels, compute_bound(s), out)
    lines += ["", "![latency vs load](latency_vs_load.png) ![throughput](throughput.png)", ""]
    lines += cpu_table(s, setups)
    lines += serving_notes(s)
    return lines, serving_goals(s, setups)


def cpu_table(s: dict, setups: list[str]) -> list[str]:
    """Where the cores went at saturation (from /proc, per process, median over repeats)."""
    sat = [r for r in s["runs"] if r["phase"] == "saturation" and r.get("cpu_cores")]
    if not sat:
        return []
    roles = sorted({role for r in sat for role in r["cpu_cores"]},
                   key=lambda role: (role.startswith(("serve", "ray", "load", "other")), role))
    lines = [f"CPU used at saturation, in cores of the machine's {s['machine']['cores']} (median over repeats; "
             "per process from /proc; *other processes* are anything outside this benchmark, a check that the "
             "machine was otherwise idle):", "", "| process | " + " | ".join(SETUP_LABELS[x] for x in setups) + " |",
             "|---" * (len(setups) + 1) + "|"]
    for role in roles + ["total"]:
        cells = []
        for setup in setups:
            values = [sum(r["cpu_cores"].values()) if role == "total" else r["cpu_cores"].get(role, 0.0)
                      for r in sat if r["setup"] == setup]
            cells.append(f"{statistics.median(values):.2f}" if values else "-")
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    other = max((r.get("cpu_cores", {}).get("other processes", 0.0) for r in s["runs"]), default=0.0)
    return lines + ["", f"Largest use by other processes in any phase: {other:.2f} cores.", ""]


def compute_bound(s: dict) -> dict[str, float] | None:
    """Large-only saturation throughput x N / mean(k + (N - k) / r) over the disaggregated run's switch steps;
    and the same counting the per-request encode + decode seconds, which SR does not shorten."""
    summ, cal = s["summary"], s["calibration"]
    n, r = cal["steps"], cal["per_step_ratio_r"]
    large = med(summ.get("large-only", {}).get("saturation", {}).get("throughput_rps"))
    ks = [k for run in s["runs"] if run["setup"] == "disaggregated-sr" and run["phase"] == "saturation"
          for k in run.get("switch_steps", []) if k is not None]
    if not large or not ks:
        return None
    factor = n / statistics.mean(k + (n - k) / r for k in ks)
    ip = cal["in_process"]
    fixed = {name: ip[name]["encode_seconds"] + ip[name]["decode_seconds"] for name in ("none", "sr")}
    steps_sr = statistics.mean(k * cal["sketch_step_s"] + (n - k) * cal["render_step_s"] for k in ks)
    amdahl = (fixed["none"] + n * cal["sketch_step_s"]) / (fixed["sr"] + steps_sr)
    return {"large": large, "factor": factor, "bound": large * factor, "mean_k": statistics.mean(ks), "r": r,
            "amdahl_factor": amdahl, "amdahl_bound": large * amdahl}


def handoff_detail(s: dict) -> list[str]:
    u = s["summary"].get("disaggregated-sr", {}).get("unloaded", {})
    state = s["calibration"].get("handoff_state")
    if not u.get("render_transit_s") or not state:
        return []
    ms = {k: med(u.get(f"render_{k}")) * 1e3 for k in ("serialize_s", "transit_s", "deserialize_s")}
    emb = f" + fetching the embeddings {med(u['render_embeddings_s']) * 1e3:.1f} ms" \
        if u.get("render_embeddings_s") else ""
    size = f"crosses as {state['wire'] / 1e3:.0f} kB (tensors out of band; the latents " \
           f"{state['latents'] / 1e3:.0f} kB), and the prompt embeddings (positive and negative, padded to the full " \
           f"text length, {state['prompt_embeddings'] / 1e3:.0f} kB) come by reference from the object store, put " \
           f"there once by Encode" if "wire" in state else f"pickles to {state['pickled'] / 1e3:.0f} kB"
    return [f"The sketch->render handoff, unloaded (median): serialise {ms['serialize_s']:.1f} ms + transit "
            f"{ms['transit_s']:.1f} ms + deserialise {ms['deserialize_s']:.1f} ms{emb}. The state {size}. The "
            "transit is mostly Serve's hop to the next replica (routing, RPC, scheduling), not bytes: on this "
            "machine a 350 kB object adds about 0.2 ms to a Ray actor call against a one-byte one (a one-off check "
            "outside this run).", ""]


def serving_goals(s: dict, setups: list[str]) -> list[tuple]:
    summ = s["summary"]
    tput = {k: med(summ[k].get("saturation", {}).get("throughput_rps")) for k in setups}
    goals = []
    b = compute_bound(s)
    if b and tput.get("disaggregated-sr"):
        t = tput["disaggregated-sr"]
        goals.append(("disaggregated SR throughput >= 0.95x compute bound (large-only x N/(k+(N-k)/r))",
                      f"{t:.2f} vs bound {b['bound']:.2f} req/s ({b['large']:.2f} x {b['factor']:.2f}; mean k = "
                      f"{b['mean_k']:.1f}, r = {b['r']:.2f}): {t / b['bound']:.2f}x", t >= 0.95 * b["bound"]))
        goals.append(("(context) the same bound counting encode + decode, which SR does not shorten",
                      f"{b['amdahl_bound']:.2f} req/s ({b['amdahl_factor']:.2f}x large-only): disaggregated at "
                      f"{t / b['amdahl_bound']:.2f}x of it", None))
    if tput.get("colocated-sr") and tput.get("disaggregated-sr"):
        ratio = tput["disaggregated-sr"] / tput["colocated-sr"]
        goals.append(("disaggregated SR throughput >= 0.95x colocated SR (equal workers)",
                      f"{tput['disaggregated-sr']:.2f} vs {tput['colocated-sr']:.2f} req/s: {ratio:.2f}x",
                      ratio >= 0.95))
    u = summ.get("disaggregated-sr", {}).get("unloaded", {})
    if u.get("handoff_s") and u.get("p50"):
        for label, key in (("sketch->render handoff", "render_handoff_s"), ("all hops", "handoff_s")):
            frac = med(u[key]) / med(u["p50"])
            goals.append((f"handoff <= 1% of request latency ({label}, unloaded)",
                          f"{med(u[key]) * 1e3:.1f} ms of {med(u['p50']):.3f} s = {100 * frac:.2f}%", frac <= 0.01))
    for setup in setups:
        level = summ[setup].get("load-0.8")
        unloaded = med(summ[setup].get("unloaded", {}).get("p50"))
        if level and unloaded and med(level.get("p99")):
            p99 = med(level["p99"])
            goals.append((f"p99 at 80% of saturation <= 2x unloaded, {SETUP_LABELS[setup]}",
                          f"{p99:.2f} s vs 2 x {unloaded:.2f} s: {p99 / unloaded:.2f}x", p99 <= 2 * unloaded))
    return goals


def real_shapes_section(g: dict) -> list[str]:
    lines = ["## Real shapes on the GPU (Wan2.1 14B and 1.3B, random weights)", "",
             f"`benchmarks/gpu/real_shapes.py` on {g['device']}, {g['dtype']}, latent {g['latent_shape']}, "
             f"{g['text_tokens']} text tokens; one CFG step (two forwards), {g['repeats']} repeats.", "",
             "| backend | model | step seconds, median [min, max] |", "|---|---|---|"]
    for backend, costs in g["step_seconds"].items():
        lines += [f"| {backend} | {name} | {mmm(c)} |" for name, c in costs.items()]
    lines += ["", "| backend | r | implied SR limit at k = 10 / 15 / 20 of 50 steps |", "|---|---|---|"]
    for backend, imp in g.get("implied_speedup", {}).items():
        by = imp["by_switch_step"]
        lines.append(f"| {backend} | {imp['per_step_ratio_r']:.2f} | "
                     f"{' / '.join(f'{by[str(k)] if str(k) in by else by[k]:.2f}x' for k in (10, 15, 20))} |")
    return lines + [""]


def header(results: Path, sr: dict | None, q: dict | None, s: dict | None, timings: dict | None) -> list[str]:
    lines = ["# srserve benchmarks", "",
             "Regenerate everything (single request, quality table, serving comparison, this report) with:", "",
             "```bash", "benchmarks/run_all.sh", "```", ""]
    if s:
        m, v = s["machine"], s["versions"]
        lines += [f"- **Date**: {s['date']}",
                  f"- **Machine**: {m['cpu']}, {m['cores']} cores, {m.get('memory_gib', '?')} GiB, "
                  f"device {m['device']}",
                  "- **Versions**: " + ", ".join(f"{k} {x}" for k, x in v.items())]
    model = (s or sr or {}).get("model")
    path = (sr or {}).get("model_path", "")
    lines.append(f"- **Model**: `{model}`" + (f" ({path})" if path else ""))
    if sr and "tiny-random" in str(sr.get("model")):
        lines.append("- **Warning**: the srd-tiny bundle was absent; these numbers are of the random-weight "
                     "stand-in and say nothing about quality.")
    if timings:
        parts = ", ".join(f"{k} {x:.0f} s" for k, x in timings.items())
        lines.append(f"- **Wall time of the run**: {parts}")
    return lines + [""]


def trust_section(out: Path, fairness: dict | None) -> tuple[list[str], list[tuple]]:
    """Fair scheduling and the fault table (issue 11): their own tables, as their benchmarks wrote them."""
    lines, goals = ["## Trust: fair scheduling and faults", ""], []
    if fairness:
        heavy = fairness["summary"].get("current", {}).get("heavy_default_s")
        if heavy:
            goals.append(("default job with four max-size jobs in flight <= 40 s", f"{heavy['max']:.1f} s (max over "
                          f"{heavy['n']} repeats)", heavy["max"] <= 40 and not fairness["summary"]["current"]
                          ["heavy_censored"]))
        lines += ["Fair scheduling (`benchmarks/fairness.py --repeats 2 --limit-s 150`; `baseline` = be1de64, "
                  "before it; current and baseline alternating on one idle machine):", "",
                  (out / "fairness.md").read_text() if (out / "fairness.md").exists() else "", ""]
    if (out / "faults.md").exists():
        lines += ["Fault table (`benchmarks/faults.py`): replicas killed with SIGKILL under a bounded load.", "",
                  (out / "faults.md").read_text().replace("# ", "", 1), ""]  # its title: a line of this section
    return (lines, goals) if len(lines) > 2 else ([], goals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args(argv)
    out = Path(args.results)
    sr, q, s = (load(out / n) for n in ("sr_speedup.json", "quality.json", "serving.json"))
    timings = load(out / "run_all.json")
    gpu = load(out / "real_shapes.json")
    body, goals = real_shapes_section(gpu) if gpu else [], []
    if sr:
        lines, g = single_request(sr, out)
        body += lines
        goals += g
    if q:
        body += quality_section(q, out)
    if s:
        lines, g = serving_section(s, out)
        body += lines
        goals += g
    cp, hb, cc = (load(out / n) for n in ("control_plane_cpu.json", "hop_bytes.json", "cache_compare.json"))
    before = load(out / "before-lean" / "serving.json")
    if cp:
        lines, g = control_plane_section(cp, load(out / "control_plane_cpu_serve_mode.json"))
        body += lines
        goals += g
    if hb:
        body += hop_section(hb)
    if cc:
        lines, g = cache_section(cc)
        body += lines
        goals += g
    if s and before:
        lines, g = before_after_section(before, s)
        body += lines
        goals += g
    lines, g = trust_section(out, load(out / "fairness.json"))
    body += lines
    goals += g
    lines, g = pools_section(out, load)
    body += lines
    goals += g
    table = ["## Goals: measured vs goal", "", "| goal | measured | verdict |", "|---|---|---|"]
    table += [f"| {name} | {value} | {verdict(ok) if ok is not None else 'context'} |" for name, value, ok in goals]
    text = "\n".join(header(out, sr, q, s, timings) + table + [""] + body)
    (out / "REPORT.md").write_text(text + "\n")
    print(f"wrote {out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
