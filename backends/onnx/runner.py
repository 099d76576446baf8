"""Run an exported decoder in ONNX Runtime behind moeexport's runner interface.

The KV cache is the graph's own: `present.*` outputs of one step are fed back
as `past_key_values.*` of the next (the loop is backends/decoding.py). The CPU
execution provider is used unless onnxruntime-gpu offers CUDA (or `providers`
says otherwise).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moeexport.backends.decoding import DecoderLoop
from moeexport.errors import MoeExportError


class OnnxRunner(DecoderLoop):
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
        graph_context = int(self.session.get_modelmeta().custom_metadata_map.get("moeexport.context", context))
        self.context = self.max_prompt = min(context, graph_context)
        self.providers = self.session.get_providers()
        self.cache_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _forward(self, ids: list[int], past: dict[str, np.ndarray] | None, past_length: int):
        """[len(ids), vocab] logits after `past_length` cached positions, and the cache that follows."""
        if past is None:
            past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32) for i in self.cache_inputs}
        feeds = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, past_length + len(ids)), dtype=np.int64),
            "position_ids": np.arange(past_length, past_length + len(ids), dtype=np.int64)[None],
            **past,
        }
        results = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        present = {name.replace("present.", "past_key_values."): value
                   for name, value in results.items() if name.startswith("present.")}
        return results["logits"][0], present

    def profile(self, prompt, new_tokens: int = 64) -> dict:
        return super().profile(prompt, new_tokens) | {"providers": self.providers}
