"""report.html: the build page and the analyze page are single self-contained files."""

from __future__ import annotations

import base64
import copy
import re

import pytest

from moeexport.report import write_build_html

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _moe(experts: int, top_k: int = 2) -> dict:
    return {"kind": "moe", "num_experts": experts, "top_k": top_k, "shared_experts": False}


DENSE = {"kind": "dense", "num_experts": 0, "top_k": 0, "shared_experts": False}
ATTENTION_ONLY = {"kind": "dropped", "num_experts": 0, "top_k": 0, "shared_experts": False}


def realistic_report(failing: bool = False) -> dict:
    """A 6-layer build: block 3 dropped, then the MoE sublayer of (new) layer 3, then experts kept unevenly
    (scope global); the later passes' layer numbers are the model's as they find it, as in a real plan."""
    keep = {1: [0, 1, 2, 3, 5, 6], 2: [0, 2, 3, 4, 5, 6, 7], 4: [0, 1, 3, 5, 6]}
    drop = {layer: [e for e in range(8) if e not in kept] for layer, kept in keep.items()}
    tolerance = {"max_abs_logit": None, "kl": 2e-3, "top1_agreement": None}
    kl = 4.7e-3 if failing else 8.1e-4
    failures = [f"KL {kl:.3g} > {tolerance['kl']:g}"] if failing else []
    return {
        "moeexport_version": "0.1.0",
        "model": "demo",
        "target": "gguf",
        "quant": "q8_0",
        "options": {"tensor_types": {}},
        "out": "out/demo-q8_0",
        "ok": not failing,
        "compression": {
            "source": {"model": "demo", "fingerprint": "3f9a1c0e6b2d48a7c1e0"},
            "calibration": {"source": "model", "num_sequences": 32, "sequence_length": 256, "seed": 0},
            "passes": [
                {"name": "block_drop", "options": {"n": 1, "mode": "discrete", "score": "similarity", "seed": 0},
                 "plan": {"drop": [3], "similarity": [0.9712]},
                 "summary": ["drop blocks 3 (0.9712)  [block: cos(input, output); consecutive: of the whole window]"]},
                {"name": "layer_drop", "options": {"n": 1, "score": "similarity", "seed": 0},
                 "plan": {"drop": [3], "similarity": [0.9935]},
                 "summary": ["drop the MoE sublayer of layers 3 (0.9935)  [layer: cos(x, x + MoE(norm(x)))]"]},
                {"name": "expert_drop", "options": {"keep": 6, "scope": "global", "min_keep": 0, "score": "frequency",
                                                    "seed": 0},
                 "plan": {"keep": keep, "drop": drop, "dropped_expert_tokens": {1: [212, 198], 2: [240], 4: [3, 14, 2]},
                          "layer_tokens": {1: 16384, 2: 16384, 4: 16384}},
                 "summary": ["targeted 3 MoE layers; dropped 6 experts in 3 of them"]
                 + [f"layer {layer}: keep {len(kept)} {kept}, drop {len(drop[layer])} {drop[layer]}"
                    for layer, kept in keep.items()]},
            ],
            "layers_before": [DENSE, _moe(8), _moe(8), _moe(8), _moe(8), _moe(8)],
            "layers_after": [DENSE, _moe(6), _moe(7), ATTENTION_ONLY, _moe(5)],
            "new_block_index": [0, 1, 2, None, 3, 4],
            "parameters": {"before": 3_085_440, "after": 1_933_696},
            "bytes": {"before": 12_341_760, "after": 7_734_784},
        },
        "quality_vs_source": {"text": "16 x 128 tokens sampled from the model", "tokens": 2032, "perplexity": 71.84,
                              "reference_perplexity": 61.25, "kl": 0.0913, "top1_agreement": 0.8437},
        "artifact": {"path": "out/demo-q8_0/model-q8_0.gguf", "file_bytes": 2_191_328, "representation": "native",
                     "fallbacks": ["layer 3: attention only, written with an all-zero stand-in FFN of width 32"],
                     "files": {"model-q8_0.gguf": 2_191_328}},
        "validation": {"text": "2 x 256 tokens sampled from the model", "runtime": "llama.cpp", "tokens": 510,
                       "max_abs_logit": 0.412 if failing else 0.0381, "kl": kl,
                       "top1_agreement": 0.951 if failing else 0.9961, "reference_perplexity": 71.84,
                       "perplexity": 74.9 if failing else 71.9, "tolerance": tolerance, "failures": failures},
        "profile": {"prompt_tokens": 128, "time_to_first_token_s": 0.0142, "prefill_tokens_per_s": 9014.1,
                    "decode_tokens": 64, "decode_tokens_per_s": 1183.4, "runtime_rss_bytes": 31_457_280,
                    "peak_rss_bytes": 412_090_368},
        "engine": None,
        "timings": {"load": 0.41, "calibrate": 6.3, "compress": 1.72, "evaluate": 3.05, "export": 0.88,
                    "validate": 2.41, "profile": 1.96, "total": 16.73},
    }


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(data, validate=True) for data in IMAGE.findall(page)]


