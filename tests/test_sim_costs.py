"""The cost table: every number sourced, the shipped file what the formulas give, lookups, fits, measurements."""
from __future__ import annotations

import json
import math

import pytest

from srserve.sim import derive
from srserve.sim.costs import CostError, CostTable, gpu_key, read_measurements

L, S = "wan2.1-t2v-14b", "wan2.1-t2v-1.3b"


@pytest.fixture(scope="module")
def table() -> CostTable:
    return CostTable.load(measured=None)


def _numbers(node, path=()):
    if isinstance(node, dict):
        if "value" in node and "status" in node:
            yield path, node
        for k, v in node.items():
            yield from _numbers(v, (*path, k))


def test_shipped_table_is_what_the_formulas_give():
    assert derive.TABLE_PATH.read_text() == derive.render(derive.build_table())
    assert derive.main(["--check"]) == 0


def test_every_number_has_a_status_and_a_source_or_formula(table):
    entries = list(_numbers(table.data))
    assert len(entries) > 120
    for path, e in entries:
        assert e["status"] in {"published", "derived", "measured", "assumed"}, path
        assert e.get("source") or e.get("formula") or e.get("why"), path
        if e["status"] == "derived":
            assert e.get("formula"), path


def test_the_published_anchor_is_used_as_published(table):
    assert table.step_seconds(L, "h100", "480p") == pytest.approx(252.8 / 50)
    assert table.entry("step_seconds", L, "h100", "480p")["status"] == "published"
    assert table.text_encode_seconds("h100") == 0.89
    assert table.vae_decode_seconds("h100", "480p") == 2.38
    assert table.entry("step_seconds", S, "l4", "480p")["status"] == "derived"
    # the MFU the anchor implies, and the FLOPs it rests on (hand-checked: 1.678e15 per 14B forward at 480p)
    assert derive.forward_flops(L, 81, 480, 832)["total"] == pytest.approx(1.678e15, rel=1e-3)
    assert table.data["assumptions"]["mfu"]["value"] == pytest.approx(0.671, abs=1e-3)


def test_derived_numbers_follow_the_gpus_rates(table):
    for model in (L, S):
        for res in ("480p", "720p"):
            h100 = table.step_seconds(model, "h100", res)
            assert table.step_seconds(model, "h200", res) == pytest.approx(h100)  # same dense bf16 rate
            for gpu in ("a100-80g", "l40s", "l4", "rtx4090"):
                ratio = table.bf16_tflops("h100") / table.bf16_tflops(gpu)
                assert table.step_seconds(model, gpu, res) == pytest.approx(h100 * ratio, rel=1e-3)
        assert table.step_seconds(model, "h100", "720p") > 3.5 * table.step_seconds(model, "h100", "480p")
    # the sketch/render per-step ratio SR's speedup rests on
    assert 5.5 < table.step_seconds(L, "h100") / table.step_seconds(S, "h100") < 6.5


def test_batch_and_shape_and_guidance(table):
    one = table.step_seconds(L, "h100")
    assert table.step_seconds(L, "h100", batch=3) == pytest.approx(one * (1 + 2 * 0.97))
    assert table.step_seconds(L, "h100", guided=False) == pytest.approx(one / 2)
    # a standard shape given as a tuple is the standard entry; other shapes scale it by FLOPs
    assert table.step_seconds(L, "h100", (81, 480, 832)) == pytest.approx(one)
    short = table.step_seconds(L, "h100", (41, 480, 832))
    assert short == pytest.approx(one * derive.forward_flops(L, 41, 480, 832)["total"]
                                  / derive.forward_flops(L, 81, 480, 832)["total"])
    assert table.vae_decode_seconds("h100", (41, 480, 832)) == pytest.approx(2.38 * 41 / 81)
    with pytest.raises(CostError, match="resolution"):
        table.step_seconds(L, "h100", "1080p")
    with pytest.raises(CostError, match="GPU"):
        table.step_seconds(L, "b300")


