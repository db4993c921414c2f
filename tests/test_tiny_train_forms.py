"""srd-tiny training pieces for the harder prompt forms: data mix, text binding, splits, VAE check per form."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from srserve.tiny import models as M
from srserve.tiny.common import clip_tensor, parse_forms
from srserve.tiny.domain import parse_scene, prompts_of
from srserve.tiny.quality import CALIBRATION_SEED_BASE, HELD_OUT_SEED_BASE, held_out_pairs
from srserve.tiny.tokenizer import build_tokenizer
from srserve.tiny.train import COMPACT_LEN, parse_clip_counts, training_prompts


def test_training_prompts_cover_every_form_and_fit_the_compact_rows():
    prompts = training_prompts()
    assert len(prompts) == 72 + 4320 + 216 and len(set(prompts)) == len(prompts)
    tok = build_tokenizer()
    lens = [len(tok(p).input_ids) for p in prompts[::97]]
    assert max(lens) < COMPACT_LEN  # one padding row at least, which the compact attention bias needs
    assert tok.unk_token_id not in tok("a red circle moving left then up").input_ids


def test_clip_counts_and_forms_are_validated():
    assert parse_clip_counts("core:2,pair:3") == {"core": 2, "pair": 3}
    assert parse_forms("core, then") == ("core", "then")
    for bad in ("core:x", "nope:3", "pair"):
        with pytest.raises(ValueError, match="FORM"):
            parse_clip_counts(bad)
    with pytest.raises(ValueError, match="forms"):
        parse_forms("core,nope")


def test_clip_tensor_draws_each_form_and_keeps_the_core_draw():
    pair = clip_tensor(np.random.default_rng(0), 17, forms=("pair",))
    assert pair.shape == (3, 17, 64, 64)
    colors = {tuple(v) for v in ((pair[:, 0] + 1) / 2).reshape(3, -1).T.round(decimals=2).tolist() if max(v) > 0.5}
    assert len(colors) >= 2  # two objects of distinct colors in the first frame
    # the core form consumes the generator exactly as the first bundle's training did
    assert torch.equal(clip_tensor(np.random.default_rng(5)), clip_tensor(np.random.default_rng(5), forms=("core",)))


def test_text_encoder_tells_which_color_goes_with_which_shape():
    tok, enc = build_tokenizer(), M.make_text_encoder(0)

    def rows(text):
        t = tok([text], return_tensors="pt")
        with torch.no_grad():
            return enc(t.input_ids, t.attention_mask).last_hidden_state[0]

    def set_distance(a, b):  # cross-attention sees the rows as a set
        d = torch.cdist(rows(a), rows(b))
        return float(d.min(1).values.mean() + d.min(0).values.mean()) / 2

    base = "a red circle moving left and a blue square moving up"
    swapped = set_distance(base, "a red square moving left and a blue circle moving up")
    one_word = set_distance(base, "a red triangle moving left and a blue square moving up")
    assert swapped > 0.5 * one_word, (swapped, one_word)


def test_splits_draw_different_prompts_of_the_new_forms():
    for form in ("pair", "then"):
        held = held_out_pairs(24, HELD_OUT_SEED_BASE, form)
        cal = held_out_pairs(24, CALIBRATION_SEED_BASE, form)
        assert all(parse_scene(p)[0] == form for p, _ in held + cal)
        assert {p for p, _ in held} != {p for p, _ in cal} and len({p for p, _ in held}) == 24
        assert set(p for p, _ in held) <= set(prompts_of(form))
    assert held_out_pairs(3) == [(p, HELD_OUT_SEED_BASE + i) for i, p in enumerate(prompts_of("core")[:3])]
