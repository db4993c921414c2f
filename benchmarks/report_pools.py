"""REPORT.md's "Simulated pools" section (issue 13 point 6): equal GPUs (pools_sim.json), mixed fleets (fleets.json),
the load step (load_step.json, load_step.png) and the replicas' memory (sim_memory.json), each read from the JSON
its benchmark wrote."""
from __future__ import annotations

from pathlib import Path
from typing import Any

SETUPS = ("large-only", "colocated-sr", "disaggregated-sr", "disaggregated-flex-sr")


def _n(x: Any, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pools(pools: dict[str, int]) -> str:
    return " + ".join(f"{n} {name}" for name, n in pools.items()) if len(pools) > 1 else str(sum(pools.values()))


def equal_gpus(p: dict[str, Any]) -> tuple[list[str], list[tuple]]:
    tf = p["time_factor"]
    lines = ["### Equal GPUs: large-only, colocated SR, disaggregated SR (simulated H100s)", "",
             f"`benchmarks/pools_sim.py` ({p['wall_seconds'] / 60:.0f} min here, {p['date']}): the serving stack with "
             f"simulated {p['gpu'].upper()}s at time factor {tf:g} (simulated seconds x {tf:g} = real), "
             f"{p['request']}. Saturation: a closed loop of {p.get('concurrency_factor', 1.5):g} clients per GPU, "
             "completions between the first and last `clients` left out (fill and drain); 50% and 80% load: Poisson "
             "at that fraction of the setup's own measured saturation. Disaggregated pools at the split of the "
             "GPUs that the planner's model rates best (Encode and Decode on fractions of render GPUs); "
             "disaggregated-flex-sr, where that split leaves a remainder, adds flex GPUs (Colocated replicas "
             "beside the pools, AppArgs.flex: a job runs whole on a free one, else through the pools) at the best "
             "split with them (`srserve.sim.plan.best_whole_gpu_split`). Sketch and "
             f"Render replicas hold {p.get('stage_queue', 16)} requests each (the rest wait in the caller's router "
             "for the first free replica). Figures in simulated units; `plan` = the planner's pool bound "
             "(min over pools of replicas / mean service seconds).", "",
             "| GPUs | setup | pools | saturation videos/h (plan) | vs colocated | busy | unloaded p50 | "
             "50% load p50 / p95 / p99 | 80% load p50 / p95 / p99 | 80% p99 / unloaded p50 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    goals: list[tuple] = []
    by = {(r["gpus"], r["setup"]): r for r in p["rows"]}
    for (gpus, setup), r in sorted(by.items(), key=lambda kv: (kv[0][0], SETUPS.index(kv[0][1]))):
        sat = r["saturation"]["throughput_per_sim_hour"]
        co = by.get((gpus, "colocated-sr"), {}).get("saturation", {}).get("throughput_per_sim_hour")
        ratio = sat / co if sat and co else None
        busy = r["saturation"].get("busy_fraction") or {}
        unloaded = r.get("unloaded", {}).get("latency_sim_s", {}).get("p50")

        def q(level: str) -> str:
            lat = r.get(level, {}).get("latency_sim_s") or {}
            return " / ".join(_n(lat.get(k)) for k in ("p50", "p95", "p99"))

        p99 = (r.get("load-0.8", {}).get("latency_sim_s") or {}).get("p99")
        lines.append(f"| {gpus} | {setup} | {_pools(r['plan']['pools'])} | {_n(sat, 1)} "
                     f"({r['plan']['bound_rps'] * 3600:.1f}) | {_n(ratio, 2)} | "
                     f"{' / '.join(f'{v:.2f}' for v in busy.values()) or '-'} | {_n(unloaded)} | {q('load-0.5')} | "
                     f"{q('load-0.8')} | {_n(p99 / unloaded if p99 and unloaded else None, 2)} |")
        if setup in ("disaggregated-sr", "disaggregated-flex-sr") and ratio is not None:
            plan_ratio = r["plan"]["bound_rps"] / by[(gpus, "colocated-sr")]["plan"]["bound_rps"]
            what = "disaggregated" if setup == "disaggregated-sr" else "disaggregated with flex GPUs"
            goals.append((f"{what} >= 0.97x colocated saturation throughput, {gpus} simulated H100s",
                          f"{ratio:.2f}x (the planner's bounds: {plan_ratio:.2f}x)",
                          ratio >= 0.97))
        if sat and r["plan"]["bound_rps"]:
            agree = sat / (r["plan"]["bound_rps"] * 3600)
            goals.append((f"planner throughput within 10% of the simulation: {setup}, {gpus} GPUs",
                          f"simulated {agree:.2f}x the plan", abs(agree - 1) <= 0.10))
    return lines + [""], goals


def with_controller(on: dict[str, Any], off: dict[str, Any] | None) -> tuple[list[str], list[tuple]]:
    """The load levels rerun with the SLO controller on (pools_sim.py --slo-factor), beside the run without."""
    before = {(r["gpus"], r["setup"]): r for r in (off or {}).get("rows", [])}
    lines = ["", f"The same pools at 80% load with the SLO controller on (`pools_sim.py --slo-factor "
             f"{on['slo_factor']:g}`: p95 target {on['slo_factor']:g}x the unloaded p50, floor "
             f"{on['floor_steps']} of 50 sketch steps; saturation rates from the run above):", "",
             "| GPUs | setup | unloaded p50 | 80% p50 / p95 / p99, controller off | controller on | p99 / unloaded, "
             "off / on | mean switch step, off / on |", "|---|---|---|---|---|---|---|"]
    goals: list[tuple] = []
    for r in on["rows"]:
        unloaded = r.get("unloaded", {}).get("latency_sim_s", {}).get("p50")
        b = before.get((r["gpus"], r["setup"]), {})
        lat_on, lat_off = (x.get("load-0.8", {}).get("latency_sim_s") or {} for x in (r, b))

        def q(lat: dict) -> str:
            return " / ".join(_n(lat.get(k)) for k in ("p50", "p95", "p99"))

        def ratio(lat: dict) -> float | None:
            return lat["p99"] / unloaded if lat.get("p99") and unloaded else None

        ks = [x.get("load-0.8", {}).get("mean_switch_step") for x in (b, r)]
        lines.append(f"| {r['gpus']} | {r['setup']} | {_n(unloaded)} | {q(lat_off)} | {q(lat_on)} | "
                     f"{_n(ratio(lat_off), 2)} / {_n(ratio(lat_on), 2)} | {_n(ks[0], 1)} / {_n(ks[1], 1)} |")
        if ratio(lat_on) is not None:
            goals.append((f"p99 at 80% load <= 2x unloaded, controller on: {r['setup']}, {r['gpus']} GPUs",
                          f"{ratio(lat_on):.2f}x", ratio(lat_on) <= 2.0))
    return lines + [""], goals


def mixed_fleets(f: dict[str, Any]) -> tuple[list[str], list[tuple]]:
    pl = f["planner"]
    per_flop = ", ".join(f"{g} {v:.2f}" for g, v in sorted(pl["price_per_dense_pflop_hour"].items(),
                                                            key=lambda kv: kv[1]))
    lines = ["### Mixed fleets: $ per video at equal p95", "",
             f"`benchmarks/fleets.py`: the planner sizes, for each arrival rate, the cheapest fleet whose p95 meets "
             f"{pl['slo_p95_s']:g} s: colocated SR on each GPU that holds both models, and disaggregated SR for each "
             "sketch x render GPU pair of the cost table (srserve/sim/costs.json). `break-even` is the render GPU's "
             f"price per hour at which the mixed fleet would cost {f['goal_ratio']:g}x the best colocated one "
             "(re-sized at each price; `never`: the sketch pool alone costs more). List price per dense bf16 "
             f"PFLOP-hour: {per_flop}.", "",
             "| rate /s | best colocated | $/video | mixed fleet (sketch H100) | $/video | vs best colocated | "
             "render list $/h | break-even $/h |", "|---|---|---|---|---|---|---|---|"]
    goals: list[tuple] = []
    for row in pl["rows"]:
        co = row["best_colocated"]
        co_text = f"{co['gpus']} {next(iter(co['pools'].values()))['gpu']}" if co else "none fits"
        for m in row["disaggregated"]:
            if m["sketch_gpu"] != "h100" or m["render_gpu"] == "h100" or not m["feasible"]:
                continue
            pools = " + ".join(f"{v['replicas']} {v['gpu']} ({'/'.join(v['roles'])})" for v in m["pools"].values())
            be = m.get("break_even_render_price")
            lines.append(f"| {row['rate']:g} | {co_text} | {co['dollars_per_video']:.3f} | {pools} | "
                         f"{m['dollars_per_video']:.3f} | {m.get('ratio_to_best_colocated', 0):.2f}x | "
                         f"{m['render_list_price']:.2f} | {'never' if be is None else f'{be:.2f}'} |")
        best = row["best_mixed"]
        if best:
            goals.append((f"a mixed fleet at <= 0.8x the best colocated $/video (rate {row['rate']:g}/s, SLO "
                          f"{pl['slo_p95_s']:g} s)", f"best: {best['sketch_gpu']} + {best['render_gpu']} at "
                          f"{best['ratio_to_best_colocated']:.2f}x", best["ratio_to_best_colocated"] <= 0.8))
    if f.get("simulated"):
        lines += ["", f"Simulated at the planner's sizes (time factor "
                  f"{f['time_factor']:g}, Poisson arrivals):", "",
                  "| fleet | pools | requests | p50 / p95 / p99 sim s (plan p95) | $/video measured (plan) |",
                  "|---|---|---|---|---|"]
        for s in f["simulated"]:
            m, lat = s["measured"], s["measured"]["latency_sim_s"]
            lines.append(f"| {s['fleet']} | {_pools(s['pools'])} | {m['completed']}/{m['submitted']} | "
                         f"{_n(lat['p50'])} / {_n(lat['p95'])} / {_n(lat['p99'])} ({_n(s['plan']['p95_s'])}) | "
                         f"{_n(m['dollars_per_video'], 3)} ({s['plan']['dollars_per_video']:.3f}) |")
    return lines + [""], goals


def load_step(ls: dict[str, Any], out: Path) -> tuple[list[str], list[tuple]]:
    o = ls["options"]
    lines = ["### Load step: autoscaling and the SLO-driven switch cap", "",
             f"`benchmarks/load_step.py` ({ls['wall_seconds'] / 60:.0f} min here): "
             f"deployments/sim-wan2.1-h100.yaml at time factor {o['time_factor']:g}, Poisson arrivals at "
             f"{o['base_rate']:g}/s (1x), then 2x, then 1x, {o['phase_s'] / 60:g} simulated minutes each (after "
             f"{o.get('warmup_s', 0) / 60:g} min of 1x not counted; the replicas report arrival rates over "
             f"{o.get('stats_window_s', 60 / o['time_factor']):g} simulated s); SLO p95 "
             f"{o['slo']:g} s. fixed: {o['sketch_fixed']} sketch + {o['render_fixed']} render GPUs; autoscale: the "
             f"stage-ratio policy from there (target utilization {o.get('target_utilization', 0.8):g}), sketch at "
             f"most {o['sketch_max']} GPUs, render {o['render_max']}; "
             f"autoscale+slo: the same with the switch cap (floor {o['floor_steps']} of 50 steps). Quality: the "
             "worst attribute of srd-tiny's quality table at the switch steps the jobs got (scaled to its 30 "
             "steps), against the uncapped adaptive mean.", "",
             "![load step](load_step.png)", "",
             "| setup | phase | jobs | p95 sim s | within SLO | mean switch step | capped jobs |",
             "|---|---|---|---|---|---|---|"]
    for setup, r in ls["setups"].items():
        for p in r["phases"]:
            lines.append(f"| {setup} | {p['phase']} | {p['jobs']} | {_n(p['p95_sim_s'])} | "
                         f"{_n(p['slo_attainment'] and 100 * p['slo_attainment'])}% | "
                         f"{_n(p['mean_switch_step'], 1)} | {p['capped_jobs']} |")
    lines += ["", "| setup | overall p95 sim s | within SLO | sketch / render GPU-hours | quality (worst "
              "attribute, %) vs uncapped |", "|---|---|---|---|---|"]
    goals: list[tuple] = []
    for setup, r in ls["setups"].items():
        g = r["gpu_sim_hours"]
        lines.append(f"| {setup} | {_n(r['p95_sim_s'])} | {_n(r['slo_attainment'] and 100 * r['slo_attainment'])}% "
                     f"| {g['sketch']:.2f} / {g['render']:.2f} | {_n(r['quality_worst_attribute_mean'], 1)} vs "
                     f"{_n(r['quality_at_uncapped_adaptive'], 1)} |")
    ctl, fixed = ls["setups"].get("autoscale+slo"), ls["setups"].get("fixed")
    if ctl and fixed:
        step = next(p for p in ctl["phases"] if p["phase"] == "2x")
        fixed_step = next(p for p in fixed["phases"] if p["phase"] == "2x")
        loss = None
        if ctl["quality_worst_attribute_mean"] is not None and ctl["quality_at_uncapped_adaptive"] is not None:
            loss = ctl["quality_at_uncapped_adaptive"] - ctl["quality_worst_attribute_mean"]
        ok = step["p95_sim_s"] is not None and step["p95_sim_s"] <= o["slo"] and (loss is None or loss <= 2)
        goals.append(("load step: p95 within the SLO at 2x with autoscaling + controller where fixed adaptive "
                      "breaks it, <= 2 points of quality", f"2x p95 {_n(step['p95_sim_s'])} s (fixed "
                      f"{_n(fixed_step['p95_sim_s'])} s, SLO {o['slo']:g}); quality loss {_n(loss, 1)} points",
                      ok and (fixed_step["p95_sim_s"] or 0) > o["slo"]))
    return lines + [""], goals


def replica_memory(m: dict[str, Any], before: dict[str, Any] | None) -> tuple[list[str], list[tuple]]:
    """The memory of simulated replicas (sim_memory.json), beside the torch engine's when that run is there."""
    old = {r["deployment"]: r for r in (before or {}).get("rows", [])}
    lines = ["### Memory of a simulated replica", "",
             f"`benchmarks/sim_memory.py` ({m['date']}): deployments/sim-wan2.1-h100.yaml with fixed pools, "
             f"{m['requests']} requests {m['concurrency']} at a time; the largest figure per replica, MB, from "
             f"/proc/PID/smaps_rollup. Replicas that imported torch: {', '.join(m['torch_imported']) or 'none'}."
             + (" Before: the torch sim engine, same script (sim_memory_torch_engine.json)." if old else ""), "",
             "| replica | idle RSS | idle PSS | loaded anonymous | loaded RSS (object-store pages read in place "
             "included) |" + (" before: idle RSS / loaded anonymous |" if old else ""),
             "|---|---|---|---|---|" + ("---|" if old else "")]
    worst = 0.0
    for row in m["rows"]:
        if row["deployment"] not in ("Encode", "Sketch", "Render", "Decode"):
            continue
        idle, loaded = row.get("idle", {}), row.get("loaded", {})
        worst = max(worst, idle.get("rss", 0.0))
        was = old.get(row["deployment"], {})
        lines.append(f"| {row['deployment']} | {_n(idle.get('rss'))} | {_n(idle.get('pss'))} | "
                     f"{_n(loaded.get('anon'))} | {_n(loaded.get('rss'))} |"
                     + (f" {_n(was.get('idle', {}).get('rss'))} / {_n(was.get('loaded', {}).get('anon'))} |"
                        if old else ""))
    goals = [("an idle simulated replica <= ~250 MB RSS, no torch", f"{worst:.0f} MB (largest of Encode, Sketch, "
              f"Render, Decode); torch imported by: {', '.join(m['torch_imported']) or 'none'}",
              worst <= 250 and not m["torch_imported"])]
    return lines + [""], goals


def pools_section(out: Path, load: Any) -> tuple[list[str], list[tuple]]:
    """The section, from whichever of the three JSON files exist."""
    lines, goals = ["## Simulated pools", "",
                    "The serving stack on simulated GPUs (docs/simulation.md): replicas load no weights and sleep the "
                    "cost table's seconds x a time factor. Regenerate: `benchmarks/pools_all.sh`.", ""], []
    equal, slo = load(out / "pools_sim.json"), load(out / "pools_sim_slo.json")
    if equal:
        sec, g = equal_gpus(equal)
        lines, goals = lines + sec, goals + g
    if slo:
        sec, g = with_controller(slo, equal)
        lines, goals = lines + sec, goals + g
    fleets = load(out / "fleets.json")
    if fleets:
        sec, g = mixed_fleets(fleets)
        lines, goals = lines + sec, goals + g
    data = load(out / "load_step.json")
    if data:
        sec, g = load_step(data, out)
        lines, goals = lines + sec, goals + g
    memory = load(out / "sim_memory.json")
    if memory:
        sec, g = replica_memory(memory, load(out / "sim_memory_torch_engine.json"))
        lines, goals = lines + sec, goals + g
    return (lines, goals) if len(lines) > 4 else ([], [])
