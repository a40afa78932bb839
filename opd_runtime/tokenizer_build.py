"""Builds the tiny world's tokenizer: byte-level BPE with Qwen3's special tokens and a ChatML template.

Digits are split one per token and text is pre-split the way Qwen3's tokenizer does, so the tiny models
see numbers as Qwen3 models do. The byte-level alphabet means any text (garbage included) encodes.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources

# Qwen3's special tokens, in Qwen3's order, so templates and stop tokens read the same.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"


def chat_template() -> str:
    return resources.files("opd_runtime").joinpath("templates/chatml_think.jinja").read_text()


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 384):
    """Train a BPE tokenizer on ``corpus`` and wrap it as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template()
    fast.padding_side = "left"
    return fast
