from __future__ import annotations

from inference.chat.stops import StopMatcher


def _run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.push(p) for p in pieces)
    stopped = m.stopped
    return out + m.flush(), stopped


def test_stop_spanning_several_pieces_is_never_emitted() -> None:
    out, stopped = _run(["###"], ["Hello #", "#", "# world"])
    assert (out, stopped) == ("Hello ", True)


def test_partial_match_is_released_when_it_is_not_a_stop() -> None:
    m = StopMatcher(["END"])
    assert m.push("fooE") == "foo"  # "E" may start "END": held
    assert m.push("N") == ""
    assert m.push("x") == "ENx"
    assert m.flush() == ""


def test_held_text_is_released_at_the_end() -> None:
    assert _run(["END"], ["abc", "EN"]) == ("abcEN", False)


def test_earliest_of_several_stops_wins() -> None:
    assert _run(["cd", "b"], ["abcd"]) == ("a", True)


def test_nothing_after_a_stop_and_empty_stops_ignored() -> None:
    m = StopMatcher(["x", ""])
    assert m.push("axb") == "a"
    assert m.push("more") == ""
    assert _run([], ["a", "b"]) == ("ab", False)
