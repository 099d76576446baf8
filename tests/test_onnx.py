"""The ONNX target: graphs that ONNX Runtime runs and that compute what the compressed torch model computes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import yaml

from moeexport.adapters import adapter_for
from moeexport.adapters.surgery import drop_blocks, drop_moe_sublayer, keep_experts, structure
from moeexport.backends import onnx as onnx_backend
from moeexport.backends.onnx.architectures import ARCHITECTURES as ONNX_ARCHITECTURES
from moeexport.backends.onnx.graph import ALIGNMENT, CONTRIB_DOMAIN, INLINE_BYTES
from moeexport.errors import MoeExportError
from moeexport.modelio import load, load_streamed
from moeexport.quantization import weight_grid
from moeexport.validate import TorchRunner, compare
from tests.conftest import CORPUS, FIXTURE, needs_shared
from tests.tiny_models import FAMILIES, random_tokens, tiny_model

VARIANTS = ("contrib", "plain", "plain-routed")
# the families the exporter has an attention layout for (the hybrid ones it refuses are tested in their own files)
ONNX_FAMILIES = [family for family in FAMILIES if family in ONNX_ARCHITECTURES]


def _exercised(model_type: str, **overrides):
    """A tiny model whose norms are not all ones, so a misplaced norm weight shows."""
    model = tiny_model(model_type, **overrides)
    generator = torch.Generator().manual_seed(1)
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.data = 1 + 0.2 * torch.randn(parameter.shape, generator=generator)
    return model


def _assert_matches(model, path, tokens):
    runner = onnx_backend.Runner(path)
    fidelity = compare(TorchRunner(model), runner, tokens)
    assert fidelity.max_abs_logit <= 1e-4, fidelity
    assert fidelity.top1_agreement == 1.0


@pytest.mark.parametrize("moe_ops", VARIANTS)
@pytest.mark.parametrize("model_type", ONNX_FAMILIES)
def test_every_family_exports_and_matches_torch(model_type, moe_ops, tmp_path):
    model = _exercised(model_type)
    artifact = onnx_backend.export(model, tmp_path / "m.onnx", moe_ops=moe_ops)
    onnx.checker.check_model(onnx.load(artifact.path), full_check=True)
    assert not artifact.path.with_name("m.onnx.data").exists()  # small weights stay in the one file
    _assert_matches(model, artifact.path, random_tokens(2, 24))


def _structures():
    """Compressed structures the graph must carry: per-layer expert counts, dropped layers, zero experts."""
    def block_drop(model):
        drop_blocks(adapter_for(model.config), model, [1, 2])

    def layer_drop(model):
        for layer in (0, 2):
            drop_moe_sublayer(adapter_for(model.config), model, layer)

    def uneven_experts(model):
        adapter = adapter_for(model.config)
        moe_layers = [i for i, spec in enumerate(structure(adapter, model)) if spec.kind == "moe"]
        shared = structure(adapter, model)[moe_layers[0]].shared_experts
        keeps = [[], [3], [0, 1, 2]] if shared else [[0, 1, 2], [3], [0, 1], [0, 1, 2, 3]]  # zero: shared part only
        for layer, keep in zip(moe_layers, keeps):
            keep_experts(adapter, model, layer, keep)

    return {"block_drop": ("mixtral", block_drop), "layer_drop": ("mixtral", layer_drop),
            "uneven_experts": ("mixtral", uneven_experts), "zero_routed_experts": ("qwen2_moe", uneven_experts)}


@pytest.mark.parametrize("moe_ops", VARIANTS)
@pytest.mark.parametrize("structure", sorted(_structures()))
def test_compressed_structures_export_and_match(structure, moe_ops, tmp_path):
    model_type, compress = _structures()[structure]
    model = _exercised(model_type)
    compress(model)
    artifact = onnx_backend.export(model, tmp_path / "m.onnx", moe_ops=moe_ops)
    _assert_matches(model, artifact.path, random_tokens(2, 24))


@pytest.mark.parametrize("quant", ["f32", "int4"])
def test_each_moe_layer_is_exactly_one_moe_node(quant, tmp_path):
    model = _exercised("qwen2_moe", moe_intermediate_size=32)  # one dense layer (mlp_only_layers), shared experts
    drop_moe_sublayer(adapter_for(model.config), model, 3)
    graph = onnx.load(onnx_backend.export(model, tmp_path / "m.onnx", quant=quant, block_size=16).path).graph
    op = "MoE" if quant == "f32" else "QMoE"
    moe_nodes = [node for node in graph.node if node.domain == CONTRIB_DOMAIN]
    assert [node.op_type for node in moe_nodes] == [op, op]  # layers 0 and 2: 1 is dense, 3 dropped
    assert all(dict((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute)["k"] == 2 for node in moe_nodes)


def test_the_plain_variant_has_no_contrib_node_and_a_constant_top_k(tmp_path):
    graph = onnx.load(onnx_backend.export(_exercised("mixtral"), tmp_path / "m.onnx", moe_ops="plain").path).graph
    assert {node.domain for node in graph.node} == {""}
    assert not {node.op_type for node in graph.node} & {"ScatterND", "ScatterElements", "NonZero", "Loop", "If"}
    initializers = {tensor.name for tensor in graph.initializer}
    top_ks = [node for node in graph.node if node.op_type == "TopK"]
    assert len(top_ks) == 4 and all(node.input[1] in initializers for node in top_ks)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])  # renormalized top-k; a shared expert beside
def test_plain_routed_decodes_one_token_through_its_k_experts_and_a_prompt_through_all(model_type, tmp_path):
    from moeexport.backends.onnx.runner import bytes_per_token
    from moeexport.backends.tensorrt.support import check_onnx

    model = _exercised(model_type)
    routed = onnx_backend.export(model, tmp_path / "routed.onnx", moe_ops="plain-routed").path
    graph = onnx.load(routed).graph
    onnx.checker.check_model(onnx.load(routed), full_check=True)
    assert {node.domain for node in graph.node} == {""} and check_onnx(routed) == []  # TensorRT 10's parser table
    moe_layers = sum(view.experts is not None for view in adapter_for(model.config).layer_views(model))
    assert [node.op_type for node in graph.node].count("If") == moe_layers
    reference = TorchRunner(model)
    runner = onnx_backend.Runner(routed)
    _assert_matches(model, routed, random_tokens(2, 24))  # prompts: the If's dense branch
    for token in random_tokens(1, 4)[0].tolist():  # one token without a cache: the gathered branch
        assert np.abs(runner.logits([token]) - reference.logits([token])).max() <= 1e-5
    prompt = random_tokens(1, 8)[0].tolist()
    assert runner.generate(prompt, 32) == reference.generate(prompt, 32)  # decoding through the cache
    k, count = model.config.num_experts_per_tok, adapter_for(model.config).layer_view(model, 0).num_experts
    dense = bytes_per_token(onnx_backend.export(model, tmp_path / "plain.onnx", moe_ops="plain").path)
    decoded = bytes_per_token(routed)
    assert decoded.routed_experts * count == dense.routed_experts * k and decoded.experts_read == f"top-{k} of {count}"
    # f16: each branch widens what it uses (onnxruntime 1.32 would not load a Cast feeding only the If)
    halves = [onnx_backend.Runner(onnx_backend.export(model, tmp_path / f"{ops}16.onnx", quant="f16", moe_ops=ops).path)
              for ops in ("plain", "plain-routed")]
    for tokens in ([prompt[0]], prompt):
        assert np.abs(halves[0].logits(tokens) - halves[1].logits(tokens)).max() <= 1e-5


@pytest.mark.parametrize("moe_ops", VARIANTS)
def test_generation_through_the_cache_equals_recomputing_the_sequence(moe_ops, tmp_path):
    model = _exercised("mixtral")
    runner = onnx_backend.Runner(onnx_backend.export(model, tmp_path / "m.onnx", moe_ops=moe_ops).path)
    prompt = random_tokens(1, 8)[0].tolist()
    cached = runner.generate(prompt, 64)
    recomputed = list(prompt)
    for _ in range(64):
        recomputed.append(int(runner.logits(recomputed)[-1].argmax()))
    assert cached == recomputed[len(prompt):]
    assert cached == TorchRunner(model).generate(prompt, 64)
    sampled = runner.generate(prompt, 32, temperature=1.0, seed=3)
    assert sampled == runner.generate(prompt, 32, temperature=1.0, seed=3) != cached[:32]


def test_padding_in_the_attention_mask_hides_those_positions(tmp_path):
    import onnxruntime as ort

    model = _exercised("mixtral")
    path = onnx_backend.export(model, tmp_path / "m.onnx").path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens = random_tokens(1, 10)[0]
    empty = {i.name: np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32)
             for i in session.get_inputs() if i.name.startswith("past")}
    padded = np.stack([np.concatenate([[0, 0], tokens[:8]]), tokens]).astype(np.int64)  # left padding in row 0
    mask = np.ones((2, 10), np.int64)
    mask[0, :2] = 0
    positions = np.stack([np.concatenate([[0, 0], np.arange(8)]), np.arange(10)]).astype(np.int64)
    logits = session.run(["logits"], {"input_ids": padded, "attention_mask": mask, "position_ids": positions, **empty})[0]
    expected = TorchRunner(model).logits(tokens[:8].tolist())
    np.testing.assert_allclose(logits[0, 2:], expected, atol=1e-4)
    np.testing.assert_allclose(logits[1], TorchRunner(model).logits(tokens.tolist()), atol=1e-4)


def test_quantized_experts_stay_close_to_the_float_graph(tmp_path):
    model = _exercised("mixtral", intermediate_size=64)
    tokens = random_tokens(2, 24)
    reference = onnx_backend.Runner(onnx_backend.export(model, tmp_path / "f32.onnx").path)
    sizes = {}
    for quant, kl in (("int8", 1e-3), ("int4", 2e-2)):
        artifact = onnx_backend.export(model, tmp_path / f"{quant}.onnx", quant=quant, block_size=16)
        fidelity = compare(reference, onnx_backend.Runner(artifact.path), tokens)
        assert fidelity.kl < kl and np.isfinite(fidelity.max_abs_logit)
        sizes[quant] = artifact.path.stat().st_size
    assert sizes["int4"] < sizes["int8"] < (tmp_path / "f32.onnx").stat().st_size


def test_bad_requests_get_one_line_errors(tmp_path, monkeypatch):
    import onnxruntime

    model = _exercised("mixtral")  # expert width 48: block 32 does not divide it
    with pytest.raises(MoeExportError, match="--block-size 32 cannot quantize .* try --block-size 16"):
        onnx_backend.export(model, tmp_path / "m.onnx", quant="int4", block_size=32)
    with pytest.raises(MoeExportError, match="needs the QMoE op"):
        onnx_backend.export(model, tmp_path / "m.onnx", quant="int8", moe_ops="plain")
    (tmp_path / "taken.onnx").write_text("")
    with pytest.raises(MoeExportError, match="already exists; pass --overwrite"):
        onnx_backend.export(model, tmp_path / "taken.onnx")
    monkeypatch.setattr(onnxruntime, "__version__", "1.22.1")
    with pytest.raises(MoeExportError, match=r"onnxruntime 1\.22 has no CPU kernels .* --moe-ops plain"):
        onnx_backend.export(model, tmp_path / "m.onnx")
    assert not list(tmp_path.glob("m.onnx*")) and not list(tmp_path.glob(".*partial"))
    onnx_backend.export(model, tmp_path / "m.onnx", moe_ops="plain")  # the plain variant needs no MoE kernels


@needs_shared
@pytest.mark.parametrize("recipe", ["", "block_drop: {n: 2}", "layer_drop: {n: 2}",
                                    "expert_drop: {keep: 6, scope: global, score: reap}"])
def test_fixture_graphs_match_the_compressed_model_on_held_out_text(recipe, tmp_path):
    from moeexport.calibration.sources import CalibrationConfig
    from moeexport.compress import StatisticsProvider, compress
    from moeexport.evaluate import eval_windows
    from moeexport.modelio import load, load_tokenizer
    from moeexport.recipe import parse_recipe

    model, tokenizer = load(FIXTURE), load_tokenizer(FIXTURE)
    if recipe:
        calibration = CalibrationConfig(source=str(CORPUS / "calib.txt"), num_sequences=8, sequence_length=128)
        provider = StatisticsProvider(tokenizer, calibration, "fixture", cache_dir=None)
        compress(model, parse_recipe(yaml.safe_load(f"passes:\n  - {recipe}\n")), provider)
    windows = eval_windows(tokenizer, str(CORPUS / "dev.txt"), 256, 3)
    for moe_ops in ("contrib", "plain"):  # plain-routed runs prompts as plain does
        path = onnx_backend.export(model, tmp_path / f"{moe_ops}.onnx", moe_ops=moe_ops).path
        fidelity = compare(TorchRunner(model), onnx_backend.Runner(path, context=256), windows)
        assert fidelity.tokens >= 512 and fidelity.max_abs_logit <= 1e-4 and fidelity.top1_agreement == 1.0, moe_ops


def test_build_demo_onnx_validates_profiles_and_validate_reruns_it(tmp_path, capsys):
    import json

    from moeexport.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - layer_drop: {n: 1, score: random}\n  - expert_drop: {keep: 6, score: random}\n")
    out = tmp_path / "build"
    argv = ["build", "demo", "--recipe", str(recipe), "--target", "onnx", "--quant", "int4", "--out", str(out), "--no-eval",
            "--save-checkpoint"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["validation"]["failures"] == [] and report["validation"]["tokens"] >= 510
    assert report["options"] == {"moe_ops": "contrib", "block_size": 32}
    assert report["profile"]["decode_tokens_per_s"] > 0 and 0 < report["profile"]["runtime_rss_bytes"] < 2**31
    text = tmp_path / "held_out.txt"
    text.write_text("Once upon a time there was a little girl who lived in a village near the forest. " * 20)
    capsys.readouterr()
    assert main(["validate", str(out / "model-int4.onnx"), "--reference", str(out / "compressed"), "--text", str(text),
                 "--length", "64", "--json"]) == 0
    fidelity = json.loads(capsys.readouterr().out)
    assert fidelity["tokens"] >= 63 and fidelity["kl"] < 0.1


def test_experts_on_a_quantize_pass_grid_keep_their_exact_codes_in_qmoe(tmp_path):
    """GPTQ leaves groups whose largest code is below 7; re-deriving scales from absmax would move them."""
    model = _exercised("mixtral", intermediate_size=64)
    generator = torch.Generator().manual_seed(5)
    for layer in model.model.layers:
        for weight in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            codes = torch.randint(-5, 6, weight.shape, generator=generator).float()
            weight.data = codes * 2.0 ** -torch.randint(5, 8, (*weight.shape[:-1], 1), generator=generator).float()
    model.config.moeexport_weight_grid = {"bits": 4, "group_size": 16, "method": "gptq", "targets": "experts"}
    tokens = random_tokens(2, 24)
    carried = onnx_backend.export(model, tmp_path / "carried.onnx", quant="int4", block_size=16,
                                  weight_grid=weight_grid(model))
    assert compare(TorchRunner(model), onnx_backend.Runner(carried.path), tokens).max_abs_logit <= 1e-5
    # without the argument the exporter does not look for a grid (the config attribute alone is not read)
    requantized = onnx_backend.export(model, tmp_path / "requantized.onnx", quant="int4", block_size=16)
    assert compare(TorchRunner(model), onnx_backend.Runner(requantized.path), tokens).max_abs_logit > 1e-3


@pytest.fixture
def external(monkeypatch):
    """Exports take the large-model path (the real threshold is 1 GiB): weights go to .data as they are made."""
    from moeexport.backends.onnx import writer

    monkeypatch.setattr(writer, "EXTERNAL_DATA_THRESHOLD", 0)


@pytest.mark.parametrize("moe_ops", VARIANTS)
def test_weights_move_to_an_external_data_file_past_the_threshold(moe_ops, tmp_path, external):
    model = _exercised("mixtral")
    artifact = onnx_backend.export(model, tmp_path / "m.onnx", moe_ops=moe_ops)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    _assert_matches(model, artifact.path, random_tokens(1, 16))


def test_the_graph_file_holds_only_small_tensors_and_references_aligned_data(tmp_path, external):
    artifact = onnx_backend.export(_exercised("mixtral", intermediate_size=64), tmp_path / "m.onnx", quant="int4",
                                   block_size=16)
    data_size = (tmp_path / "m.onnx.data").stat().st_size
    initializers = onnx.load(artifact.path, load_external_data=False).graph.initializer
    external_tensors = [t for t in initializers if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external_tensors and all(len(t.raw_data) <= INLINE_BYTES for t in initializers)
    for tensor in external_tensors:
        entries = {entry.key: entry.value for entry in tensor.external_data}
        offset, length = int(entries["offset"]), int(entries["length"])
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        assert entries["location"] == "m.onnx.data" and offset % ALIGNMENT == 0 and offset + length <= data_size
        assert length == itemsize * int(np.prod(tensor.dims)) > INLINE_BYTES
    assert artifact.path.stat().st_size < data_size / 4


@pytest.mark.parametrize("quant", ["f16", "int4"])
def test_exporting_twice_writes_the_same_bytes(quant, tmp_path, external):
    model = _exercised("qwen2_moe", moe_intermediate_size=32)  # shared experts, a dense layer
    paths = [onnx_backend.export(model, tmp_path / run / "m.onnx", quant=quant, block_size=16).path
             for run in ("a", "b")]
    for name in ("m.onnx", "m.onnx.data"):
        assert (paths[0].parent / name).read_bytes() == (paths[1].parent / name).read_bytes(), name


@pytest.mark.parametrize("when", ["building", "checking"])
def test_an_interrupted_export_leaves_no_file_under_the_real_names(when, tmp_path, monkeypatch, external):
    """Halfway through the layers (the .data half written) or with both files staged."""
    from moeexport.backends.onnx import decoder

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    target = (decoder, "routed_experts") if when == "building" else (onnx.checker, "check_model")
    monkeypatch.setattr(*target, interrupt)
    with pytest.raises(KeyboardInterrupt):
        onnx_backend.export(_exercised("mixtral"), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_streamed_model_writes_the_in_memory_models_files(tmp_path, external):
    """Read one layer at a time from disk (moeexport.streaming), the model exports byte for byte the same graph."""
    checkpoint = tmp_path / "checkpoint"
    _exercised("mixtral").save_pretrained(checkpoint)
    streamed = load_streamed(checkpoint)
    for model, run in ((load(checkpoint), "whole"), (streamed, "streamed")):
        onnx_backend.export(model, tmp_path / run / "m.onnx")
    assert all(p.is_meta for p in streamed.parameters())  # each layer, and the embeddings and head, released
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name
