"""Named chat templates for scorer models whose tokenizer lacks the right one.

The implicit reward is only meaningful when each model sees the prompt the way it was trained
to see it, so a scorer model renders the chat with its training-time template. Hub tokenizers
usually ship theirs; these names cover the paper's pairs (zephyr, tulu) and a few others, and
GGUF exports or base models that carry none. Each value is a jinja string for
`tokenizer.apply_chat_template(..., chat_template=...)`; every template ends with the
assistant header when `add_generation_prompt` is set, so the response follows directly.
"""
from __future__ import annotations

# zephyr-7b-beta: `<|role|>\n{content}</s>\n` per turn, generation prompt `<|assistant|>\n`.
ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Tulu 2: no EOS after user/system turns; an assistant turn ends with EOS.
TULU = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# OpenChat 3.5: the BOS is part of its template (as on the hub); a system message is bare text.
OPENCHAT = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] + '<|end_of_turn|>' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ 'GPT4 Correct User: ' + message['content'] + '<|end_of_turn|>' }}"
    "{% else %}"
    "{{ 'GPT4 Correct Assistant: ' + message['content'] + '<|end_of_turn|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"
)

# Base models: the message texts back to back, nothing added (the prompt is the instruction).
RAW = "{% for message in messages %}{{ message['content'] }}{% endfor %}"

TEMPLATES: dict[str, str] = {
    "zephyr": ZEPHYR,
    "tulu": TULU,
    "openchat": OPENCHAT,
    "raw": RAW,
}


def resolve_template(name_or_jinja: str | None) -> str | None:
    """The jinja for a template name, a literal jinja string as given, or None (tokenizer's own).

    A string with no jinja tag at all would render the same text for every conversation, which
    is never what anyone means: it is almost surely a misspelt name, so it is refused.
    """
    if name_or_jinja is None:
        return None
    if name_or_jinja in TEMPLATES:
        return TEMPLATES[name_or_jinja]
    if "{{" not in name_or_jinja and "{%" not in name_or_jinja:
        known = ", ".join(sorted(TEMPLATES))
        raise ValueError(f"unknown chat template {name_or_jinja!r} (known names: {known}; or give a jinja string)")
    return name_or_jinja
