"""What the stage replicas tell the application-level autoscaling policy (issue 13 point 3), and the checks a
config with that policy gets before Ray starts. No Ray cluster: the four stage classes run in this process on
the simulated model (no weights; each step sleeps the cost table's seconds x a time factor)."""
from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from srserve.config import GenerationRequest
from srserve.control import autoscale as a
from srserve.serving.jobs import SQLiteJobStore
from srserve.serving.messages import StageMessage
from fakes import FakeStoreHandle
from test_recovery import Ref, hop, new_job

TIME_FACTOR = 0.002
SKETCH_STEPS, NUM_STEPS = 10, 30
DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from srserve.serving import stages
    from srserve.sim.spec import SimSpec, write_sim_checkpoint

    tmp = tmp_path_factory.mktemp("sim")
    model = str(write_sim_checkpoint(tmp / "model", SimSpec(render_gpu="l40s", time_factor=TIME_FACTOR)))
    store = SQLiteJobStore(str(tmp / "jobs.sqlite"))
    handle = FakeStoreHandle(store)
    options = {"progress_interval_s": 0.05}
    encode = stages.Encode(model, handle, options)
    encode._put = lambda key, embeddings: Ref(embeddings)  # no Ray here: the "reference" holds the value
    return store, {"encode": encode, "sketch": stages.Sketch(model, handle, options),
            "render": stages.Render(model, handle, options),
            "decode": stages.Decode(model, handle, options, str(tmp / "artifacts"))}


def _run(chain, jobs: int) -> dict:
    store, built = chain

    async def main():
        for i in range(jobs):
            new_job(store, f"job{i}")
            request = GenerationRequest(prompt=f"a red circle {i}", seed=i, num_inference_steps=NUM_STEPS,
                                        num_frames=81, height=480, width=832, switch=f"step:{SKETCH_STEPS}")
            current = StageMessage(f"job{i}", 1, request, 16, False)
            for name in ("encode", "sketch", "render", "decode"):
                current = hop(await built[name](hop(current)))
    asyncio.run(main())
    return built


def test_replicas_report_costs_that_follow_the_switch_step(chain):
    from srserve.sim.costs import default_table

    built = _run(chain, 3)
    stats = {name: stage.record_autoscaling_stats() for name, stage in built.items()}
    for name, s in stats.items():  # nothing left inside; three requests started in the last minute
        assert s[a.METRIC_QUEUED] == 0 and s[a.METRIC_IN_FLIGHT] == 0, name
        assert s[a.METRIC_ARRIVALS] == pytest.approx(3 / 60), name
        assert s[a.METRIC_SECONDS] > 0, name
    table = default_table()
    sketch, render = stats["sketch"], stats["render"]
    assert sketch[a.METRIC_SWITCH_STEP] == SKETCH_STEPS and a.METRIC_SWITCH_STEP not in render
    assert sketch[a.METRIC_NUM_STEPS] == render[a.METRIC_NUM_STEPS] == NUM_STEPS
    # Seconds per step are what the simulated GPUs spend (14B on an H100, 1.3B on an L40S), x the time factor,
    # within what the sleeps and this process add; per request, that times the steps each stage ran.
    for s, model, gpu, steps in ((sketch, "wan2.1-t2v-14b", "h100", SKETCH_STEPS),
                                 (render, "wan2.1-t2v-1.3b", "l40s", NUM_STEPS - SKETCH_STEPS)):
        expected = table.step_seconds(model, gpu) * TIME_FACTOR
        assert expected * 0.9 < s[a.METRIC_STEP_SECONDS] < expected * 1.6 + 0.003, (model, s)
        assert s[a.METRIC_SECONDS] == pytest.approx(s[a.METRIC_STEP_SECONDS] * steps, rel=1e-6)

    # The policy reads these as Serve aggregates them (per replica) and prices each stage from the switch step.
    names = {"encode": "Encode", "sketch": "Sketch", "render": "Render", "decode": "Decode"}
    contexts = {names[n]: SimpleNamespace(
        deployment_name=names[n], target_num_replicas=1, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, total_queued_requests=0.0, total_num_requests=0.0, current_time=1000.0,
        policy_state={}, aggregated_metrics={k: {"r1": v} for k, v in s.items()}) for n, s in stats.items()}
    inputs, _ = a.inputs_from_contexts(contexts, a.DEFAULT_DEPLOYMENTS)
    assert inputs.switch_step == SKETCH_STEPS and inputs.num_steps == NUM_STEPS
    assert a.stage_cost("sketch", inputs.stages["sketch"], inputs) == pytest.approx(sketch[a.METRIC_SECONDS])
    assert a.stage_cost("render", inputs.stages["render"], inputs) == pytest.approx(render[a.METRIC_SECONDS])


