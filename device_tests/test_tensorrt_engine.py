"""TensorRT on the device: build engines from a bundle, run them, check them against the bundled torch logits,
and measure tokens/s and memory.

The bundle is written here from the demo model (needs onnx + onnxruntime), or taken from
MOEEXPORT_TRT_BUNDLE=path/to/bundle when it was written on another machine (the usual Jetson flow).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from device_tests.hardware import missing_cuda, missing_tensorrt, needs

pytestmark = needs(missing_cuda, missing_tensorrt)

RECIPE = [{"block_drop": {"n": 1, "score": "random"}},
          {"expert_drop": {"keep": 5, "scope": "global", "score": "random", "min_keep": 2}}]


@pytest.fixture(scope="module")
def demo_model():
    import moeexport
    from moeexport.compress import compress
    from moeexport.recipe import parse_recipe

    model = moeexport.load("demo")
    compress(model, parse_recipe({"passes": RECIPE}), None)
    return model


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, demo_model):
    given = os.environ.get("MOEEXPORT_TRT_BUNDLE")
    if given:
        return Path(given)
    pytest.importorskip("onnxruntime", reason="writing a bundle on the device needs onnxruntime (or set MOEEXPORT_TRT_BUNDLE)")
    import moeexport
    from moeexport.backends.tensorrt import write_bundle
    from moeexport.calibration.sources import sample_from_model

    windows = sample_from_model(demo_model, moeexport.load_tokenizer("demo"), 2, 256, seed=3)
    return write_bundle(demo_model, tmp_path_factory.mktemp("trt") / "bundle", windows, "sampled").path


@pytest.fixture(scope="module")
def fp32_build(bundle_dir):
    from moeexport.backends.tensorrt import Bundle, finish_on_device

    return finish_on_device(Bundle(bundle_dir), precision="fp32")


def test_fp32_engine_matches_the_bundled_reference(fp32_build, bundle_dir, measured):
    report = fp32_build.report
    assert fp32_build.failures == [] and fp32_build.engine_path.name == "model-fp32.plan"
    assert fp32_build.engine_path.is_file() and (bundle_dir / "timing.cache").stat().st_size > 0
    fidelity = report["validation"]
    assert fidelity["tokens"] >= 510
    assert fidelity["max_abs_logit"] <= 1e-3 and fidelity["top1_agreement"] == 1.0
    assert json.loads((bundle_dir / "report.json").read_text())["engine"]["precision"] == "fp32"
    measured(f"TensorRT fp32 ({report['device']['gpu']}, TensorRT {report['device']['tensorrt']}): max |dlogit| "
             f"{fidelity['max_abs_logit']:.2e}, top-1 {fidelity['top1_agreement']:.2%}")


def test_engine_speed_and_memory_are_measured(fp32_build, measured):
    import torch

    speed = fp32_build.report["profile"]
    assert speed["prompt_tokens"] == 128 and speed["decode_tokens"] == 64
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    assert 0 < speed["time_to_first_token_s"] < 60
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < speed["torch_peak_allocated_bytes"] < total
    assert speed["engine_device_memory_bytes"] is None or 0 < speed["engine_device_memory_bytes"] < total
    assert speed["engine_file_bytes"] > 0
    measured(f"TensorRT fp32: prefill {speed['prefill_tokens_per_s']:.0f} tok/s, decode {speed['decode_tokens_per_s']:.0f} tok/s, "
             f"TTFT {speed['time_to_first_token_s'] * 1000:.1f} ms, torch peak {speed['torch_peak_allocated_bytes'] / 2**20:.0f} MiB, "
             f"engine activations {(speed['engine_device_memory_bytes'] or 0) / 2**20:.0f} MiB")


def test_engine_generation_follows_the_torch_model(fp32_build, demo_model):
    if os.environ.get("MOEEXPORT_TRT_BUNDLE"):
        pytest.skip("the bundle came from elsewhere: no torch model here to generate with")
    from moeexport.backends.tensorrt import Bundle, TensorRTRunner
    from moeexport.validate import TorchRunner

    windows, _ = Bundle(fp32_build.engine_path.parent).reference()
    prompt = windows[0, :32].tolist()
    runner = TensorRTRunner(fp32_build.engine_path)
    assert runner.generate(prompt, 24) == TorchRunner(demo_model).generate(prompt, 24)
    # a prompt longer than one prefill chunk goes through the prefill profile with a past
    long_logits = runner.logits(windows[0].tolist())
    assert long_logits.shape == (windows.shape[1], demo_model.config.vocab_size)


def test_a_rebuild_reuses_the_timing_cache_and_fp16_meets_its_tolerance(fp32_build, bundle_dir, measured):
    from moeexport.backends.tensorrt import Bundle, finish_on_device

    result = finish_on_device(Bundle(bundle_dir), precision="fp16")
    assert result.report["engine"]["timing_cache_reused"] is True
    assert result.failures == [], result.failures
    fp16, fp32 = result.report["profile"], fp32_build.report["profile"]
    measured(f"TensorRT fp16: KL {result.report['validation']['kl']:.2e}, top-1 {result.report['validation']['top1_agreement']:.2%}, "
             f"decode {fp16['decode_tokens_per_s']:.0f} tok/s (fp32 {fp32['decode_tokens_per_s']:.0f})")


def test_trt_build_command_and_a_failed_validation(bundle_dir, monkeypatch, capsys):
    from moeexport.backends.tensorrt import bundle as bundle_module
    from moeexport.cli import main
    from moeexport.validate import Tolerance

    assert main(["trt-build", str(bundle_dir), "--precision", "fp32", "--json"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((bundle_dir / "report.json").read_text())
    assert report["validation"]["failures"] == [] and '"validation"' in printed and "decode" in printed

    monkeypatch.setitem(bundle_module.ENGINE_TOLERANCES, "fp32", Tolerance(max_abs_logit=0.0))
    assert main(["trt-build", str(bundle_dir), "--precision", "fp32"]) == 1
    assert "validation failed" in capsys.readouterr().err
    assert (bundle_dir / "model-fp32.plan.failed").is_file() and not (bundle_dir / "model-fp32.plan").exists()
    (bundle_dir / "model-fp32.plan.failed").unlink()


def test_unsupported_precisions_are_refused_with_the_fix(bundle_dir):
    import torch

    from moeexport.backends.tensorrt import Bundle, finish_on_device
    from moeexport.errors import MoeExportError

    with pytest.raises(MoeExportError, match="Q/DQ|QuantizeLinear"):
        finish_on_device(Bundle(bundle_dir), precision="int8")
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(MoeExportError, match="compute capability 8.9"):
            finish_on_device(Bundle(bundle_dir), precision="fp8")


def test_fixture_bundle_fp32_engine(tmp_path, measured):
    from tests.conftest import CORPUS, FIXTURE

    if not (FIXTURE / "config.json").is_file():
        pytest.skip(f"needs the fixture model in {FIXTURE}")
    pytest.importorskip("onnxruntime")
    import moeexport
    from moeexport.backends.tensorrt import Bundle, finish_on_device, write_bundle
    from moeexport.evaluate import eval_windows

    model, tokenizer = moeexport.load(FIXTURE), moeexport.load_tokenizer(FIXTURE)
    windows = eval_windows(tokenizer, str(CORPUS / "dev.txt"), 257, 2)
    bundle = write_bundle(copy.deepcopy(model), tmp_path / "bundle", windows, "dev.txt")
    result = finish_on_device(Bundle(bundle.path), precision="fp32")
    assert result.failures == []
    speed = result.report["profile"]
    measured(f"fixture TensorRT fp32: max |dlogit| {result.report['validation']['max_abs_logit']:.2e}, "
             f"decode {speed['decode_tokens_per_s']:.0f} tok/s, prefill {speed['prefill_tokens_per_s']:.0f} tok/s")
