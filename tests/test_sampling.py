from __future__ import annotations

import numpy as np

from inference.chat.sampling import Sampler, SamplingParams


def _logits(seed: int = 0, n: int = 1000) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n).astype(np.float32)


def test_temperature_zero_is_argmax() -> None:
    logits = _logits()
    assert Sampler(SamplingParams(temperature=0), 1000).sample(logits) == int(np.argmax(logits))


def test_same_seed_same_tokens_and_different_seed_differs() -> None:
    logits = _logits()

    def draw(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.5, seed=seed), 1000)
        return [sampler.sample(logits) for _ in range(50)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = _logits(3)
    best = int(np.argmax(logits))
    assert {Sampler(SamplingParams(top_k=1, seed=s), 1000).sample(logits) for s in range(20)} \
        == {best}
    assert {Sampler(SamplingParams(top_p=1e-6, seed=s), 1000).sample(logits) for s in range(20)} \
        == {best}


def test_top_k_restricts_to_k_best() -> None:
    logits = _logits(4)
    top5 = set(np.argsort(logits)[-5:].tolist())
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=5, seed=1), 1000)
    assert {sampler.sample(logits) for _ in range(200)} <= top5


def test_penalties_discourage_repeats() -> None:
    logits = np.zeros(10, dtype=np.float32)
    logits[3] = 1.0
    plain = Sampler(SamplingParams(temperature=0), 10)
    assert [plain.sample(logits) for _ in range(3)] == [3, 3, 3]
    penalised = Sampler(SamplingParams(temperature=0, presence_penalty=2.0), 10)
    assert [penalised.sample(logits) for _ in range(2)] == [3, 0]
    freq = Sampler(SamplingParams(temperature=0, frequency_penalty=0.6), 10)
    assert [freq.sample(logits) for _ in range(3)] == [3, 3, 0]


def test_negative_seeds_work_and_differ_from_positive_ones() -> None:
    def draw(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.5, seed=seed), 1000)
        return [sampler.sample(_logits(i)) for i in range(20)]

    assert draw(-1) == draw(-1)
    assert draw(-1) != draw(1) and draw(-(2**63)) == draw(-(2**63))


def test_numeric_edges_never_give_nan() -> None:
    # temperature 1e-310 is valid JSON and valid per the schema; 1/T overflows to inf
    logits = _logits(5)
    best = int(np.argmax(logits))
    for temperature in (1e-310, 5e-324, 1e-300, 1e-6, 1e-5, 1e-4):
        assert Sampler(SamplingParams(temperature=temperature, seed=1), 1000).sample(logits) \
            == best, temperature
    for top_p in (5e-324, 1e-300, 1e-12):
        assert Sampler(SamplingParams(temperature=2.0, top_p=top_p, seed=3), 1000
                       ).sample(logits) == best
    # large logits and large penalties stay finite
    huge = (logits * 1e30).astype(np.float32)
    assert Sampler(SamplingParams(temperature=1e-3, seed=1), 1000).sample(huge) == best
    sampler = Sampler(SamplingParams(temperature=2.0, presence_penalty=2.0,
                                     frequency_penalty=2.0, seed=1), 1000)
    assert all(0 <= sampler.sample(logits) < 1000 for _ in range(200))


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = _logits(7)
    best = int(np.argmax(logits))
    forced = Sampler(SamplingParams(temperature=0, logit_bias=((17, 100.0),)), 1000)
    assert forced.sample(logits) == 17
    banned = Sampler(SamplingParams(temperature=0, logit_bias=((best, -100.0),)), 1000)
    assert banned.sample(logits) != best
    sampled = Sampler(SamplingParams(temperature=1.0, seed=2, logit_bias=((17, 100.0),)), 1000)
    assert {sampled.sample(logits) for _ in range(50)} == {17}
    # repeated and out-of-range ids (a vocabulary wider than the logits) are harmless
    odd = Sampler(SamplingParams(temperature=0, logit_bias=((5, 60.0), (5, 60.0), (5000, 1.0))),
                  6000)
    assert odd.sample(logits) == 5