def test_a_replica_counts_what_waits_and_what_runs(chain):
    sketch = chain[1]["sketch"]
    sketch._loop.pending.append(object())  # one waiting to join the batch
    try:
        s = sketch.record_autoscaling_stats()
    finally:
        sketch._loop.pending.pop()
    assert s[a.METRIC_QUEUED] == 1 and s[a.METRIC_IN_FLIGHT] == 0


# --- the configs -------------------------------------------------------------------------------------------
def _sim_config() -> dict:
    return yaml.safe_load((DEPLOYMENTS / "sim-wan2.1-h100.yaml").read_text())


@pytest.mark.parametrize("name", ["sim-wan2.1-h100.yaml", "sim-wan2.1-h100-l40s.yaml"])
def test_the_sim_configs_autoscale_sketch_and_render_under_the_policy(name):
    from srserve.serving.args import AppArgs
    from srserve.serving.runner import POLICY, check_autoscaling, pool_resources

    config = yaml.safe_load((DEPLOYMENTS / name).read_text())
    assert check_autoscaling(config) is None
    app = config["applications"][0]
    assert app["autoscaling_policy"]["policy_function"] == POLICY
    args = AppArgs.model_validate(app["args"])
    assert args.sketch.autoscaling_config and args.render.autoscaling_config
    assert Path(args.model).name == name.removesuffix(".yaml").replace("sim-wan2.1", "wan2.1-sim")
    assert pool_resources(config)["sketch_pool"] == args.sketch.autoscaling_config["max_replicas"]
    # Arrival rates over simulated minutes, not the default 60 real s (6000 simulated s at time factor 0.01).
    assert {args.sketch.stats_window_s, args.render.stats_window_s, args.decode.stats_window_s} == {5.0}


def test_a_stage_reports_arrivals_over_its_configured_window(tmp_path):
    from srserve.serving import stages
    from srserve.sim.spec import SimSpec, write_sim_checkpoint

    model = str(write_sim_checkpoint(tmp_path / "model", SimSpec(time_factor=TIME_FACTOR)))
    handle = FakeStoreHandle(SQLiteJobStore(str(tmp_path / "jobs.sqlite")))
    assert stages.Sketch(model, handle, {"stats_window_s": 7.0}).autoscale_stats.window_s == 7.0
    assert stages.Render(model, handle, {}).autoscale_stats.window_s == 60.0


@pytest.mark.parametrize("edit, says", [
    (lambda app: app["autoscaling_policy"]["policy_kwargs"].update(upscale_delay=3), "policy_kwargs"),
    (lambda app: app["autoscaling_policy"]["policy_kwargs"].update(target_utilization=2), "target_utilization"),
    (lambda app: app["args"]["sketch"]["autoscaling_config"].update(upscale_delay_s=30), "sketch.autoscaling_config"),
    (lambda app: app["args"]["render"].update(max_batch_size=4), "concurrency.render must be"),
    (lambda app: app["autoscaling_policy"]["policy_kwargs"]["concurrency"].update(encode=1), "do not autoscale"),
    (lambda app: app["autoscaling_policy"]["policy_kwargs"].update(deployments={"Sketch": "sketch"}),
     "does not size stage 'render'"),
])
def test_a_policy_that_cannot_work_is_refused_before_ray_starts(edit, says):
    from srserve.serving.runner import check_autoscaling

    config = copy.deepcopy(_sim_config())
    edit(config["applications"][0])
    assert says in (check_autoscaling(config) or "")


def test_the_deployed_schema_keeps_the_policy_and_makes_paths_absolute(tmp_path, monkeypatch):
    from srserve.serving.runner import deploy_schema

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    schema = deploy_schema(_sim_config(), "127.0.0.1", 8123)
    app = schema.applications[0]
    assert app.autoscaling_policy["policy_function"] == "srserve.control.autoscale:StageRatioPolicy"
    assert Path(app.args["model"]).is_absolute() and Path(app.args["model"], "sim.json").is_file()
    assert Path(app.args["job_store_path"]).is_absolute()
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 8123
