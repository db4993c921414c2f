"""Fair scheduling in the denoising stages (issue 11, point 5): the policy alone (pure, no torch), then the batch
loop with srd-tiny in-process (who steps when, and results equal to solo runs)."""
from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest

from srserve.pipeline.scheduling import FairQueue, Job, Policy, StepCosts, StepView, admission_order, pick, weight


# --- the policy, simulated: a device that runs one forward at a time --------------------------------------------
class Device:
    """Residents with a known step cost; `run` steps what the queue picks, charging the forward's seconds."""

    def __init__(self, policy: Policy) -> None:
        self.queue = FairQueue(policy)
        self.costs: dict[str, float] = {}
        self.left: dict[str, int] = {}
        self.group: dict[str, str] = {}
        self.now = 0.0
        self.log: list[list[str]] = []  # the keys of each forward
        self.done_at: dict[str, float] = {}

    def add(self, key: str, step_s: float, steps: int, priority: str = "interactive", group: str | None = None):
        self.costs[key], self.left[key], self.group[key] = step_s, steps, group or key
        self.queue.add(key, priority)
        self.queue.costs.observe(self.group[key], step_s, 1, step_s)  # its cost is known (learnt before)

    def views(self) -> dict[str, StepView]:
        return {k: StepView(self.group[k], self.costs[k], n) for k, n in self.left.items()}

    def run(self, forwards: int = 1) -> None:
        for _ in range(forwards):
            views = self.views()
            keys = self.queue.pick(views)
            seconds = sum(self.costs[k] for k in keys)
            self.now += seconds
            self.queue.charge(keys, views, seconds)
            self.log.append(keys)
            for k in keys:
                self.left[k] -= 1
                if not self.left[k]:
                    del self.left[k]
                    self.queue.remove(k)
                    self.done_at[k] = self.now

    def run_until_done(self, key: str, limit: int = 100_000) -> None:
        for _ in range(limit):
            if key in self.done_at:
                return
            self.run()
        raise AssertionError(f"{key} not done after {limit} forwards")


MAX = dict(step_s=5.1, steps=100)  # a max-size srd-tiny sketch on one CPU thread (measured: 5.1 s a step)
DEFAULT = dict(step_s=0.075, steps=30)  # a default one: 2.25 s alone


def test_a_short_job_is_not_held_behind_four_long_ones():
    dev = Device(Policy())
    for i in range(4):
        dev.add(f"max{i}", **MAX)
    dev.run(7)  # they are well under way
    began = dev.now
    dev.add("default", **DEFAULT)
    dev.run_until_done("default")
    # FIFO would be ~2,000 s; one group stepping in turn 30 x (5.1 + 0.075) s. Here: at most one long forward.
    assert dev.done_at["default"] - began <= 5.1 + 2.25 + 1e-9
    assert dev.log[-1] == ["default"]


def test_a_small_request_takes_steps_in_proportion_to_the_large_ones_cost():
    dev = Device(Policy(short_s=0))  # no boost: plain fair share
    dev.add("big", step_s=1.0, steps=1000)
    dev.add("small", step_s=0.1, steps=1000)
    dev.run(220)
    stepped = [k for keys in dev.log for k in keys]
    big, small = stepped.count("big"), stepped.count("small")
    assert 9 <= small / big <= 11  # equal device time: ten small steps per large one
    runs = "".join("b" if k == "big" else "s" for k in stepped[20:])
    assert "bb" not in runs  # a large forward never follows a large forward while the small one waits


def test_the_long_job_keeps_its_share_under_a_stream_of_short_ones():
    """Aging: a long batch-class job is never starved, however many short interactive jobs keep coming."""
    policy = Policy()
    dev = Device(policy)
    dev.add("long", step_s=1.0, steps=10_000, priority="batch")
    n = 0
    while dev.now < 2_000:
        if not any(k.startswith("s") for k in dev.left):  # a continuous stream: the next arrives at once
            n += 1
            dev.add(f"s{n}", step_s=0.1, steps=20)
        dev.run()
    share = sum(dev.costs["long"] for keys in dev.log for k in keys if k == "long") / dev.now
    w_long = weight(Job("long", "g", 1.0, 10_000, "batch"), policy)
    w_short = weight(Job("s", "g", 0.1, 20, "interactive"), policy)
    assert w_long / (w_long + w_short) * 0.9 <= share < 0.5
    gaps = [i for i, keys in enumerate(dev.log) if keys == ["long"]]
    longest = max(b - a for a, b in itertools.pairwise(gaps))
    # The bound its weight sets, in forwards (+10%: each newcomer starts one short step behind the clock).
    assert longest <= 1.1 * (1.0 / w_long) / (0.1 / w_short) + 2
    assert n > 100  # and the short ones were served meanwhile


