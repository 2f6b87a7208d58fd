"""Chat-format pool rows (`messages: [{role, content}, ...]`) rendered with the base model's own chat template.

A chat row trains the model to produce its last turn, which must be the assistant's: the prompt is every
earlier turn rendered by the tokenizer's chat template with the generation prompt appended (exactly what the
model sees before it answers at inference), the response is the last turn's content. The row's `messages`
stay in the pool as an extra column, so the exported selection holds them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


def messages_problem(messages: Any) -> str | None:
    """Why `messages` is not a trainable chat row, or None."""
    if not isinstance(messages, list | tuple) or not messages:
        return "messages must be a non-empty list of {role, content} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"messages[{i}] must be an object with string `role` and `content`"
        if m["role"] not in ROLES:
            return f"messages[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}"
        if "\x00" in m["content"]:
            return f"messages[{i}] content contains a NUL character"
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return "the last message must be a non-blank assistant turn (the response it trains on)"
    if not any(m["role"] == "user" for m in messages[:-1]):
        return "no user turn before the assistant's answer"
    return None


class ChatTemplate:
    """Renders chat rows as (prompt, response) with the tokenizer of `model` (loaded on first use: a pool
    without chat rows never loads it)."""

    def __init__(self, model: str, *, trust_remote_code: bool = False) -> None:
        self.model, self.trust_remote_code = model, trust_remote_code
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.model, trust_remote_code=self.trust_remote_code)
            if not getattr(tok, "chat_template", None):
                raise ValueError(
                    f"base model {self.model}: its tokenizer has no chat template, so chat rows (`messages`) "
                    "cannot be rendered as it would see them; use a chat model, or give the rows as prompt/response"
                )
            self._tokenizer = tok
        return self._tokenizer

    def __call__(self, messages: Sequence[dict[str, str]]) -> tuple[str, str]:
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        prompt = self.tokenizer.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
        return prompt, turns[-1]["content"]
