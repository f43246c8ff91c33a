"""The CI guardrail's comparison: every guarded value that moves is reported."""

from __future__ import annotations

import copy
import json

from benchmarks.guardrail import BASELINE, TOLERANCE, compare


def test_the_baseline_matches_itself_and_any_change_is_caught() -> None:
    base = json.loads(BASELINE.read_text(encoding="utf-8"))
    base["greedy_answers"] = [{"prompt": "Q?", "served": "An answer.",
                               "plain_loop": "An answer."}]
    assert compare(base, base) == []
    for key, change in (("embedding_token_counts", lambda v: [v[0] + 1, *v[1:]]),
                        ("chat_token_counts", lambda v: v[:-1])):
        moved = copy.deepcopy(base)
        moved[key] = change(moved[key])
        assert [p for p in compare(moved, base) if p.startswith(key)], key
    served_otherwise = copy.deepcopy(base)
    served_otherwise["greedy_answers"][0]["served"] += "!"
    assert any("is not the plain loop's" in p for p in compare(served_otherwise, base))
    rebuilt = copy.deepcopy(base)
    rebuilt["quality"]["identical"] -= 1  # a fresh build that answers otherwise
    assert any("quality gate moved" in p for p in compare(rebuilt, base))
    nudged = copy.deepcopy(base)
    nudged["vectors"][3][7] += TOLERANCE / 2  # noise within tolerance passes
    assert compare(nudged, base) == []
    nudged["vectors"][3][7] += TOLERANCE * 2
    assert any("vectors moved" in p for p in compare(nudged, base))
