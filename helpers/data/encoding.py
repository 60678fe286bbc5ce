"""Turn conversations into training tensors: token ids, answer-only labels, image-token expansion, padding.

Rules (each one guarded by a unit test):
* labels are -100 everywhere except the assistant answers, whose closing EOS *is* a target;
* padding is located by length (attention mask), never by token id: Phi-2's pad, EOS and UNK are one token;
* the text is rendered by the same chat template that builds inference prompts;
* ``<image>`` becomes ``image_seq_length`` placeholder tokens, as LlavaProcessor does at inference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from helpers.data.chat_template import render_with_answer_spans
from helpers.data.tokenizer import image_token_id

IGNORE_INDEX = -100


def encode_conversation(tok, messages: list[dict], image_seq_length: int, max_length: int | None = None):
    """Return ``{"input_ids", "labels"}`` (lists) for one conversation, or None if it exceeds `max_length`."""
    text, spans = render_with_answer_spans(messages, tok.eos_token)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    img = image_token_id(tok)
    input_ids, labels = [], []
    for token, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if token == img:
            input_ids.extend([img] * image_seq_length)
            labels.extend([IGNORE_INDEX] * image_seq_length)
            continue
        target = any(s <= start < e for s, e in spans)
        input_ids.append(token)
        labels.append(token if target else IGNORE_INDEX)
    if max_length is not None and len(input_ids) > max_length:
        return None
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(tok, prompt: str, image_seq_length: int) -> list[int]:
    """Token ids of an inference prompt with ``<image>`` expanded the same way as in training."""
    img = image_token_id(tok)
    ids = []
    for token in tok(prompt, add_special_tokens=False)["input_ids"]:
        ids.extend([img] * image_seq_length if token == img else [token])
    return ids


@dataclass
class PadCollator:
    """Right-pads a batch. The attention mask and labels come from each example's length, not from ids."""

    pad_token_id: int
    extra_keys: tuple[str, ...] = ("vision_features", "pixel_values")

    def __call__(self, examples: list[dict]) -> dict:
        longest = max(len(e["input_ids"]) for e in examples)
        n = len(examples)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            input_ids[i, :k] = torch.as_tensor(e["input_ids"])
            attention_mask[i, :k] = 1
            labels[i, :k] = torch.as_tensor(e["labels"])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in self.extra_keys:
            if key in examples[0]:
                batch[key] = torch.stack([torch.as_tensor(e[key]) for e in examples])
        return batch
