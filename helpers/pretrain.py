"""Stage 01: pretrain a Phi-architecture causal LM from scratch on clean text.

Documents are tokenized, each closed by EOS, concatenated and cut into fixed-length blocks ("packing"), so no
padding exists at all and EOS is an ordinary target. One teacher-forced forward per batch; the model shifts the
labels by one internally.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .modeling import new_phi_lm
from .training import training_arguments


class PackedBlocks(Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def pack_documents(tok, documents: list[str], block_size: int) -> torch.Tensor:
    """Tokenize, append EOS where a document lacks it, concatenate, cut into ``block_size`` blocks."""
    stream: list[int] = []
    for doc in documents:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        if not ids or ids[-1] != tok.eos_token_id:
            ids.append(tok.eos_token_id)
        stream.extend(ids)
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(f"not enough text for one block of {block_size} tokens ({len(stream)} tokens)")
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def split_blocks(blocks: torch.Tensor, heldout_fraction: float = 0.05, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=g)
    n_eval = max(1, int(len(blocks) * heldout_fraction))
    return blocks[order[n_eval:]], blocks[order[:n_eval]]


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Token-weighted mean next-token cross-entropy of `model` on `blocks` (nats/token)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i: i + batch_size].to(device)
        out = model(input_ids=ids, labels=ids)
        n = ids.numel() - ids.shape[0]  # targets per block: length - 1
        total += float(out.loss) * n
        count += n
    return total / count


def read_corpus(path: str | Path) -> list[str]:
    return [line for line in Path(path).read_text().splitlines() if line.strip()]


def load_text_documents(profile, paths) -> list[str]:
    """Tiny: the synthetic world's corpus. Full: clean text from the Hub (TinyStories by default)."""
    if profile.world is not None:
        from .world import build_world

        return read_corpus(build_world(paths.world, profile.world).corpus)
    from datasets import load_dataset

    n = profile.n_train_samples or 20000
    ds = load_dataset(profile.pretrain_text_dataset, split=f"train[:{n}]")
    return [row["text"] for row in ds if row["text"].strip()]


def pretrain(profile, paths, tok, documents: list[str], callbacks=None):
    """Train a fresh Phi LM on `documents`; returns (trainer, model, held-out blocks, initial loss)."""
    from transformers import Trainer

    blocks = pack_documents(tok, documents, profile.pretrain_block_size)
    train_blocks, heldout = split_blocks(blocks, seed=profile.seed)
    model = new_phi_lm(profile.pretrain_phi, tok, seed=profile.seed)
    initial = mean_loss(model, heldout)
    args = training_arguments(profile.pretrain, paths.stage_dir("01_pretrain") / "trainer", profile.seed,
                              n_examples=len(train_blocks))
    trainer = Trainer(model=model, args=args, train_dataset=PackedBlocks(train_blocks), callbacks=callbacks)
    trainer.train()
    return trainer, model, heldout, initial


def uniform_loss(vocab_size: int) -> float:
    """Cross-entropy of a model that knows nothing: ln(vocabulary size)."""
    return math.log(vocab_size)


@torch.no_grad()
def sample_continuations(model, tok, prompts: list[str], max_new_tokens: int = 40):
    """Greedy continuations (KV-cached, stopping at EOS) of each prompt."""
    model.eval()
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.append((prompt, tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=False)))
    return out
