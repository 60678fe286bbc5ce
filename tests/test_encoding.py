"""Label masking, pad vs EOS, and the identity of training text and inference prompts."""

from helpers.data.chat_template import from_llava, prompt_for_next_answer, render, user_message
from helpers.data.encoding import IGNORE_INDEX, PadCollator, encode_conversation, encode_prompt
from helpers.data.tokenizer import image_token_id

MESSAGES = [
    user_message("What colour is the square?", with_image=True), {"role": "assistant", "content": "red"},
    user_message("Where is it?", with_image=False), {"role": "assistant", "content": "top left"},
]


def test_pad_eos_and_unk_are_one_token_like_phi2(tok):
    assert tok.pad_token_id == tok.eos_token_id == tok.unk_token_id


def test_only_answer_tokens_and_their_eos_are_targets(tok):
    enc = encode_conversation(tok, MESSAGES, image_seq_length=16)
    targets = [t for t, l in zip(enc["input_ids"], enc["labels"]) if l != IGNORE_INDEX]
    assert tok.decode(targets) == " red<|endoftext|> top left<|endoftext|>"
    # labels equal input ids where they are targets (the model shifts internally: one teacher-forced forward)
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(enc["input_ids"], enc["labels"]))
    # question words never become targets
    assert tok.convert_tokens_to_ids("ĠWhat") not in targets


def test_image_placeholder_is_expanded_and_never_a_target(tok):
    enc = encode_conversation(tok, MESSAGES, image_seq_length=16)
    img = image_token_id(tok)
    positions = [i for i, t in enumerate(enc["input_ids"]) if t == img]
    assert len(positions) == 16 and positions == list(range(positions[0], positions[0] + 16))
    assert all(enc["labels"][i] == IGNORE_INDEX for i in positions)


def test_padding_is_masked_by_length_not_by_id(tok):
    short = encode_conversation(tok, MESSAGES[:2], image_seq_length=4)
    long = encode_conversation(tok, MESSAGES, image_seq_length=4)
    batch = PadCollator(tok.pad_token_id)([short, long])
    n = len(short["input_ids"])
    # the EOS closing the short answer is a target although it has the pad id ...
    assert short["input_ids"][-1] == tok.pad_token_id
    assert batch["labels"][0, n - 1] == tok.eos_token_id
    assert batch["attention_mask"][0, n - 1] == 1
    # ... while the padding after it (same id) is ignored and unattended
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all()


def test_training_text_starts_with_the_inference_prompt_at_every_turn(tok):
    full = render(MESSAGES, tok.eos_token)
    history = []
    for k in range(0, len(MESSAGES), 2):
        question = MESSAGES[k]["content"].split("\n", 1)[-1]
        prompt = prompt_for_next_answer(history, question, tok.eos_token)
        assert full.startswith(prompt)
        answer_text = full[len(prompt):]
        assert answer_text.startswith(" " + MESSAGES[k + 1]["content"] + tok.eos_token)
        history += MESSAGES[k: k + 2]


def test_prompt_tokens_are_a_prefix_of_training_tokens(tok):
    enc = encode_conversation(tok, MESSAGES, image_seq_length=16)
    prompt = prompt_for_next_answer(MESSAGES[:2], "Where is it?", tok.eos_token)
    ids = encode_prompt(tok, prompt, image_seq_length=16)
    assert enc["input_ids"][: len(ids)] == ids
    assert enc["labels"][len(ids)] != IGNORE_INDEX  # the very next token is the first answer token


def test_stock_processor_builds_the_same_ids_as_training(tok, processor, profile):
    from PIL import Image

    prompt = prompt_for_next_answer([], "What colour is the square?", tok.eos_token)
    image = Image.new("RGB", (profile.vision.image_size,) * 2)
    by_processor = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    assert by_processor == encode_prompt(tok, prompt, profile.image_seq_length)


def test_the_tokenizer_carries_the_same_template(tok):
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered == render(MESSAGES, tok.eos_token)


def test_llava_conversation_format_is_read(tok):
    conv = [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "circle"}]
    assert from_llava(conv)[1] == {"role": "assistant", "content": "circle"}


def test_too_long_conversation_is_refused(tok):
    assert encode_conversation(tok, MESSAGES, image_seq_length=16, max_length=10) is None