def test_interactive_preempts_batch_at_the_next_step_boundary_and_batch_resumes():
    dev = Device(Policy(short_s=0))
    dev.add("batch", step_s=1.0, steps=50, priority="batch")
    dev.run(10)
    dev.add("inter", step_s=1.0, steps=20)
    dev.run(1)
    assert dev.log[-1] == ["inter"]  # the very next forward
    dev.run_until_done("inter")
    during = [k for keys in dev.log[10:] for k in keys]
    assert during.count("batch") <= 20 * 0.125 + 2  # batch went on at its weight's share only
    dev.run_until_done("batch")  # and it resumed to its end
    assert dev.done_at["inter"] < dev.done_at["batch"]


def test_a_newcomer_gets_no_credit_for_the_time_before_it_came():
    dev = Device(Policy(short_s=0))
    dev.add("old", step_s=1.0, steps=1000)
    dev.run(100)
    dev.add("new", step_s=1.0, steps=1000)
    dev.run(20)
    recent = [k for keys in dev.log[-20:] for k in keys]
    assert 9 <= recent.count("new") <= 11  # they alternate; the newcomer does not run 100 steps first


def test_a_forward_carries_same_shape_companions_within_its_budgets():
    policy = Policy(max_batch_size=3, max_forward_s=1.0)
    jobs = [Job("a", "g", 0.3, 5, seq=1), Job("b", "g", 0.3, 5, seq=2), Job("c", "h", 0.01, 5, seq=3),
            Job("d", "g", 0.3, 5, seq=4), Job("e", "g", 0.3, 5, seq=5)]
    chosen = [j.key for j in pick(jobs, policy)]
    assert chosen[0] == "c" and chosen == ["c"]  # the cheapest finishes first; nothing of another shape joins
    chosen = [j.key for j in pick([j for j in jobs if j.key != "c"], policy)]
    assert chosen == ["a", "b", "d"]  # three fit the size budget; 3 x 0.3 s fit the second
    big = [Job("x", "g", 5.0, 5, seq=1), Job("y", "g", 5.0, 5, seq=2)]
    assert [j.key for j in pick(big, policy)] == ["x"]  # one large request alone: a forward is never empty


def test_costs_are_learnt_and_unseen_shapes_priced_from_what_was_seen():
    costs = StepCosts(alpha=0.5, s_per_unit=1.0)
    assert costs.estimate("g", 10) == 10.0
    costs.observe("g", 10, members=2, seconds=1.0)  # 0.5 s each
    assert costs.estimate("g", 10) == 0.5
    assert costs.estimate("h", 20) < 20.0  # moved toward 0.05 s per unit


def test_admission_puts_interactive_first_and_respects_free_places():
    assert admission_order(["batch", "interactive", "batch", "interactive"], None) == [1, 3, 0, 2]
    assert admission_order(["batch", "interactive", "batch"], 1) == [1]
    assert admission_order(["batch"], 0) == []


def test_unknown_priority_is_refused():
    with pytest.raises(ValueError, match="priority must be one of"):
        FairQueue(Policy()).add("k", "urgent")


# --- the batch loop with srd-tiny, in-process ---------------------------------------------------------------
PROMPT = "a red circle moving right"


class _Store:
    """The JobStore's `report` as a stage calls it; `stopped` names the job#attempt keys told to stop."""

    def __init__(self) -> None:
        self.stopped: set[str] = set()
        self.events: list[dict] = []
        store = self

        class _Method:
            def remote(self, events):
                store.events.extend(events)

                async def answer():
                    return [f"{e['job']}#{e['attempt']}" for e in events
                            if f"{e['job']}#{e['attempt']}" in store.stopped]

                return answer()

        self.report = _Method()


@pytest.fixture(scope="module")
def engine():
    from srserve.pipeline.engine import SREngine
    from srserve.pipeline.spec import resolve_model_spec
    from srserve.tiny import default_model_path

    return SREngine.load(resolve_model_spec(default_model_path()))


def _state(engine, **fields):
    from srserve.config import GenerationRequest

    request = engine.resolve(GenerationRequest(prompt=PROMPT, seed=7, **fields))
    return engine.prepare(request, engine.encode(request))


LONG = dict(height=64, width=64, num_frames=17, num_inference_steps=40, switch="none")
SHORT = dict(height=32, width=32, num_frames=5, num_inference_steps=8, switch="none")


def _loop(engine, **scheduling):
    from srserve.pipeline.engine import DenoiseBatch
    from srserve.serving.args import StageOptions
    from srserve.serving.batch_loop import BatchLoop
    from srserve.serving.metrics import StageMetrics

    options = StageOptions(max_batch_size=4, scheduling=scheduling)
    batch = DenoiseBatch(engine.family, "sketch", max_batch_size=4)
    return BatchLoop(batch, options, contextlib.nullcontext(), StageMetrics("sketch", "srd-tiny"), "sketch")


