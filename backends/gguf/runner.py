"""Run a GGUF in llama.cpp (through llama-cpp-python) behind moeexport's runner interface."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moeexport.backends.decoding import next_token, speed_report
from moeexport.errors import MoeExportError

GGML_TYPE_F32 = 0  # KV-cache type for exactness checks


def _load_error(path: str | Path) -> str:
    """llama.cpp's own reason for refusing a file (it only logs it): load again, verbosely, in a subprocess."""
    probe = f"from llama_cpp import Llama\nLlama(model_path={str(path)!r}, n_ctx=8, verbose=True)"
    log = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stderr
    reasons = [line.split("error loading model:", 1)[1].strip() for line in log.splitlines() if "error loading model:" in line]
    return reasons[-1] if reasons else "not a GGUF file llama.cpp can read"


class GGUFRunner:
    """`logits(token_ids) -> [T, vocab]` from llama.cpp.

    exact=True keeps the KV cache in F32 and flash attention off, so that an F32
    GGUF can be compared with the torch reference to ~1e-5.
    """

    def __init__(
        self, path: str | Path, context: int = 512, exact: bool = True, threads: int | None = None, logits: bool = True
    ):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise MoeExportError("running GGUF files needs llama-cpp-python: pip install 'moeexport[gguf]'") from None
        options = {"flash_attn": False, "type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if exact else {}
        try:
            self.llm = Llama(
                model_path=str(path),
                n_ctx=context,
                n_batch=context,
                n_ubatch=context,
                logits_all=logits,
                n_threads=threads or os.cpu_count(),
                verbose=False,
                **options,
            )
        except ValueError:
            raise MoeExportError(f"llama.cpp cannot load {path}: {_load_error(path)}") from None
        self.context = context

    def logits(self, token_ids) -> np.ndarray:
        token_ids = [int(t) for t in token_ids]
        if len(token_ids) > self.context:
            raise MoeExportError(f"{len(token_ids)} tokens do not fit the runner's context of {self.context}")
        self.llm.reset()
        self.llm.eval(token_ids)
        return np.array(self.llm.scores[: len(token_ids)], dtype=np.float32)

    def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
        """New token ids after `prompt` through the KV cache: greedy at temperature 0, else sampled."""
        self.llm.reset()
        self.llm.eval([int(t) for t in prompt])
        return self._continue(max_new_tokens, temperature, np.random.default_rng(seed))

    def _continue(self, count: int, temperature: float, rng) -> list[int]:
        """Pick the next token from the last logits and feed it back, `count` times."""
        generated = []
        for _ in range(count):
            token = next_token(self.llm.scores[self.llm.n_tokens - 1], temperature, rng)
            generated.append(token)
            self.llm.eval([token])
        return generated

    def profile(self, prompt: list[int], new_tokens: int = 64) -> dict:
        """Prefill and greedy-decode speed on this machine, as llama.cpp serves them."""
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval([int(t) for t in prompt])
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        self._continue(new_tokens, 0.0, None)
        return speed_report(len(prompt), prefill, new_tokens, time.perf_counter() - started)

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.7):
        """Stream the assistant's reply as text pieces, formatted by the file's chat template.

        A GGUF without tokenizer.chat_template is formatted as Llama-2 [INST] turns
        (llama-cpp-python's default).
        """
        stream = self.llm.create_chat_completion(
            messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True
        )
        for chunk in stream:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    def close(self) -> None:
        self.llm.close()