def _assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', page))
    assert "src='" not in page and "<script" not in page and "<link" not in page


@pytest.mark.parametrize("failing", [False, True])
def test_build_page_is_self_contained_with_plots(tmp_path, failing):
    report = realistic_report(failing)
    path = write_build_html(report, tmp_path / "report.html")
    assert path == tmp_path / "report.html" and path.stat().st_size > 0
    page = path.read_text()
    images = _images(page)
    assert len(images) >= 3 and all(image.startswith(PNG_SIGNATURE) for image in images)
    _assert_self_contained(page)
    for line in report["compression"]["passes"][2]["summary"]:
        assert line in page
    assert "block dropped" in page and "attention only" in page and "9,014" in page
    if failing:
        assert "FAILED" in page and "KL 0.0047 &gt; 0.002" in page
    else:
        assert "passed" in page and "FAILED" not in page


def test_missing_sections_render_as_sentences(tmp_path):
    report = realistic_report()
    report |= {"profile": None, "quality_vs_source": None}
    page = write_build_html(report, tmp_path / "report.html").read_text()
    assert "not measured (--no-eval)" in page and "not profiled" in page
    assert len(_images(page)) >= 3

    bare = copy.deepcopy(report) | {"ok": False, "artifact": None, "validation": None, "engine": None, "timings": {}}
    bare["compression"] |= {"passes": [], "calibration": None}
    page = write_build_html(bare, tmp_path / "bare.html").read_text()
    assert "FAILED" in page and "no artifact was written" in page and "not validated" in page
    _assert_self_contained(page)

    page = write_build_html({}, tmp_path / "empty.html").read_text()  # nothing at all: sentences, no crash
    assert "no layer structure recorded" in page and "no timings recorded" in page


def test_tensorrt_engine_not_built_and_built(tmp_path):
    report = realistic_report() | {"target": "tensorrt", "quant": "fp16", "profile": None,
                                   "engine": {"built": False, "reason": "TensorRT is not installed here"}}
    page = write_build_html(report, tmp_path / "a.html").read_text()
    assert "not built: TensorRT is not installed here" in page
    report["engine"] = {"engine": "bundle/model-fp16.engine", "engine_bytes": 5_242_880, "precision": "fp16",
                        "tensorrt_version": "10.3.0", "build_seconds": 41.2, "timing_cache_reused": False,
                        "profiles": [{"input_ids": [[1, 1], [1, 128], [1, 512]]}], "failed": False}
    page = write_build_html(report, tmp_path / "b.html").read_text()
    assert "10.3.0" in page and "5.0 MiB" in page and "41.2 s" in page


def test_analyze_page_embeds_its_plots(tmp_path, capsys):
    from moeexport.cli import main

    out = tmp_path / "analysis"
    assert main(["analyze", "demo", "--out", str(out), "--calib-samples", "2", "--calib-length", "32"]) == 0
    capsys.readouterr()
    page = (out / "report.html").read_text()
    images = _images(page)
    assert len(images) == 6 and all(image.startswith(PNG_SIGNATURE) for image in images)
    assert images[0] == (out / "expert_usage.png").read_bytes()  # the files beside it are the same plots
    _assert_self_contained(page)
    assert "<table>" in page and "cos(block in, out)" in page
