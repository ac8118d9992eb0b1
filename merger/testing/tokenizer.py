"""A byte-level tokenizer that needs no download: 256 byte tokens plus ``<|endoftext|>``.

Tiny local models (tests, the demo trajectory) save it next to their weights so that
transformers and lm-eval load them like any Hub model.
"""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` with the GPT-2 byte alphabet and no merges (vocab 257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    fast.pad_token = EOS
    return fast


def save_byte_tokenizer(folder: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``folder``."""
    byte_tokenizer().save_pretrained(str(folder))
