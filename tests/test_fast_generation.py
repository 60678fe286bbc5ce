"""The fast greedy path (static KV cache, compiled step on a GPU) gives the tokens ``generate`` gives: checked on a
CPU in fp32, uncompiled, for a left-padded batch with EOS and min_new_tokens, and with a streamer."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from helpers.models.fast_generation import FastGreedy, cache_length_bucket, generate_greedy, supports


@pytest.fixture(scope="module")
def batch(llava, processor, world):
    from helpers.data.chat_template import prompt_for_next_answer
    from helpers.models.inference import left_padding

    tok = processor.tokenizer
    questions = ["What colour is the shape?", "How many shapes are there in the picture, counted one by one?",
                 "Where is it?"]
    prompts = [prompt_for_next_answer([], q, tok.eos_token) for q in questions]
    images = [Image.open(p).convert("RGB") for p in sorted(world.images("val").glob("*.jpg"))[:3]]
    with left_padding(tok):
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()  # really left-padded
    return inputs


@pytest.mark.parametrize("min_new", [0, 12])
def test_static_cache_path_gives_generates_tokens(llava, processor, batch, min_new):
    torch.manual_seed(0)
    tok = processor.tokenizer
    kwargs = dict(max_new_tokens=12, min_new_tokens=min_new, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        expected = llava.generate(**batch, do_sample=False, use_cache=True, **kwargs)
    fast = FastGreedy(llava, batch_size=3, max_cache_len=cache_length_bucket(batch["input_ids"].shape[1] + 12, 256),
                      compile=False)
    got = fast.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], **kwargs)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    again = fast.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], **kwargs)  # reused
    assert torch.equal(again, expected)


def test_streamer_gets_the_same_text(llava, processor, batch):
    from transformers import TextIteratorStreamer

    tok = processor.tokenizer
    one = {k: v[:1] for k, v in batch.items()}
    expected = llava.generate(**one, do_sample=False, max_new_tokens=10, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    fast = FastGreedy(llava, compile=False, max_cache_len=256)
    out = fast.generate(one["input_ids"], one["attention_mask"], one["pixel_values"], max_new_tokens=10,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, streamer=streamer)
    assert torch.equal(out, expected)
    streamed = "".join(streamer)
    assert streamed == tok.decode(expected[0, one["input_ids"].shape[1]:], skip_special_tokens=True)


def test_fast_path_applies_only_to_plain_models_on_cuda(llava, batch, processor):
    assert supports(llava)[0]

    class Wrapped(torch.nn.Module):
        def get_base_model(self):
            return llava

    assert not supports(Wrapped())[0]
    tok = processor.tokenizer
    # no CUDA here: generate_greedy is model.generate
    out = generate_greedy(llava, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          max_new_tokens=5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ref = llava.generate(**batch, do_sample=False, max_new_tokens=5, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    assert torch.equal(out, ref)
    assert cache_length_bucket(300, 2048) == 512 and cache_length_bucket(3000, 2048) == 3000


def test_rows_that_end_are_padded_like_generate(llava, processor, batch):
    """Make a token the model does produce the 'EOS': rows stop at different steps and are padded after it."""
    tok = processor.tokenizer
    prompt = batch["input_ids"].shape[1]
    free = llava.generate(**batch, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                          eos_token_id=None)
    stop = int(free[0, prompt + 3])  # row 0 says it at its 4th token
    kwargs = dict(max_new_tokens=12, eos_token_id=stop, pad_token_id=tok.pad_token_id)
    expected = llava.generate(**batch, do_sample=False, **kwargs)
    fast = FastGreedy(llava, batch_size=4, max_cache_len=256, compile=False, pad_to_batch=True)  # 3 rows -> 4
    got = fast.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], **kwargs)
    assert torch.equal(got, expected)
    assert (got[0, prompt + 4:] == tok.pad_token_id).all() or got.shape[1] <= prompt + 4


def test_decoding_step_traces_as_one_graph(llava, processor, batch):
    """torch.compile(fullgraph=True) of the decoding step with dynamo only (backend "eager", no code generation):
    a graph break would raise here, on a CPU, before a GPU run finds it. Same tokens as generate."""
    torch._dynamo.reset()
    tok = processor.tokenizer
    kwargs = dict(max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    expected = llava.generate(**batch, do_sample=False, **kwargs)
    fast = FastGreedy(llava, batch_size=3, max_cache_len=256, compile=True, backend="eager")
    got = fast.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], **kwargs)
    assert torch.equal(got, expected)


def test_demo_answers_the_same_through_the_fast_path(llava, processor, world):
    from helpers.demo import DemoBackend

    image = sorted(world.images("val").glob("*.jpg"))[0]
    plain = DemoBackend(llava, processor, max_new_tokens=8, fast=False)
    fast = DemoBackend(llava, processor, max_new_tokens=8, fast=True)  # on a CPU: the same loop, not compiled
    assert plain.fast is None and fast.fast is not None and fast.fast_status.startswith("ready")
    for question in ("What colour is the shape?", "Is it on the left?"):
        a = plain.ask(str(image), question)
        b = fast.ask(str(image), question, state=None)
        assert a.chat[-1] == b.chat[-1] and not a.error


def test_generation_stops_when_every_row_has_ended(llava, processor, batch):
    tok = processor.tokenizer
    prompt = batch["input_ids"].shape[1]
    free = llava.generate(**batch, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id,
                          eos_token_id=None)
    stops = sorted({int(free[r, prompt + k]) for r, k in ((0, 1), (1, 0), (2, 2))})  # every row ends early
    kwargs = dict(max_new_tokens=12, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    expected = llava.generate(**batch, do_sample=False, **kwargs)
    assert expected.shape[1] < prompt + 12
    got = FastGreedy(llava, batch_size=3, max_cache_len=256, compile=False).generate(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], **kwargs)
    assert torch.equal(got, expected)
