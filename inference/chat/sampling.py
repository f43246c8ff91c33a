"""Token sampling: greedy, temperature, top-k, top-p, seeds, logit bias, presence/frequency
penalties, grammar masks, and the log-probabilities of what was sampled."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Defaults follow the OpenAI API."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, -100..100), added to logits
    logprobs: bool = False  # report each sampled token's log-probability
    top_logprobs: int = 0  # ... and the most likely alternatives (0-20)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the `top` most likely tokens', as (token id,
    log-probability) pairs, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# Below this temperature sampling is greedy. Scaling logits by 1/T for a far smaller T
# (1e-310 is a valid float) overflows to inf and the probabilities to NaN; at this T a logit
# gap of 0.001 already weighs e^-100, so nothing but exact ties could be drawn anyway.
MIN_TEMPERATURE = 1e-5


class Sampler:
    """Picks the next token from one sequence's logits. Holds that sequence's RNG and counts."""

    def __init__(self, params: SamplingParams, vocab_size: int, *, stream: int = 0) -> None:
        """`stream` tells the choices of one request apart: with a seed, choice i draws from
        its own reproducible sequence."""
        self._p = params
        # OpenAI's seed is any integer, negative too; numpy takes non-negative ones
        seed = None if params.seed is None else abs(params.seed) * 2 + (params.seed < 0)
        self._rng = np.random.default_rng(seed if seed is None or stream == 0
                                          else [seed, stream])
        self._counts = np.zeros(vocab_size, dtype=np.float32)
        self._penalised = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self._bias_ids = np.asarray([i for i, _ in params.logit_bias], dtype=np.int64)
        self._bias = np.asarray([b for _, b in params.logit_bias], dtype=np.float32)
        self.last: TokenLogprob | None = None  # the last token's, when params.logprobs

    def sample(self, logits: npt.NDArray[np.float32],
               allowed: npt.NDArray[np.bool_] | None = None) -> int:
        """Return the chosen token id and remember it for the penalties. `allowed` (a grammar's
        mask) removes every other token, greedy included."""
        logits = self._adjust(logits, allowed)
        token = self._choose(logits)
        if token < self._counts.shape[0]:
            self._counts[token] += 1.0
        if self._p.logprobs:
            self.last = self._logprob(logits, token)
        return token

    def _adjust(self, logits: npt.NDArray[np.float32],
                allowed: npt.NDArray[np.bool_] | None) -> npt.NDArray[np.float32]:
        """The logits after penalties, bias and mask: what the distribution is made from."""
        p = self._p
        if self._penalised or self._bias_ids.size or allowed is not None:
            logits = logits.astype(np.float32, copy=True)
        if self._penalised:
            n = min(logits.shape[0], self._counts.shape[0])
            counts = self._counts[:n]
            logits[:n] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        if self._bias_ids.size:
            inside = self._bias_ids < logits.shape[0]
            np.add.at(logits, self._bias_ids[inside], self._bias[inside])
        if allowed is not None:
            width = min(logits.shape[0], allowed.shape[0])
            np.copyto(logits[:width], -np.inf, where=~allowed[:width])
            logits[width:] = -np.inf
        return logits

    def _logprob(self, logits: npt.NDArray[np.float32], token: int) -> TokenLogprob:
        """Log-probabilities of the distribution sampled from: after penalties, bias and
        mask, at the request's temperature (the model's own, 1, when greedy), before top-k
        and top-p cut its tail. Masked tokens have none (probability 0)."""
        t = self._p.temperature if self._p.temperature >= MIN_TEMPERATURE else 1.0
        z = logits.astype(np.float64) / t
        z -= np.max(z)
        logp = z - np.log(np.sum(np.exp(z)))
        top: tuple[tuple[int, float], ...] = ()
        k = min(self._p.top_logprobs, int(np.isfinite(logp).sum()))
        if k:
            best = np.argpartition(logp, -k)[-k:]
            best = best[np.argsort(logp[best])[::-1]]
            top = tuple((int(i), float(logp[i])) for i in best)
        return TokenLogprob(token, float(logp[token]), top)

    def _choose(self, logits: npt.NDArray[np.float32]) -> int:
        p = self._p
        if p.temperature < MIN_TEMPERATURE:
            return int(np.argmax(logits))
        # shifted first, so the largest is exactly 0 and nothing overflows
        scaled = (logits.astype(np.float64) - float(np.max(logits))) / p.temperature
        candidates = np.arange(scaled.shape[0])
        if 0 < p.top_k < scaled.shape[0]:
            candidates = np.argpartition(scaled, -p.top_k)[-p.top_k :]
            scaled = scaled[candidates]
        probs = np.exp(scaled)  # top-k keeps the largest, so at least one is 1: no NaN
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(probs)[::-1]
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, p.top_p)) + 1]
            candidates, probs = candidates[keep], probs[keep] / probs[keep].sum()
        return int(candidates[self._rng.choice(probs.shape[0], p=probs)])
