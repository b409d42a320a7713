"""The prompt of a chat: the conversation rendered with a chat template (transformers' Jinja format).

The template is, in order: the file named by CHAT_TEMPLATE, the tokenizer's own chat template, or
`BASE_MODEL_TEMPLATE`, a plain transcript for base models that were never trained on chat markup:

    You are a helpful assistant.

    User: Hello!
    Assistant: Hi. How can I help?
    User: Name a colour.
    Assistant:

A base model would happily go on to write the user's next line too, so with that template the
generation also stops at `STOP_MARKERS` (the start of the next turn).
"""

from __future__ import annotations

from dataclasses import dataclass

BASE_MODEL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Where the next turn of BASE_MODEL_TEMPLATE would begin.
STOP_MARKERS = ("\nUser:",)


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja text
    origin: str  # "CHAT_TEMPLATE=<path>", "the tokenizer's" or "the base-model default"
    stop: tuple[str, ...] = ()  # strings that end the assistant's turn besides end-of-text

    def render(self, tokenizer, messages: list[dict[str, str]]) -> str:
        """The prompt text, ending where the assistant's answer begins."""
        return tokenizer.apply_chat_template(messages, chat_template=self.source, tokenize=False,
                                             add_generation_prompt=True)


def read_template_file(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def chat_template(settings, tokenizer) -> ChatTemplate:
    """The template in force for this server and model (CHAT_TEMPLATE was checked at boot)."""
    if settings.chat_template:
        return ChatTemplate(read_template_file(settings.chat_template), f"CHAT_TEMPLATE={settings.chat_template}")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own.strip():
        return ChatTemplate(own, "the tokenizer's")
    return ChatTemplate(BASE_MODEL_TEMPLATE, "the base-model default", STOP_MARKERS)
