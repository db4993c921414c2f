"""Switch policies: parsing, fixed switch steps, and the adaptive self-diff rule on synthetic sequences."""
from __future__ import annotations

import math

import pytest

from srserve.pipeline.switch import AdaptiveSwitch, SwitchPolicy, fixed_switch_step, parse_policy

TIMESTEPS = [999, 950, 900, 800, 700, 500, 300, 100]


@pytest.mark.parametrize("text,expected", [
    ("none", SwitchPolicy("none")), ("small-only", SwitchPolicy("small-only")), ("step:3", SwitchPolicy("step", 3)),
    ("ratio:0.875", SwitchPolicy("ratio", 0.875)), ("adaptive", SwitchPolicy("adaptive", 0.01)),
    ("adaptive:0.05", SwitchPolicy("adaptive", 0.05)),
    ("adaptive:0.02:min=3:max=9", SwitchPolicy("adaptive", 0.02, 3, 9)),
])
def test_parse(text, expected):
    assert parse_policy(text) == expected
    assert parse_policy(str(expected)) == expected  # str() round-trips


@pytest.mark.parametrize("bad", ["", "fast", "step:", "step:-1", "step:x", "ratio:1.5", "ratio:nan", "adaptive:0",
                                 "adaptive:2", "adaptive:0.01:min=5:max=2", "none:3"])
def test_parse_rejects_with_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="adaptive"):
        parse_policy(bad)


def test_fixed_switch_steps():
    assert fixed_switch_step(parse_policy("none"), TIMESTEPS, 1000) == 8
    assert fixed_switch_step(parse_policy("small-only"), TIMESTEPS, 1000) == 0
    assert fixed_switch_step(parse_policy("step:3"), TIMESTEPS, 1000) == 3
    assert fixed_switch_step(parse_policy("step:30"), TIMESTEPS, 1000) == 8
    # diffusers' boundary: the large model while t >= R * 1000.
    assert fixed_switch_step(parse_policy("ratio:0.9"), TIMESTEPS, 1000) == 3
    assert fixed_switch_step(parse_policy("ratio:0.7"), TIMESTEPS, 1000) == 5
    assert fixed_switch_step(parse_policy("adaptive"), TIMESTEPS, 1000) is None


def run_rule(rule: AdaptiveSwitch, changes: list[float | None]) -> int | None:
    """Number of sketch steps taken when the rule fires, None when it never does."""
    for i, change in enumerate(changes):
        if rule.observe(i, change):
            return i + 1
    return None


def expected_switch(changes: list[float | None], threshold: float, lo: int, hi: int) -> int | None:
    """The formula written out independently: d_i = tanh(r_i); switch after i when 0 < d_{i-1} - d_i < thr."""
    d = {i: math.tanh(c) for i, c in enumerate(changes) if c is not None}
    for i in range(len(changes)):
        if i + 1 >= hi:
            return i + 1
        if i + 1 >= lo and i - 1 in d and i in d and 0 < d[i - 1] - d[i] < threshold:
            return i + 1
    return None


@pytest.mark.parametrize("changes", [
    [None, 0.9, 0.5, 0.3, 0.295, 0.29, 0.28, 0.2],   # settles after a steep start
    [None, 0.9, 0.7, 0.5, 0.3, 0.1, 0.09, 0.05],      # steep until late
    [None, 0.2, 0.25, 0.3, 0.305, 0.31, 0.2, 0.1],   # rising: drops must be positive
    [None, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],        # flat: zero drop is not a switch
])
@pytest.mark.parametrize("lo,hi", [(1, 8), (2, 8), (5, 8), (2, 4)])
def test_adaptive_switches_where_the_formula_says(changes, lo, hi):
    rule = AdaptiveSwitch(0.01, lo, hi)
    assert run_rule(rule, changes) == expected_switch(changes, 0.01, lo, hi)


def test_adaptive_concrete_cases():
    changes = [None, 0.9, 0.5, 0.3, 0.295, 0.29]
    # d3 - d4 = tanh(0.3) - tanh(0.295) ~ 0.0046 < 0.01: switch after step 4, i.e. 5 sketch steps.
    assert run_rule(AdaptiveSwitch(0.01, 1, 50), changes) == 5
    assert run_rule(AdaptiveSwitch(0.01, 6, 50), changes + [0.289]) == 6  # min holds it back, then it fires
    assert run_rule(AdaptiveSwitch(0.001, 1, 50), changes) is None      # a tighter threshold does not fire
    assert run_rule(AdaptiveSwitch(0.001, 1, 3), changes) == 3          # max forces it
    assert run_rule(AdaptiveSwitch(0.01, 1, 50), [None, 0.3, 0.4, 0.5]) is None  # rising never fires


def test_default_bounds_scale_with_steps():
    policy = parse_policy("adaptive")
    assert policy.bounds(50) == (5, 30)
    assert policy.bounds(8) == (2, 5)
    assert parse_policy("adaptive:0.01:min=3:max=99").bounds(20) == (3, 20)
