"""The same compressed model in the other GPU runtimes: llama.cpp (CUDA build) and onnxruntime-gpu.

Each is compared with the torch model on the same windows and profiled, so the
TensorRT numbers of test_tensorrt_engine.py have something to stand next to.
GPU kernels reorder sums and may use TF32, so these judge by KL and top-1
rather than the exact-logit bound of the CPU tests.
"""

from __future__ import annotations

import pytest

from device_tests.hardware import missing_llama_cpp_cuda, missing_onnxruntime_cuda, needs

RECIPE = [{"block_drop": {"n": 1, "score": "random"}}, {"expert_drop": {"keep": 6, "score": "random"}}]


@pytest.fixture(scope="module")
def demo():
    import moeexport
    from moeexport.calibration.sources import sample_from_model
    from moeexport.compress import compress
    from moeexport.recipe import parse_recipe

    model, tokenizer = moeexport.load("demo"), moeexport.load_tokenizer("demo")
    compress(model, parse_recipe({"passes": RECIPE}), None)
    return model, sample_from_model(model, tokenizer, 2, 128, seed=9)


def _gpu_gguf_runner(path, context: int):
    """GGUFRunner's methods over a llama.cpp context with every layer offloaded to the GPU."""
    from llama_cpp import Llama

    from moeexport.backends.gguf.runner import GGML_TYPE_F32, GGUFRunner

    runner = GGUFRunner.__new__(GGUFRunner)
    runner.llm = Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
                       n_gpu_layers=-1, flash_attn=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    runner.context = context
    return runner


@needs(missing_llama_cpp_cuda)
def test_llama_cpp_cuda_matches_torch_and_is_profiled(demo, tmp_path, measured):
    from moeexport.backends import gguf
    from moeexport.validate import TorchRunner, compare

    model, windows = demo
    artifact = gguf.export(model, tmp_path / "demo.gguf")
    runner = _gpu_gguf_runner(artifact.path, 256)
    fidelity = compare(TorchRunner(model), runner, windows)
    assert fidelity.kl <= 1e-3 and fidelity.top1_agreement >= 0.98, fidelity
    prompt = windows[0, :32].tolist()
    assert runner.generate(prompt, 16)[:8] == TorchRunner(model).generate(prompt, 16)[:8]
    speed = runner.profile(windows[0].tolist(), 64)
    assert speed["decode_tokens_per_s"] > 0 and speed["prefill_tokens_per_s"] > 0
    measured(f"llama.cpp CUDA f32: KL {fidelity.kl:.2e}, top-1 {fidelity.top1_agreement:.2%}, "
             f"prefill {speed['prefill_tokens_per_s']:.0f} tok/s, decode {speed['decode_tokens_per_s']:.0f} tok/s")


@needs(missing_onnxruntime_cuda)
@pytest.mark.parametrize("moe_ops", ["plain", "plain-routed", "contrib"])
def test_onnxruntime_cuda_matches_torch_and_is_profiled(moe_ops, demo, tmp_path, measured):
    from moeexport.backends import onnx as onnx_backend
    from moeexport.validate import TorchRunner, compare

    model, windows = demo
    artifact = onnx_backend.export(model, tmp_path / f"demo-{moe_ops}.onnx", moe_ops=moe_ops)
    runner = onnx_backend.OnnxRunner(artifact.path, context=256, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runner.providers[0] == "CUDAExecutionProvider"
    fidelity = compare(TorchRunner(model), runner, windows)
    assert fidelity.kl <= 1e-3 and fidelity.top1_agreement >= 0.98, fidelity
    speed = runner.profile(windows[0].tolist(), 64)
    assert speed["decode_tokens_per_s"] > 0
    measured(f"onnxruntime CUDA ({moe_ops} MoE ops): KL {fidelity.kl:.2e}, top-1 {fidelity.top1_agreement:.2%}, "
             f"prefill {speed['prefill_tokens_per_s']:.0f} tok/s, decode {speed['decode_tokens_per_s']:.0f} tok/s")
