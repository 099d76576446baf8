"""Run an exported decoder in ONNX Runtime behind moeexport's runner interface.

The KV cache is the graph's own: `present.*` outputs of one step are fed back
as `past_key_values.*` of the next. The CPU execution provider is used unless
onnxruntime-gpu offers CUDA (or `providers` says otherwise).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from moeexport.errors import MoeExportError


class OnnxRunner:
    def __init__(self, path: str | Path, context: int = 512, providers: list[str] | None = None,
                 threads: int | None = None):
        from moeexport.backends.onnx.writer import require_moe_kernels

        require_moe_kernels()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types, all with a readable message
            raise MoeExportError(f"onnxruntime cannot load {path}: {str(error).splitlines()[0]}") from None
        self.context = min(context, int(self.session.get_modelmeta().custom_metadata_map.get("moeexport.context", context)))
        self.providers = self.session.get_providers()
        self.cache_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _empty_cache(self) -> dict[str, np.ndarray]:
        return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32) for i in self.cache_inputs}

    def _step(self, token_ids: list[int], cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run `token_ids` after the cached positions: ([len, vocab] logits, the new cache)."""
        past = next(iter(cache.values())).shape[2] if cache else 0
        if past + len(token_ids) > self.context:
            raise MoeExportError(f"{past + len(token_ids)} tokens do not fit the graph's context of {self.context}")
        feeds = {
            "input_ids": np.asarray([token_ids], dtype=np.int64),
            "attention_mask": np.ones((1, past + len(token_ids)), dtype=np.int64),
            "position_ids": np.arange(past, past + len(token_ids), dtype=np.int64)[None],
            **cache,
        }
        results = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        new_cache = {name.replace("present.", "past_key_values."): value
                     for name, value in results.items() if name.startswith("present.")}
        return results["logits"][0], new_cache

    def logits(self, token_ids) -> np.ndarray:
        """[T, vocab] logits for the whole sequence in one pass from an empty cache."""
        return self._step([int(t) for t in token_ids], self._empty_cache())[0]

    def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
        """New token ids after `prompt` through the KV cache: greedy at temperature 0, else sampled."""
        return self._decode([int(t) for t in prompt], max_new_tokens, temperature, np.random.default_rng(seed))[0]

    def _decode(self, prompt: list[int], count: int, temperature: float, rng) -> tuple[list[int], float]:
        """(new tokens, seconds spent in the prefill)."""
        started = time.perf_counter()
        logits, cache = self._step(prompt, self._empty_cache())
        prefill = time.perf_counter() - started
        generated = []
        for _ in range(count):
            last = logits[-1].astype(np.float64)
            if temperature:
                probabilities = np.exp((last - last.max()) / temperature)
                token = int(rng.choice(len(last), p=probabilities / probabilities.sum()))
            else:
                token = int(np.argmax(last))
            generated.append(token)
            logits, cache = self._step([token], cache)
        return generated, prefill

    def profile(self, prompt: list[int], new_tokens: int = 64) -> dict:
        """Prefill and greedy-decode speed on this machine, as ONNX Runtime serves them."""
        prompt = [int(t) for t in prompt]
        self._decode(prompt[:8], 2, 0.0, None)  # first runs allocate and pick kernels
        started = time.perf_counter()
        _, prefill = self._decode(prompt, new_tokens, 0.0, None)
        decode = time.perf_counter() - started - prefill
        return {
            "prompt_tokens": len(prompt),
            "time_to_first_token_s": prefill,
            "prefill_tokens_per_s": len(prompt) / prefill,
            "decode_tokens": new_tokens,
            "decode_tokens_per_s": new_tokens / decode,
            "providers": self.providers,
        }
