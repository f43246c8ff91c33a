"""The quality gate's checks and verdict (inference/prepare/quality.py). The gate itself runs
on every chat build (`npugate prepare`, `npugate pull`); its counts for the default model are
held by the guardrail."""

from __future__ import annotations

from typing import Any

from inference.prepare.quality import (
    MARGIN,
    PROMPTS,
    code_passes,
    contains,
    is_loop,
    json_where,
    score,
)


def test_the_checks_judge_usable_answers() -> None:
    assert contains("Paris")("The capital of France is Paris.")
    assert not contains("Paris")("Comparisons are hard.")  # whole words only
    assert contains("seven", "7")("There are 7 days.")
    extract = json_where(lambda v: v["name"] == "Maria" and int(v["age"]) == 34)
    assert extract('Here it is:\n```json\n{"name": "Maria", "age": 34}\n```')
    assert extract('{"name": "Maria", "age": "34"}')
    assert not extract("Maria is 34.") and not extract('{"name": "Maria"}')
    add = code_passes("assert add(2, 3) == 5")
    assert add("Sure:\n```python\ndef add(a, b):\n    return a + b\n```")
    assert add("def add(a, b):\n    return a + b")
    assert not add("```python\ndef add(a, b):\n    return a - b\n```")
    assert not add("I cannot write code.")
    assert not code_passes("assert True")("```python\nwhile True: pass\n```")  # 10 s limit


def test_a_loop_is_a_short_span_repeated_to_the_limit() -> None:
    assert is_loop([5, 1, 2, 3, 1, 2, 3, 1, 2, 3], ended=False)
    assert not is_loop([5, 1, 2, 3, 1, 2, 3, 1, 2, 3], ended=True)  # it stopped by itself
    assert not is_loop(list(range(100)), ended=False)
    assert is_loop([9] * 3, ended=False)


def _answers(texts: list[str], ids: list[list[int]] | None = None,
             ended: bool = True) -> list[dict[str, Any]]:
    return [{"text": t, "ids": ids[i] if ids else [i], "ended": ended}
            for i, t in enumerate(texts)]


def test_a_build_worse_than_its_source_fails_with_the_reason() -> None:
    right = ["Paris", "Tokyo"] + ["?"] * (len(PROMPTS) - 2)
    wrong = ["Lyon", "Osaka"] + ["?"] * (len(PROMPTS) - 2)
    source = _answers(right)
    same = score(_answers(right), source)
    assert same["passed"] and same["identical"] == len(PROMPTS) and same["correct"] == 2
    worse = score(_answers(wrong, [[-1]] * len(PROMPTS)), source)
    assert worse["identical"] == 0 and worse["correct"] == 0 and worse["correct_fp32"] == 2
    assert worse["passed"] is (MARGIN >= 2)
    looping = score(_answers(right, [[7, 7, 7]] * len(PROMPTS), ended=False), source)
    assert not looping["passed"] and "loops" in looping["reason"]
    assert len(looping["answers"]) == len(PROMPTS) == 30
