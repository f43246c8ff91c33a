from __future__ import annotations

import pytest

from inference.chat.detokenizer import IncrementalDetokenizer
from inference.chat.model import ChatModel

TEXTS = ["naïve café 🤖🎉 done", "東京は日本の首都です。", "mixed: 👩‍💻 and 中文 ok"]


def _stream(model: ChatModel, text: str) -> list[str]:
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(model.tokenizer)
    pieces = [detok.step(i) for i in ids]
    return [*pieces, detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_bpe_never_emits_broken_characters(smollm2: ChatModel, text: str) -> None:
    pieces = _stream(smollm2, text)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    # the split really happened: some tokens completed no character on their own
    assert "" in pieces[:-1]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_fallback_sentencepiece_never_emits_broken_characters(phi3: ChatModel,
                                                                  text: str) -> None:
    pieces = _stream(phi3, text)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces).strip() == text


def test_incomplete_character_at_the_end_is_dropped(smollm2: ChatModel) -> None:
    ids = smollm2.tokenizer.encode("ok 🤖", add_special_tokens=False).ids
    detok = IncrementalDetokenizer(smollm2.tokenizer)
    text = "".join(detok.step(i) for i in ids[:-1])  # stop before the emoji completes
    assert text + detok.flush() == "ok "


def test_any_vocabulary_id_is_accepted(phi3: ChatModel) -> None:
    detok = IncrementalDetokenizer(phi3.tokenizer)
    out = "".join(detok.step(i) for i in range(0, phi3.vocab_size, 997)) + detok.flush()
    assert "\ufffd" not in out
