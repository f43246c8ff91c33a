from __future__ import annotations

import pytest

from inference.chat.model import ChatModel
from inference.chat.template import ChatTemplate
from inference.errors import InvalidInput


def test_smollm2_template_renders_chatml(smollm2: ChatModel) -> None:
    text = smollm2.template.render([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the template's default system prompt


def test_phi3_template_renders_phi3_format(phi3: ChatModel) -> None:
    text = phi3.template.render([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hi"}])
    assert text == "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    ids = phi3.encode_prompt([{"role": "user", "content": "Hi"}])
    assert 32010 in ids and 32007 in ids and 32001 in ids  # <|user|>, <|end|>, <|assistant|>


def test_template_exceptions_become_invalid_input() -> None:
    tpl = ChatTemplate("{% if messages[0]['role'] != 'user' %}"
                       "{{ raise_exception('first message must be from the user') }}{% endif %}")
    with pytest.raises(InvalidInput, match="first message must be from the user"):
        tpl.render([{"role": "assistant", "content": "x"}])


def test_templates_are_sandboxed() -> None:
    tpl = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidInput):
        tpl.render([])
