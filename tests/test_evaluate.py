"""The srd-tiny domain evaluator on synthetic clips whose answer is known."""
from __future__ import annotations

import json

import numpy as np
import pytest

from srserve.tiny.domain import COLORS, ClipSpec, render_clip
from srserve.tiny.detect import classify_color, find_object
from srserve.tiny.evaluate import main, score_video, summarize, validate
from srserve.tiny.metrics import PSNR_CAP_DB, augment, gaussian_blur, largest_component, psnr, ssim

RED_CIRCLE_LEFT = ClipSpec("red", "circle", "left", radius=9.0, start_x=48.0, start_y=30.0, speed=1.5)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return render_clip(RED_CIRCLE_LEFT)[0]


def test_validation_meets_95_percent_per_attribute():
    noisy = validate(n=200, seed=11, noise=0.05, blur=0.7, conditions=("augmented",))["augmented"]
    clean = validate(n=40, seed=12, conditions=("clean",))["clean"]
    for summary in (noisy, clean):
        assert summary["videos"] in (200, 40)
        for key in ("color_acc", "shape_acc", "motion_acc"):
            assert summary[key] >= 95.0, (key, summary)
        assert summary["detected_fraction"] == 1.0


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_every_shape_and_direction_is_recognized(shape, direction):
    spec = ClipSpec("cyan", shape, direction, radius=8.0, speed=1.2)
    score = score_video(render_clip(spec)[0], spec.prompt)
    assert (score.color, score.shape, score.direction) == ("cyan", shape, direction)
    assert score.all_ok


def test_every_palette_color_is_recognized():
    for name, rgb in COLORS.items():
        assert classify_color(rgb) == name
        assert classify_color(tuple(0.6 * c + 0.1 for c in rgb)) == name  # dimmer and a little washed out
    assert classify_color((0.5, 0.5, 0.5)) is None
    assert classify_color((0.0, 0.0, 0.0)) is None


def test_right_prompt_passes_and_wrong_prompt_fails_every_attribute(clip):
    right = score_video(clip, RED_CIRCLE_LEFT.prompt)
    assert right.color_ok and right.shape_ok and right.motion_ok and right.detected_fraction == 1.0
    wrong = score_video(clip, "a blue square moving up")
    assert not (wrong.color_ok or wrong.shape_ok or wrong.motion_ok)
    assert (wrong.color, wrong.shape, wrong.direction) == ("red", "circle", "left")  # reported as detected
    one_off = score_video(clip, "a red triangle moving left")
    assert one_off.color_ok and not one_off.shape_ok and one_off.motion_ok


def test_empty_video_fails_everything(clip):
    for video in (np.zeros_like(clip), augment(np.zeros_like(clip), np.random.default_rng(0), 0.05, 0.7)):
        score = score_video(video, RED_CIRCLE_LEFT.prompt)
        assert not (score.color_ok or score.shape_ok or score.motion_ok)
        assert score.detected_fraction == 0.0 and score.temporal_consistency == 0.0 and score.detail == 0.0
        assert (score.color, score.shape, score.direction) == (None, None, None)


def test_noise_videos_fail_everything():
    rng = np.random.default_rng(0)
    videos = {"uniform": rng.random((17, 64, 64, 3)), "salt": (rng.random((17, 64, 64, 3)) > 0.98) * 1.0,
              "haze": np.clip(0.3 + rng.normal(0, 0.1, (17, 64, 64, 3)), 0, 1), "white": np.ones((17, 64, 64, 3))}
    for name, video in videos.items():
        score = score_video(video, "a red square moving up")
        assert not (score.color_ok or score.shape_ok or score.motion_ok), (name, score)
        assert score.direction is None and score.shape is None and score.temporal_consistency < 0.5, (name, score)


def test_static_object_has_no_direction():
    frames = np.repeat(render_clip(RED_CIRCLE_LEFT, num_frames=1)[0], 17, axis=0)
    score = score_video(frames, RED_CIRCLE_LEFT.prompt)
    assert score.color_ok and score.shape_ok and score.direction is None and not score.motion_ok


def test_find_object_locates_the_shape(clip):
    det = find_object(clip[4])
    cx, cy = RED_CIRCLE_LEFT.centers(17)[4]
    assert abs(det.centroid[0] - cx) < 0.1 and abs(det.centroid[1] - cy) < 0.1
    assert det.area == pytest.approx(np.pi * 9.0**2, rel=0.02)
    assert np.allclose(det.color, (1.0, 0.0, 0.0), atol=0.02)
    assert find_object(np.zeros((64, 64, 3), np.float32)) is None
    assert find_object((clip[4] * 255).astype(np.uint8)) is not None  # uint8 frames are accepted


def test_largest_component_keeps_the_biggest_blob():
    mask = np.zeros((20, 20), bool)
    mask[2:5, 2:5] = True  # 9 pixels
    mask[10:16, 10:16] = True  # 36 pixels
    mask[16, 16] = True  # diagonal neighbour: 8-connected to the big blob
    out = largest_component(mask)
    assert out.sum() == 37 and not out[2:5, 2:5].any()
    assert not largest_component(np.zeros((5, 5), bool)).any()


def test_psnr_of_identical_videos_is_the_cap_and_drops_with_noise(clip):
    rng = np.random.default_rng(0)
    assert psnr(clip, clip) == PSNR_CAP_DB
    little = psnr(np.clip(clip + rng.normal(0, 0.02, clip.shape), 0, 1), clip)
    much = psnr(np.clip(clip + rng.normal(0, 0.1, clip.shape), 0, 1), clip)
    assert PSNR_CAP_DB > little > much > 10.0
    with pytest.raises(ValueError, match="differs"):
        psnr(clip, clip[:5])


