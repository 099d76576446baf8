"""The decoding loop every runner with an explicit KV cache shares (ONNX Runtime, TensorRT).

A runner supplies one step, `_forward(token_ids, past, past_length)`; the loop
turns it into logits for a sequence (prefill in chunks of at most `max_prompt`),
generation through the cache (greedy, or seeded sampling), and a profile.
Every runner's profile returns `speed_report`'s numbers, and every format
counts what one decoded token reads as a `TokenBytes`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from moeexport.errors import MoeExportError


def speed_report(prompt_tokens: int, prefill_s: float, decode_tokens: int, decode_s: float) -> dict:
    """The numbers every runner's `profile` returns."""
    return {
        "prompt_tokens": prompt_tokens,
        "time_to_first_token_s": prefill_s,
        "prefill_tokens_per_s": prompt_tokens / prefill_s,
        "decode_tokens": decode_tokens,
        "decode_tokens_per_s": decode_tokens / decode_s,
    }


@dataclass(frozen=True)
class TokenBytes:
    """The weight bytes one decoded token reads, at the types the artifact stores them in: decoding cannot
    run faster than memory bandwidth / `total`. KV-cache reads (which grow with the context) are left out."""

    routed_experts: int  # the k experts each MoE layer routes to (all of them where a graph computes every one)
    head: int  # the output projection, read whole
    lookups: int  # one row of each table indexed per token: the token embedding (ONNX: the RoPE tables too)
    other: int  # attention, norms, routers, shared experts, dense FFNs: read whole
    experts_read: str  # of each MoE layer's routed experts, e.g. "top-2 of 8"
    embedding_rows: int  # rows of the token embedding: the vocabulary

    @property
    def total(self) -> int:
        return self.routed_experts + self.head + self.lookups + self.other

    def to_dict(self) -> dict:
        return asdict(self) | {"total": self.total}


def experts_read(pairs, every: bool = False) -> str:
    """TokenBytes.experts_read for MoE layers of (k, E) `pairs`; `every`: all E experts are computed."""
    if not pairs:
        return "no routed experts"

    def span(values) -> str:
        values = sorted(set(values))
        return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"

    ks, es = span(k for k, _ in pairs), span(e for _, e in pairs)
    if every:
        return f"all {es} (every expert computed; top-{ks} used)"
    return f"top-{ks} of {es}"


def next_token(logits, temperature: float, rng) -> int:
    """argmax at temperature 0, else a draw from softmax(logits / temperature)."""
    row = np.asarray(logits, dtype=np.float64)
    if not temperature:
        return int(np.argmax(row))
    probabilities = np.exp((row - row.max()) / temperature)
    return int(rng.choice(len(row), p=probabilities / probabilities.sum()))


class DecoderLoop:
    """logits / generate / profile for any decoder whose step is `_forward`.

    `_forward(ids, past, past_length) -> (logits [T, vocab] float32 numpy, present)`
    runs T new tokens after `past_length` cached ones; `past` is None or the
    previous call's `present`, opaque to the loop.
    """

    max_prompt: int  # most tokens one _forward call may take
    context: int  # most tokens past + new

    def _forward(self, ids: list[int], past, past_length: int):
        raise NotImplementedError

    def _prefill(self, token_ids: list[int]):
        """All logits of `token_ids` from an empty cache, in chunks of at most max_prompt."""
        if len(token_ids) > self.context:
            raise MoeExportError(f"{len(token_ids)} tokens do not fit the runner's context of {self.context}")
        if not token_ids:
            raise MoeExportError("no tokens to run")
        past, done, pieces = None, 0, []
        while done < len(token_ids):
            chunk = token_ids[done : done + self.max_prompt]
            logits, past = self._forward(chunk, past, done)
            pieces.append(logits)
            done += len(chunk)
        return np.concatenate(pieces), past

    def logits(self, token_ids) -> np.ndarray:
        logits, _ = self._prefill([int(t) for t in token_ids])
        return logits

    def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
        """New token ids after `prompt` through the KV cache: greedy at temperature 0, else sampled from softmax(logits / T)."""
        prompt = [int(t) for t in prompt]
        if len(prompt) + max_new_tokens > self.context:
            raise MoeExportError(f"{len(prompt)} + {max_new_tokens} tokens do not fit the runner's context of {self.context}")
        logits, past = self._prefill(prompt)
        return self._continue(logits[-1], past, len(prompt), max_new_tokens, temperature, np.random.default_rng(seed))

    def _continue(self, last_logits, past, length: int, count: int, temperature: float, rng) -> list[int]:
        generated = []
        for step in range(count):
            token = next_token(last_logits, temperature, rng)
            generated.append(token)
            if step + 1 < count:
                logits, past = self._forward([token], past, length)
                last_logits = logits[-1]
                length += 1
        return generated

    def _synchronize(self) -> None:
        """Wait for queued device work (timing must not stop before the GPU does)."""

    def profile(self, prompt, new_tokens: int = 64) -> dict:
        """Prefill and greedy-decode speed: time to first token, tokens/s each way."""
        prompt = [int(t) for t in prompt]
        if len(prompt) + new_tokens > self.context:  # the decode steps must stay inside the graph's positions
            raise MoeExportError(f"{len(prompt)} + {new_tokens} tokens do not fit the runner's context of {self.context}")
        self.generate(prompt[: min(len(prompt), 8)], 2)  # warm-up: prefill and decode pay for lazy initialisation once
        self._synchronize()
        started = time.perf_counter()
        logits, past = self._prefill(prompt)
        self._synchronize()
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        self._continue(logits[-1], past, len(prompt), new_tokens + 1, 0.0, None)  # +1: the first token is prefill's
        self._synchronize()
        return speed_report(len(prompt), prefill, new_tokens, time.perf_counter() - started)
