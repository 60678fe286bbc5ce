"""Packing for pretraining: whole documents per block, padding masked by length, every real EOS a target."""
import torch

from helpers.pretrain import PackedBlocks, pack_documents, split_blocks


def test_documents_are_packed_whole_and_padding_is_masked(tok):
    docs = ["USER: Where is it? ASSISTANT: top left<|endoftext|>", "USER: What shape? ASSISTANT: circle",
            "USER: How many objects are there? ASSISTANT: two<|endoftext|>"]
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
    lengths[1] += 1  # the second document gets its missing EOS
    block = lengths[0] + lengths[1] + 2  # room for the first two documents, not the third
    ids, mask = pack_documents(tok, docs, block)
    assert ids.shape == (2, block)
    assert mask[0].sum() == lengths[0] + lengths[1] and mask[1].sum() == lengths[2]
    eos = tok.eos_token_id
    assert ids[0, lengths[0] - 1] == eos and ids[0, lengths[0] + lengths[1] - 1] == eos
    example = PackedBlocks(ids, mask)[0]
    # padding (same id as EOS) is ignored; the real EOS tokens are targets
    assert (example["labels"][mask[0] == 0] == -100).all()
    assert example["labels"][lengths[0] - 1] == eos
    assert (ids[0][mask[0] == 0] == tok.pad_token_id).all()


def test_overlong_document_is_split_rather_than_dropped(tok):
    doc = " ".join(["red square"] * 40)
    n = len(tok(doc, add_special_tokens=False)["input_ids"]) + 1
    ids, mask = pack_documents(tok, [doc], 16)
    assert int(mask.sum()) == n


def test_split_is_disjoint_and_complete(tok):
    ids = torch.arange(40).view(20, 2)
    (tr, trm), (ho, hom) = split_blocks((ids, torch.ones_like(ids)), heldout_fraction=0.25, seed=0)
    assert len(tr) == 15 and len(ho) == 5
    assert sorted(torch.cat([tr, ho])[:, 0].tolist()) == ids[:, 0].tolist()