def test_ssim_of_identical_videos_is_one_and_drops_with_noise(clip):
    rng = np.random.default_rng(0)
    assert ssim(clip, clip) == pytest.approx(1.0, abs=1e-9)
    little = ssim(np.clip(clip + rng.normal(0, 0.02, clip.shape), 0, 1), clip)
    much = ssim(np.clip(clip + rng.normal(0, 0.1, clip.shape), 0, 1), clip)
    assert 1.0 > little > much
    assert ssim((clip * 255).astype(np.uint8), clip) > 0.99


def test_score_with_reference_reports_psnr_and_ssim(clip):
    score = score_video(clip, RED_CIRCLE_LEFT.prompt, reference=clip)
    assert score.psnr == PSNR_CAP_DB and score.ssim == pytest.approx(1.0)
    assert score_video(clip, RED_CIRCLE_LEFT.prompt).psnr is None


def test_blur_lowers_detail(clip):
    sharp = score_video(clip, RED_CIRCLE_LEFT.prompt).detail
    slightly = score_video(gaussian_blur(clip, 0.7), RED_CIRCLE_LEFT.prompt).detail
    very = score_video(gaussian_blur(clip, 1.5), RED_CIRCLE_LEFT.prompt).detail
    assert sharp > 0.95 and sharp > slightly + 0.2 and slightly > very
    # Noise alone does not pass for detail: the background's noise energy is subtracted.
    noisy = augment(clip, np.random.default_rng(1), noise=0.05, blur=0.0)
    assert score_video(noisy, RED_CIRCLE_LEFT.prompt).detail > 0.85


def test_flicker_and_jumps_lower_temporal_consistency(clip):
    steady = score_video(clip, RED_CIRCLE_LEFT.prompt).temporal_consistency
    assert steady > 0.95
    dropped = clip.copy()
    dropped[::3] = 0.0  # the object vanishes in every third frame
    dimmed = clip.copy()
    dimmed[::2] *= 0.5  # brightness flicker
    jumping = clip.copy()
    jumping[8:] = np.roll(clip[8:], (12, -10), axis=(1, 2))  # the object leaps mid-clip
    for video in (dropped, dimmed, jumping):
        assert score_video(video, RED_CIRCLE_LEFT.prompt).temporal_consistency < steady - 0.1


def test_summarize_reports_percentages_and_means(clip):
    scores = [score_video(clip, RED_CIRCLE_LEFT.prompt), score_video(clip, "a red square moving up")]
    out = summarize(scores)
    assert out["videos"] == 2
    assert (out["color_acc"], out["shape_acc"], out["motion_acc"], out["all_acc"]) == (100.0, 50.0, 50.0, 50.0)
    assert 0.0 < out["temporal_consistency"] <= 1.0 and out["psnr"] is None
    assert summarize([])["videos"] == 0


def test_bad_input_is_refused(clip):
    with pytest.raises(ValueError, match="unknown shape"):
        score_video(clip, "a red hexagon moving left")
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        score_video(clip[..., 0], RED_CIRCLE_LEFT.prompt)


def test_cli_scores_npy_and_mp4_files_and_a_manifest(clip, tmp_path, capsys):
    import imageio.v3 as iio

    np.save(tmp_path / "a.npy", clip)
    iio.imwrite(tmp_path / "a.mp4", (clip * 255).round().astype(np.uint8), fps=8, codec="libx264")
    assert main(["videos", str(tmp_path / "a.npy"), str(tmp_path / "a.mp4"), "--prompt", RED_CIRCLE_LEFT.prompt,
                 "--reference", str(tmp_path / "a.npy"), "--per-video"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["all_acc"] == 100.0 and len(out["videos"]) == 2
    assert out["videos"][0]["psnr"] == PSNR_CAP_DB and 25.0 < out["videos"][1]["psnr"] < PSNR_CAP_DB

    manifest = tmp_path / "m.jsonl"
    lines = [{"path": "a.npy", "prompt": RED_CIRCLE_LEFT.prompt},
             {"path": "a.npy", "prompt": "a red circle moving up", "reference": "a.mp4"}]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert main(["videos", "--manifest", str(manifest)]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["videos"] == 2 and summary["motion_acc"] == 50.0
    assert 25.0 < summary["psnr"] < PSNR_CAP_DB  # over the one video with a reference (relative to the manifest)


def test_cli_errors_and_validate(tmp_path, capsys):
    assert main(["videos", str(tmp_path / "missing.npy"), "--prompt", "a red circle moving left"]) == 2
    assert "no video" in capsys.readouterr().err
    np.save(tmp_path / "a.npy", np.zeros((3, 32, 32, 3), np.float32))
    assert main(["videos", str(tmp_path / "a.npy"), "--prompt", "a purple circle moving left"]) == 2
    assert "unknown color" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"path": "a.npy", "prompt": "a red circle moving up"}\nnot json\n')
    assert main(["videos", "--manifest", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["videos", str(tmp_path / "a.npy")])  # no prompt
    assert main(["validate", "--n", "4", "--seed", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clean"]["videos"] == 4 and out["augmented"]["videos"] == 4


def test_cli_scores_the_bundled_vae_reconstructions(capsys):
    assert main(["vae", "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err
    assert main(["vae", "--n", "2", "--seed", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clips"] == out["videos"] == 2 and out["model"].endswith("srd-tiny")
    assert 0.0 <= out["shape_acc"] <= 100.0 and out["psnr"] > 0
