"""The harder prompt forms of srd-tiny (`pair`: two objects, `then`: a direction change at mid-clip): grammar,
ground-truth clips, and the evaluator that scores them per object and phase."""
from __future__ import annotations

import json

import numpy as np
import pytest

from srserve.tiny.domain import (
    DIRECTIONS,
    FORMS,
    PAIR_GAP,
    ClipSpec,
    ObjectSpec,
    SceneSpec,
    all_prompts,
    parse_scene,
    render_clip,
    render_scene,
    sample_scene,
)
from srserve.tiny.evaluate import (
    VideoScore,
    main,
    score_video,
    summarize,
    validate,
)
from srserve.tiny.metrics import augment
from srserve.tiny.scene import SceneScore

PAIR = SceneSpec("pair", (ObjectSpec("red", "circle", ("right",), 8.0, 14.0, 12.0, 1.5),
                          ObjectSpec("blue", "square", ("up",), 8.0, 52.0, 54.0, 1.3)))
THEN = SceneSpec("then", (ObjectSpec("green", "triangle", ("right", "down"), 10.0, 16.0, 16.0, 1.5),))


def test_parse_scene_reads_every_form_and_names_what_is_wrong():
    assert parse_scene("a red circle moving left") == ("core", [("red", "circle", ("left",))])
    assert parse_scene("A red circle moving left and a blue square moving up.") == (
        "pair", [("red", "circle", ("left",)), ("blue", "square", ("up",))])
    assert parse_scene("a cyan triangle moving up then left") == ("then", [("cyan", "triangle", ("up", "left"))])
    for prompt, match in [("a red circle moving left and a red square moving up", "same color"),
                          ("a red circle moving left and a pink square moving up", "unknown color"),
                          ("a red circle moving left then left", "same direction"),
                          ("a red circle moving left then sideways", "unknown direction"),
                          ("a red blob moving left then up", "unknown shape"),
                          ("two red circles", "is not of the form")]:
        with pytest.raises(ValueError, match=match):
            parse_scene(prompt)


def test_all_prompts_of_each_form_parse_back():
    counts = {"core": 72, "pair": 6 * 5 * 3 * 3 * 4 * 4, "then": 6 * 3 * 4 * 3}
    for form in FORMS:
        prompts = all_prompts(form)
        assert len(prompts) == len(set(prompts)) == counts[form]
        assert all(parse_scene(p)[0] == form for p in prompts)
    assert all_prompts() == all_prompts("core")
    with pytest.raises(ValueError, match="unknown form"):
        all_prompts("triple")


def test_core_scene_renders_exactly_like_the_core_clip():
    spec = ClipSpec("yellow", "square", "down", radius=10.0, start_x=20.0, start_y=15.0, speed=1.2)
    frames, centers = render_scene(spec)
    assert np.array_equal(frames, render_clip(spec)[0]) and centers.shape == (17, 1, 2)
    assert SceneSpec.from_clip(spec).prompt == spec.prompt
    # The core form samples as sample_spec does: same random stream, same clip.
    a = sample_scene(np.random.default_rng(3), "core")
    from srserve.tiny.domain import sample_spec
    assert a == SceneSpec.from_clip(sample_spec(np.random.default_rng(3)))


@pytest.mark.parametrize("form", ["pair", "then"])
def test_sampled_scenes_are_valid(form):
    rng = np.random.default_rng(7)
    for _ in range(60):
        spec = sample_scene(rng, form)
        assert parse_scene(spec.prompt)[0] == form
        centers = spec.centers(17)
        for k, obj in enumerate(spec.objects):
            assert (centers[:, k] - obj.bound >= 0).all() and (centers[:, k] + obj.bound <= 64).all()
        if form == "pair":
            a, b = spec.objects
            assert a.color != b.color
            gap = np.linalg.norm(centers[:, 0] - centers[:, 1], axis=1).min() - a.bound - b.bound
            assert gap >= PAIR_GAP
            assert a.start_x < b.start_x  # reading order: the first-named object starts on the left
        else:
            (obj,) = spec.objects
            d1, d2 = obj.directions
            assert d1 != d2
            steps = np.diff(centers[:, 0], axis=0) / obj.speed
            assert np.allclose(steps[:8], DIRECTIONS[d1]) and np.allclose(steps[8:], DIRECTIONS[d2])
        frames, _ = render_scene(spec)
        assert frames.shape == (17, 64, 64, 3) and frames.max() <= 1.0
    spec = sample_scene(rng, prompt="a magenta circle moving down then up")
    assert spec.form == "then" and spec.prompt == "a magenta circle moving down then up"


def test_validation_of_the_new_forms_meets_95_percent_per_attribute():
    for form in ("pair", "then"):
        noisy = validate(n=150, seed=21, noise=0.05, blur=0.7, conditions=("augmented",), form=form)["augmented"]
        clean = validate(n=40, seed=22, conditions=("clean",), form=form)["clean"]
        for summary in (noisy, clean):
            for key in ("color_acc", "shape_acc", "motion_acc", "all_acc"):
                assert summary[key] >= 95.0, (form, key, summary)
            assert summary["detected_fraction"] >= 0.99, (form, summary)
            if form == "then":
                assert min(summary["phase_acc"]) >= 95.0, summary


