"""Run a TensorRT engine behind moeexport's runner interface: logits, generate, profile.

The decoding loop (backends/decoding.py) is shared with the ONNX Runtime
runner; this runner implements its `_forward` with the engine's two
optimization profiles (prefill, decode) and torch CUDA tensors as its buffers.
The loop is therefore checked here on CPU even though the engine only runs on a GPU.
"""

from __future__ import annotations

import resource
from pathlib import Path


from moeexport.backends.decoding import DecoderLoop
from moeexport.backends.tensorrt.builder import DECODE, PREFILL
from moeexport.backends.tensorrt.runtime import import_tensorrt, require_cuda_torch
from moeexport.errors import MoeExportError


def _torch_dtype(trt, torch, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.bool: torch.bool}
    for name, torch_type in (("int64", torch.int64), ("bfloat16", torch.bfloat16), ("int8", torch.int8), ("uint8", torch.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = torch_type
    if dtype not in table:
        raise MoeExportError(f"engine tensor type {dtype} has no torch equivalent")
    return table[dtype]


class TensorRTRunner(DecoderLoop):
    """A serialized engine (.plan) with its KV cache in torch CUDA tensors.

    One execution context per optimization profile: prefill (profile 0) takes
    any number of new tokens up to max_prompt, decode (profile 1) exactly one.
    Each call's present.{i}.* outputs become the next call's past inputs, so
    the cache never leaves the GPU.
    """

    def __init__(self, engine_path: str | Path, context: int | None = None):
        trt = import_tensorrt()
        torch = require_cuda_torch()
        self.trt, self.torch = trt, torch
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise MoeExportError(f"engine {self.path} does not exist; build it with `moeexport trt-build BUNDLE`")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise MoeExportError(
                f"TensorRT {trt.__version__} cannot load {self.path.name}: engines only run on the GPU model and "
                "TensorRT version that built them; rebuild it on this device with `moeexport trt-build`"
            )
        if self.engine.num_optimization_profiles < 2:
            raise MoeExportError(f"{self.path.name} has {self.engine.num_optimization_profiles} optimization profile(s); moeexport engines have prefill and decode")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, torch, self.engine.get_tensor_dtype(n)) for n in names}
        self.cache_inputs = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream()
        self.contexts = []
        for index in (PREFILL, DECODE):
            context_ = self.engine.create_execution_context()
            context_.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.contexts.append(context_)
        self.stream.synchronize()
        prefill_ids = self.engine.get_tensor_profile_shape("input_ids", PREFILL)
        prefill_mask = self.engine.get_tensor_profile_shape("attention_mask", PREFILL)
        self.max_prompt = int(prefill_ids[2][1])
        self.context = min(int(prefill_mask[2][1]), context or 1 << 30)
        self._cache_shapes = {n: tuple(self.engine.get_tensor_profile_shape(n, DECODE)[2]) for n in self.cache_inputs}
        # a non-null address for zero-sized tensors (an empty cache)
        self._placeholder = torch.zeros(16, dtype=torch.float32, device=self.device)

    def _synchronize(self) -> None:
        self.stream.synchronize()

    def _forward(self, ids: list[int], past, past_length: int):
        torch = self.torch
        count = len(ids)
        decode = count == 1 and past is not None
        execution = self.contexts[DECODE if decode else PREFILL]
        with torch.cuda.stream(self.stream):
            feeds = {
                "input_ids": torch.tensor([ids], dtype=self.dtypes["input_ids"], device=self.device),
                "position_ids": torch.arange(past_length, past_length + count, device=self.device, dtype=self.dtypes["position_ids"])[None],
                "attention_mask": torch.ones((1, past_length + count), dtype=self.dtypes["attention_mask"], device=self.device),
            }
            for name in self.cache_inputs:
                if past is None:
                    _, heads, _, width = self._cache_shapes[name]
                    feeds[name] = torch.empty((1, heads, 0, width), dtype=self.dtypes[name], device=self.device)
                else:
                    feeds[name] = past[name.replace("past_key_values.", "present.", 1)]
            for name in self.inputs:
                tensor = feeds[name]
                if not execution.set_input_shape(name, tuple(tensor.shape)):
                    raise MoeExportError(f"shape {tuple(tensor.shape)} of {name} is outside the engine's profile")
                address = tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()
                execution.set_tensor_address(name, address)
            results = {}
            for name in self.outputs:
                shape = tuple(execution.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise MoeExportError(f"output {name} has an unresolved shape {shape}: the engine's inputs are incomplete")
                results[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                execution.set_tensor_address(name, results[name].data_ptr() if results[name].numel() else self._placeholder.data_ptr())
            if not execution.execute_async_v3(self.stream.cuda_stream):
                raise MoeExportError("TensorRT failed to run the engine (see the TensorRT messages above)")
            logits = results.pop("logits")[0].float().cpu().numpy()  # waits for the stream
        return logits, results

    def memory(self) -> dict:
        """Bytes: the engine file, its activation memory, and torch's peak on this device."""
        size = getattr(self.engine, "device_memory_size_v2", None)
        if size is None:
            size = getattr(self.engine, "device_memory_size", None)
        return {
            "engine_file_bytes": self.path.stat().st_size,
            "engine_device_memory_bytes": int(size) if size is not None else None,
            "torch_peak_allocated_bytes": int(self.torch.cuda.max_memory_allocated()),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
