"""Renders a model's own Jinja chat template into a prompt string, as transformers does."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from inference.errors import InvalidInput


class ChatTemplate:
    """A compiled chat template. Templates run sandboxed: they come from model folders."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(source)
        # Templates written for tool calling read a `tools` variable (Hugging Face's
        # convention); for the others, the server describes tools in a system message.
        self.supports_tools = "tools" in source
        self._bos = bos_token
        self._eos = eos_token

    def render(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render `messages` ({"role", "content"} dicts with string content, and what else
        the template reads: `tool_calls`, `tool_call_id`)."""
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
                tools=tools if self.supports_tools else None,
            )
        except TemplateError as exc:
            raise InvalidInput(f"the model's chat template rejected the messages: {exc}",
                               param="messages") from exc


def _raise_exception(message: str) -> None:
    raise TemplateError(message)
