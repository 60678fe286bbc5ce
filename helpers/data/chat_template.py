"""The one chat template of the course, used verbatim at training and at inference.

Phi-2 has no chat template of its own; LLaVA-Phi, TinyLLaVA and Bunny use ``USER: <image>\\n... ASSISTANT: ...``
with ``<|endoftext|>`` closing each answer. We write it as a Jinja chat template so that it is stored with the
tokenizer/processor and any stock tool (``apply_chat_template``, serving engines) renders the same string.
The ``{% generation %}`` block marks the assistant answer *including its EOS*: those characters are the only
training targets.
"""
from __future__ import annotations

from transformers.utils.chat_template_utils import render_jinja_template

IMAGE_TOKEN = "<image>"
EOS_TOKEN = "<|endoftext|>"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'USER: ' + message['content'] + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT:' }}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def from_llava(conversations: list[dict]) -> list[dict]:
    """LLaVA's ``[{"from": "human"|"gpt", "value": ...}]`` -> chat messages ``[{"role", "content"}]``."""
    messages = []
    for turn in conversations:
        role = _ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"unknown speaker in conversation turn: {turn!r}")
        messages.append({"role": role, "content": turn.get("value", turn.get("content"))})
    return messages


def user_message(question: str, with_image: bool) -> dict:
    """A user turn as the template expects it: the first one of a conversation carries ``<image>\\n``."""
    question = question.strip()
    return {"role": "user", "content": (IMAGE_TOKEN + "\n" + question) if with_image else question}


def render(messages: list[dict], eos_token: str = EOS_TOKEN, add_generation_prompt: bool = False) -> str:
    rendered, _ = render_jinja_template([messages], chat_template=CHAT_TEMPLATE, eos_token=eos_token,
                                        add_generation_prompt=add_generation_prompt,
                                        return_assistant_tokens_mask=True)
    return rendered[0]


def render_with_answer_spans(messages: list[dict], eos_token: str = EOS_TOKEN) -> tuple[str, list[tuple[int, int]]]:
    """The training text and the character spans of the assistant answers (each ending with EOS)."""
    rendered, spans = render_jinja_template([messages], chat_template=CHAT_TEMPLATE, eos_token=eos_token,
                                            return_assistant_tokens_mask=True)
    return rendered[0], [tuple(s) for s in spans[0]]


def prompt_for_next_answer(history: list[dict], question: str, eos_token: str = EOS_TOKEN) -> str:
    """Inference prompt: the whole chat so far, the new question, then ``ASSISTANT:`` to be continued."""
    messages = list(history) + [user_message(question, with_image=not history)]
    return render(messages, eos_token, add_generation_prompt=True)


def render_text_dialogue(turns: list[dict], eos_token: str = EOS_TOKEN) -> str:
    """Text-only dialogue (no image) in the same template, for the pretraining corpus."""
    messages = []
    for turn in turns:
        messages.append(user_message(turn["question"], with_image=False))
        messages.append({"role": "assistant", "content": turn["answer"]})
    return render(messages, eos_token)
