"""The word-level tokenizer of srd-tiny, built in code (no download), saved as a `PreTrainedTokenizerFast`.

It lowercases, drops punctuation, splits on whitespace, maps unknown words to `<unk>` and appends `</s>` like T5's
tokenizer, so diffusers' `WanPipeline` (`padding="max_length", max_length=512, truncation=True,
add_special_tokens=True`) tokenizes prompts with it unchanged.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from srserve.tiny.domain import COLORS, DIRECTIONS, SHAPES

SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: UMT5's pad / eos / unk ids
EXTRA_WORDS = ("a", "an", "the", "moving", "is", "and", "then", "on", "black", "background", ".", ",")
MAX_LENGTH = 512


def vocabulary() -> dict[str, int]:
    words = list(SPECIALS) + list(EXTRA_WORDS) + list(COLORS) + list(SHAPES) + list(DIRECTIONS)
    return {w: i for i, w in enumerate(words)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = vocabulary()
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    # Punctuation is dropped, so "A red circle moving right." tokenizes like the training prompts.
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_LENGTH,
        padding_side="right",
    )
