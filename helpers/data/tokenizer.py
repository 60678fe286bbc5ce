"""Tokenizers: Phi-2's own (full) or a small byte-level BPE of the same kind trained offline (tiny).

Why a trained BPE in tiny mode: Phi-2's tokenizer is GPT-2's byte-level BPE (50k merges). A 1M-parameter
model with a 51,200-row embedding would spend almost all its parameters and CPU time on the vocabulary.
We therefore train the *same algorithm* (byte-level BPE, GPT-2 pre-tokenizer, ``<|endoftext|>`` as
BOS/EOS/UNK/PAD exactly like Phi-2) with the ``tokenizers`` library on the synthetic corpus, with a few hundred
merges. Every property the course relies on is shared, in particular the trap that **pad == EOS == UNK**:
padding must never be masked by id.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from helpers.data.chat_template import CHAT_TEMPLATE, EOS_TOKEN, IMAGE_TOKEN


def train_bpe_tokenizer(texts, vocab_size: int, out_dir: str | Path | None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (an iterable of strings, or a path to a text file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, IMAGE_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    if isinstance(texts, (str, Path)):
        texts = Path(texts).read_text().splitlines()
    pieces = (piece for text in texts for piece in text.replace(IMAGE_TOKEN, "\n").split(EOS_TOKEN))
    bpe.train_from_iterator(pieces, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                  unk_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                  extra_special_tokens={"image_token": IMAGE_TOKEN})
    return finish_tokenizer(tok, out_dir)


def finish_tokenizer(tok, out_dir: str | Path | None = None):
    """Make any Phi-2-style tokenizer course-ready: ``<image>`` special token, pad = EOS, our chat template."""
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # Phi-2 ships none; its pad *is* EOS: mask padding by attention, never by id
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    tok.model_max_length = 2048
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def load_tokenizer(path_or_name: str | Path):
    tok = AutoTokenizer.from_pretrained(str(path_or_name))
    return finish_tokenizer(tok)


def image_token_id(tok) -> int:
    return tok.convert_tokens_to_ids(IMAGE_TOKEN)