async def _submit(loop, reporter, job: str, state, priority: str = "interactive"):
    from srserve.serving.batch_loop import Entry

    watch = reporter.watch(job, 0, "sketch")
    future = asyncio.get_running_loop().create_future()
    loop.submit(Entry(f"{job}#0#0", state, watch, priority, asyncio.get_running_loop(), future))
    return watch, future


def test_a_short_request_overtakes_a_long_one_and_both_equal_their_solo_runs(engine, one_torch_thread):
    import torch

    from srserve.serving.reporter import Reporter

    long_state, short_state = _state(engine, **LONG), _state(engine, **SHORT)
    solo_long, solo_short = engine.sketch(long_state), engine.sketch(short_state)
    loop = _loop(engine, short_s=0.5)  # the long one (40 x ~75 ms) is not "short"; the short one (8 x ~20 ms) is
    picks: list[list[str]] = []
    original = loop.queue.pick
    loop.queue.pick = lambda views: picks.append(original(views)) or picks[-1]

    async def run():
        reporter = Reporter(_Store(), 0.05)
        _, long_done = await _submit(loop, reporter, "long", long_state)
        while sum("long#0#0" in p for p in picks) < 10:  # the long one is under way
            await asyncio.sleep(0.01)
        _, short_done = await _submit(loop, reporter, "short", short_state)
        short = await asyncio.wait_for(short_done, 60)
        return short, await asyncio.wait_for(long_done, 120)

    try:
        short, long_ = asyncio.run(run())
    finally:
        loop.close(wait_s=5)
    first = next(i for i, p in enumerate(picks) if "short#0#0" in p)
    last = max(i for i, p in enumerate(picks) if "short#0#0" in p)
    long_before = sum("long#0#0" in p for p in picks[:first])
    assert 10 <= long_before <= 35  # it joined with steps of the long one to go ...
    assert sum("long#0#0" in p for p in picks[first:last + 1]) <= 1, picks  # ... and all 8 of its ran meanwhile
    assert torch.equal(short.latents, solo_short.latents) and short.step_index == 8
    assert torch.equal(long_.latents, solo_long.latents) and long_.step_index == 40  # paused ~8 times: same


def test_pausing_and_resuming_leaves_the_result_identical_to_a_solo_run(engine, one_torch_thread):
    """Paused for many boundaries while another request steps, adaptive sketch included (its rule's history
    stays with it in memory): bit-exact to the request denoised alone."""
    import torch

    from srserve.pipeline.engine import DenoiseBatch

    adaptive = _state(engine, height=32, width=32, num_frames=9, num_inference_steps=20)  # the default switch
    other = _state(engine, **SHORT)
    solo = engine.sketch(adaptive)
    batch = DenoiseBatch(engine.family, "sketch", max_batch_size=4)
    batch.add("a", adaptive)
    batch.add("o", other)
    finished = {}
    for round_ in range(200):
        keys = ["o"] if round_ % 3 else ["a"]  # "a" stepped every third boundary, paused otherwise
        finished.update(batch.step(keys if any(k in batch.active for k in keys) else None))
        if not batch:
            break
    result = finished["a"]
    assert result.switch_step == solo.switch_step and result.switch_diffs == solo.switch_diffs
    assert torch.equal(result.latents, solo.latents)


def test_a_stop_reaches_a_paused_request(engine, one_torch_thread):
    """A DELETE stops a request the scheduler keeps paused: it is checked at every boundary, not when stepped."""
    from srserve.pipeline.engine import Cancelled
    from srserve.serving.reporter import Reporter

    loop = _loop(engine, batch_weight=0.01, short_s=0)

    async def run():
        store = _Store()
        reporter = Reporter(store, 0.05)
        _, busy = await _submit(loop, reporter, "busy", _state(engine, **LONG))  # keeps the device busy
        _, paused = await _submit(loop, reporter, "paused", _state(engine, **LONG), priority="batch")
        await asyncio.sleep(0.5)
        store.stopped.add("paused#0")  # the store's answer to the next report
        with pytest.raises(Cancelled):
            await asyncio.wait_for(paused, 10)
        assert not busy.done()
        heartbeats = [e for e in store.events if e["job"] == "paused" and e["kind"] == "progress"]
        store.stopped.add("busy#0")
        with contextlib.suppress(Cancelled):
            await asyncio.wait_for(busy, 10)
        return heartbeats

    try:
        heartbeats = asyncio.run(run())
    finally:
        loop.close(wait_s=5)
    assert heartbeats  # paused, it still told the store it is alive