def test_right_pair_passes_in_either_prompt_order():
    frames = render_scene(PAIR)[0]
    score = score_video(frames, PAIR.prompt)
    assert isinstance(score, SceneScore) and score.form == "pair" and score.all_ok
    assert score.color == ("red", "blue") and score.shape == ("circle", "square")
    assert score.direction == (("right",), ("up",)) and score.detected_fraction == 1.0
    swapped_order = score_video(frames, "a blue square moving up and a red circle moving right")
    assert swapped_order.all_ok and swapped_order.color == ("blue", "red")
    d = score.to_dict()
    assert d["all_ok"] and len(d["objects"]) == 2 and d["objects"][1]["shape_ok"]
    json.dumps(d)  # serializable for the quality table


def test_wrong_pairs_are_wrong():
    frames = render_scene(PAIR)[0]
    # Colors swapped between the shapes: the red object is a circle, not a square.
    swapped = score_video(frames, "a blue circle moving right and a red square moving up")
    assert swapped.color_ok and not swapped.shape_ok and not swapped.motion_ok and not swapped.all_ok
    # One object's direction wrong.
    one = score_video(frames, "a red circle moving right and a blue square moving down")
    assert one.color_ok and one.shape_ok and not one.motion_ok
    assert [o["motion_ok"] for o in one.objects] == [True, False]
    # A color that is not there.
    absent = score_video(frames, "a red circle moving right and a green square moving up")
    assert not absent.color_ok and not absent.all_ok
    # Only one object drawn when two were asked.
    single = render_scene(SceneSpec("pair", PAIR.objects[:1]))[0]
    lone = score_video(single, PAIR.prompt)
    assert not lone.all_ok and not lone.color_ok and lone.objects[1]["detected_fraction"] == 0.0
    assert lone.objects[0]["color_ok"] and lone.objects[0]["shape_ok"] and lone.objects[0]["motion_ok"]
    # Two objects of the same color (the model did not tell them apart).
    same = render_scene(SceneSpec("pair", (PAIR.objects[0], ObjectSpec("red", "square", ("up",), 8.0, 52.0,
                                                                         54.0, 1.3))))[0]
    assert not score_video(same, PAIR.prompt).color_ok


def test_then_form_scores_each_phase():
    frames = render_scene(THEN)[0]
    right = score_video(frames, THEN.prompt)
    assert right.all_ok and right.direction == (("right", "down"),) and right.phases_ok == (True, True)
    wrong_second = score_video(frames, "a green triangle moving right then up")
    assert wrong_second.color_ok and wrong_second.shape_ok and not wrong_second.motion_ok
    assert wrong_second.phases_ok == (True, False)
    assert score_video(frames, "a green triangle moving left then down").phases_ok == (False, True)
    # No turn: a core clip moving right all along fails the second phase of "right then down".
    straight = render_clip(ClipSpec("green", "triangle", "right", 10.0, 12.0, 30.0, 1.5))[0]
    assert score_video(straight, THEN.prompt).phases_ok == (True, False)
    # ... and the core prompt of the turning clip is judged as before (a line fit over the whole clip).
    core = score_video(frames, "a green triangle moving right")
    assert isinstance(core, VideoScore) and core.color_ok and core.shape_ok
    # Noise and blur keep the verdicts.
    noisy = augment(frames, np.random.default_rng(0), 0.05, 0.7)
    assert score_video(noisy, THEN.prompt).all_ok
    assert not score_video(noisy, "a green triangle moving right then left").all_ok
    # An empty video fails everything.
    empty = score_video(np.zeros_like(frames), THEN.prompt)
    assert not (empty.color_ok or empty.shape_ok or empty.motion_ok) and empty.detected_fraction == 0.0


def test_summarize_mixes_forms_and_reports_phases():
    frames = render_scene(THEN)[0]
    scores = [score_video(frames, THEN.prompt), score_video(frames, "a green triangle moving right then up")]
    out = summarize(scores)
    assert out["all_acc"] == 50.0 and out["color_acc"] == 100.0 and out["phase_acc"] == [100.0, 50.0]
    core = render_clip(ClipSpec("red", "circle", "left", 9.0, 48.0, 30.0, 1.5))[0]
    mixed = summarize(scores + [score_video(core, "a red circle moving left")])
    assert mixed["videos"] == 3 and "phase_acc" not in mixed


def test_cli_validate_takes_a_form(capsys):
    assert main(["validate", "--n", "3", "--seed", "1", "--form", "pair"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["form"] == "pair" and out["clean"]["videos"] == 3


def test_the_fixtures_are_valid_scenes():
    centers = PAIR.centers(17)
    a, b = PAIR.objects
    assert np.linalg.norm(centers[:, 0] - centers[:, 1], axis=1).min() - a.bound - b.bound >= PAIR_GAP
    for spec in (PAIR, THEN):
        c = spec.centers(17)
        for k, obj in enumerate(spec.objects):
            assert (c[:, k] - obj.bound >= 0).all() and (c[:, k] + obj.bound <= 64).all()
