"""The quality gate: everyday prompts with answers a simple check can judge, decoded greedy
and free-running by a build and by the fp32 model it came from.

Each build reports three counts out of `len(PROMPTS)`: answers token-for-token identical to
the fp32 model's, answers the check judges right (contains "Paris", parses as the JSON asked
for, the code runs and passes its test), and degenerate loops (an answer that ends by
repeating a short span until the token limit). A build that is worse than its source by more
than `MARGIN` in right answers or loops fails, with the reason. `npugate prepare` and
`npugate pull` record the result in the model's manifest; `npugate models` shows it.

The checks are deliberately loose: they judge whether an answer is usable, not its wording.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_NEW_TOKENS = 128
MARGIN = 2  # right answers and loops a build may lose to its fp32 source
BRIEF = "You are a helpful assistant. Answer briefly."


def contains(*words: str) -> Callable[[str], bool]:
    """Right when the answer contains any of `words` (case-insensitive, whole words)."""
    patterns = [re.compile(rf"(?<![\w]){re.escape(w)}(?![\w])", re.IGNORECASE) for w in words]
    return lambda text: any(p.search(text) for p in patterns)


def _json_value(text: str) -> Any:
    """The first JSON object or list in `text` (a fenced block, or bare)."""
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    candidates = [fenced.group(1)] if fenced else []
    candidates += [m.group(0) for m in re.finditer(r"\{.*\}|\[.*\]", text, re.DOTALL)]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def json_where(test: Callable[[Any], bool]) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        value = _json_value(text)
        try:
            return value is not None and bool(test(value))
        except (TypeError, KeyError, AttributeError, ValueError):
            return False
    return check


def code_passes(test: str) -> Callable[[str], bool]:
    """Right when the answer's Python (a fenced block, else the text from its first `def`)
    runs and then `test` (asserts) passes, in a separate interpreter with a 10 s limit."""
    def check(text: str) -> bool:
        fenced = re.search(r"```(?:python|py)?\s*(.*?)```", text, re.DOTALL)
        code = fenced.group(1) if fenced else text[text.find("def "):] if "def " in text \
            else ""
        if not code.strip():
            return False
        try:
            done = subprocess.run([sys.executable, "-I", "-c", code + "\n" + test],
                                  capture_output=True, timeout=10, check=False)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0
    return check


def words_at_least(n: int) -> Callable[[str], bool]:
    return lambda text: len(re.findall(r"\w+", text)) >= n


@dataclass(frozen=True)
class Prompt:
    text: str
    check: Callable[[str], bool]
    system: str | None = None

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": self.text}]


PROMPTS = (
    Prompt("What is the capital of France?", contains("Paris")),
    Prompt("What is the capital of Japan?", contains("Tokyo")),
    Prompt("What is the capital of Italy?", contains("Rome"), BRIEF),
    Prompt("How many days are there in a week?", contains("seven", "7")),
    Prompt("What is 12 plus 7?", contains("19"), BRIEF),
    Prompt("What is 9 times 8?", contains("72")),
    Prompt("What colour is the sky on a clear day?", contains("blue")),
    Prompt("Which planet is known as the Red Planet?", contains("Mars"), BRIEF),
    Prompt("What is the largest ocean on Earth?", contains("Pacific")),
    Prompt("Who wrote Romeo and Juliet?", contains("Shakespeare")),
    Prompt("What gas do plants take in from the air to make food?",
           contains("carbon dioxide", "CO2"), BRIEF),
    Prompt("At what temperature in degrees Celsius does water boil at sea level?",
           contains("100")),
    Prompt("Translate 'thank you' into Spanish.", contains("gracias")),
    Prompt("Translate 'good morning' into French.", contains("bonjour"), BRIEF),
    Prompt("What is the opposite of 'hot'?", contains("cold")),
    Prompt("How many legs does a spider have?", contains("eight", "8")),
    Prompt("Give me one synonym for 'happy'.",
           contains("joyful", "glad", "cheerful", "content", "delighted", "pleased",
                    "merry", "elated", "joyous", "jolly", "ecstatic", "thrilled"), BRIEF),
    Prompt("How do I boil an egg? Answer in two sentences.", contains("water", "boil")),
    Prompt("Write a Python function add(a, b) that returns the sum of a and b.",
           code_passes("assert add(2, 3) == 5")),
    Prompt("Write a Python function is_even(n) that returns True when n is even.",
           code_passes("assert is_even(4) and not is_even(3)"), BRIEF),
    Prompt("Write a Python function reverse_string(s) that returns s reversed.",
           code_passes("assert reverse_string('abc') == 'cba'")),
    Prompt("Extract the name and the age from this sentence as a JSON object with keys "
           "\"name\" and \"age\": Maria is 34 years old.",
           json_where(lambda v: "maria" in str(v["name"]).lower() and int(v["age"]) == 34)),
    Prompt("Return a JSON list of three fruits, and nothing else.",
           json_where(lambda v: isinstance(v, list) and len(v) == 3), BRIEF),
    Prompt("Summarize in one sentence: The city council voted on Tuesday to build a new "
           "public library downtown. It will open in 2026 and will include a reading room "
           "for children.", contains("library")),
    Prompt("What is the chemical symbol for gold?", contains("Au")),
    Prompt("How many continents are there on Earth?", contains("seven", "7"), BRIEF),
    Prompt("What is the square root of 81?", contains("9", "nine")),
    Prompt("Which animal is called the king of the jungle?", contains("lion")),
    Prompt("What language do most people in Brazil speak?", contains("Portuguese"), BRIEF),
    Prompt("Write a haiku about autumn.", words_at_least(5)),
)


def is_loop(ids: list[int], ended: bool, min_repeats: int = 3, max_period: int = 32) -> bool:
    """An answer that ran to the token limit ending in a span of at most `max_period` tokens
    repeated at least `min_repeats` times."""
    if ended:
        return False
    for period in range(1, max_period + 1):
        span = period * min_repeats
        if len(ids) >= span and all(ids[-k] == ids[-k - period]
                                    for k in range(1, span - period + 1)):
            return True
    return False


def score(answers: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """The gate's counts for `answers` (each {"ids", "text", "ended"}) against the fp32
    model's `reference`, prompt by prompt, and the verdict."""
    rows = []
    for prompt, got, want in zip(PROMPTS, answers, reference, strict=True):
        rows.append({"prompt": prompt.text, "identical": got["ids"] == want["ids"],
                     "right": prompt.check(got["text"]), "right_fp32": prompt.check(want["text"]),
                     "loop": is_loop(got["ids"], got["ended"]),
                     "loop_fp32": is_loop(want["ids"], want["ended"]), "answer": got["text"]})
    result: dict[str, Any] = {
        "prompts": len(rows), "max_new_tokens": MAX_NEW_TOKENS,
        "identical": sum(r["identical"] for r in rows),
        "correct": sum(r["right"] for r in rows),
        "correct_fp32": sum(r["right_fp32"] for r in rows),
        "loops": sum(r["loop"] for r in rows), "loops_fp32": sum(r["loop_fp32"] for r in rows),
        "margin": MARGIN}
    reasons = []
    if result["correct"] < result["correct_fp32"] - MARGIN:
        reasons.append(f"{result['correct']} right answers against the fp32 model's "
                       f"{result['correct_fp32']}")
    if result["loops"] > result["loops_fp32"] + MARGIN:
        reasons.append(f"{result['loops']} degenerate loops against the fp32 model's "
                       f"{result['loops_fp32']}")
    result["passed"] = not reasons
    result["reason"] = "; ".join(reasons) or None
    result["answers"] = rows
    return result