def test_fits(table):
    for gpu in ("h100", "h200", "a100-80g", "l40s"):
        assert table.fits(L, gpu)
    for gpu in ("l4", "rtx4090"):
        assert not table.fits(L, gpu)  # 28.6 GB of bf16 weights
    assert all(table.fits(S, gpu, res) for gpu in table.gpus for res in ("480p", "720p"))
    colocated = [L, S, "umt5-xxl", "wan-vae"]
    assert table.fits(colocated, "h100", processes=1) and not table.fits(colocated, "l40s", processes=1)
    assert table.need_gb(L) == pytest.approx(28.58 + 5.84 + 1.5, abs=0.05)
    # render + decode fit an L4; with the text encoder too they do not
    assert table.fits([S, "wan-vae"], "l4") and not table.fits([S, "umt5-xxl", "wan-vae"], "l4")
    assert table.need_gb(L, batch=2) > table.need_gb(L)


def test_prices_and_gpu_names(table):
    assert all(table.price(g) > 0 for g in table.gpus)
    assert table.price("h100") == pytest.approx(0.00116 * 3600)
    assert table.entry("price", "l4")["status"] == "published"
    assert gpu_key("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_key("NVIDIA H200") == "h200"
    assert gpu_key("NVIDIA A100-SXM4-80GB") == "a100-80g"
    assert gpu_key("NVIDIA L40S") == "l40s"
    assert gpu_key("NVIDIA L4") == "l4"
    assert gpu_key("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert gpu_key("NVIDIA B200") is None


def test_measurements_replace_the_derived_numbers(tmp_path):
    path = tmp_path / "measured_costs.json"
    path.write_text(json.dumps({"measurements": [
        {"device": "NVIDIA H200", "measured_at": "2026-12-01T00:00:00Z", "source": "test",
         "step_seconds": {L: {"480p": {"1": 4.0, "2": 7.6}}, S: {"720p": {"1": 3.0}}},
         "text_encode_seconds": 0.5, "vae_decode_seconds": {"480p": 2.0}},
        {"device": "NVIDIA B200", "step_seconds": {L: {"480p": {"1": 1.0}}}},
    ]}))
    t = CostTable.load(measured=path)
    assert t.step_seconds(L, "h200") == 4.0
    e = t.entry("step_seconds", L, "h200", "480p")
    assert e["status"] == "measured" and "NVIDIA H200" in e["source"]
    assert t.batch_marginal(L, "h200") == pytest.approx(0.9)
    assert t.step_seconds(L, "h200", batch=2) == pytest.approx(7.6)
    assert t.batch_marginal(L, "h100") == 0.97  # other GPUs keep the derived rule
    assert t.step_seconds(S, "h200", "720p") == 3.0
    assert t.text_encode_seconds("h200") == 0.5 and t.vae_decode_seconds("h200") == 2.0
    assert t.measured_devices == {"h200": "NVIDIA H200"}
    assert any("B200" in m for m in t.ignored_measurements)
    assert t.step_seconds(L, "h100") == pytest.approx(5.056)  # untouched


def test_real_shapes_output_is_read_as_a_measurement(tmp_path):
    path = tmp_path / "real_shapes.json"
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "latent_shape": [1, 16, 21, 60, 104],
                                "step_seconds": {"native": {L: {"median": 5.5}, S: {"median": 0.9}},
                                                 "xformers": {L: {"median": 5.2}, S: {"median": 0.95}}}}))
    (m,) = read_measurements(path)
    assert m["step_seconds"] == {L: {"480p": {"1": 5.2}}, S: {"480p": {"1": 0.9}}}
    t = CostTable(json.loads(derive.TABLE_PATH.read_text()), [m])
    assert t.step_seconds(L, "h100") == 5.2 and t.measured_devices == {"h100": "NVIDIA H100 80GB HBM3"}
    assert read_measurements(tmp_path / "missing.json") == []


def test_cross_checks_are_within_a_factor_of_two(table):
    for check in table.data["cross_checks"]:
        assert 0.5 <= check["table_over_published"] <= 2.0, check["what"]
        assert math.isfinite(check["table_s"])
