"""The expert/routing seam against transformers' own modules: `route()` and the expert functions compute what
each family's router and experts compute (float32, max abs difference <= 1e-6), for today's families and for
layouts and rules that only newer families have (gpt-oss's experts, DeepSeek-V3's router)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moeexport.adapters import ExpertLayout, Routing, adapter_for
from moeexport.adapters.declaration import CLAMPED_SWIGLU, SIGMOID
from moeexport.adapters.experts import expert_intermediate, expert_output
from moeexport.adapters.routing import route
from tests.tiny_models import tiny_model

TOLERANCE = 1e-6
REPO = Path(__file__).resolve().parents[1]


def _dense(weights: torch.Tensor, index: torch.Tensor, experts: int) -> torch.Tensor:
    """Top-k weights [T, k] at their experts' columns of a [T, experts] matrix (any order of the k)."""
    return torch.zeros(len(index), experts).scatter(1, index, weights.float())


def _seam_output(layout: ExpertLayout, experts, tokens, weights, index) -> torch.Tensor:
    """The routed experts' weighted sum through the seam, an expert's tokens at a time."""
    out = torch.zeros_like(tokens)
    for expert in index.unique().tolist():
        rows, slot = torch.where(index == expert)
        middle = expert_intermediate(layout, experts, expert, tokens[rows])
        out.index_add_(0, rows, expert_output(layout, experts, expert, middle) * weights[rows, slot, None])
    return out


def _first_moe_view(model):
    return next(view for view in adapter_for(model.config).layer_views(model) if view.kind == "moe")


@pytest.mark.parametrize(("family", "overrides"), [
    ("mixtral", {}),
    ("qwen3_moe", {}),
    ("deepseek_v2", {}),
    ("deepseek_v2", dict(n_routed_experts=8, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                         routed_scaling_factor=2.5)),
])
def test_route_and_the_expert_functions_compute_what_the_family_s_modules_compute(family, overrides):
    model = tiny_model(family, **overrides)
    config = adapter_for(model.config).model_config(model.config)
    view = _first_moe_view(model)
    tokens = torch.randn(64, config.hidden_size, generator=torch.Generator().manual_seed(1))
    logits, weights, index = view.router(tokens)
    own_weights, own_index = route(config.routing, logits, view.top_k)
    experts = config.num_experts
    assert (_dense(own_weights, own_index, experts) - _dense(weights, index, experts)).abs().max() <= TOLERANCE
    routed = _seam_output(view.layout, view.experts, tokens, own_weights, own_index)
    assert (routed - view.experts(tokens, index, weights)).abs().max() <= TOLERANCE
    assert routed.abs().max() > 0.01  # the experts do compute something


def test_group_limited_routing_is_not_plain_top_k():
    """The grouped case above would pass vacuously if the groups never mattered."""
    model = tiny_model("deepseek_v2", n_routed_experts=8, topk_method="group_limited_greedy", n_group=4,
                       topk_group=1)
    config = adapter_for(model.config).model_config(model.config)
    view = _first_moe_view(model)
    tokens = torch.randn(64, config.hidden_size, generator=torch.Generator().manual_seed(2))
    logits, weights, index = view.router(tokens)
    grouped = _dense(*route(config.routing, logits, view.top_k), 8)
    assert (grouped - _dense(weights, index, 8)).abs().max() <= TOLERANCE
    assert not torch.equal(grouped != 0, _dense(*route(replace(config.routing, groups=1), logits, view.top_k), 8) != 0)


# --- gpt-oss: interleaved, transposed gate/up with biases, clamped SwiGLU; softmax over the top-k logits -------

def _gpt_oss_config():
    from transformers import GptOssConfig

    config = GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                          swiglu_limit=7.0)
    config._experts_implementation = "eager"
    return config


def _gpt_oss_layout(config) -> ExpertLayout:
    return ExpertLayout(activation=CLAMPED_SWIGLU, interleaved=True, transposed=True, biases=True,
                        alpha=config.swiglu_alpha, limit=config.swiglu_limit)


GPT_OSS_ROUTING = Routing(renormalize=False, softmax_over_top_k=True, router_bias=True)


def _randomized(module: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    torch.manual_seed(seed)
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=std)
    return module.eval().requires_grad_(False)


def test_gpt_oss_experts_and_router_through_the_seam():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter

    config = _gpt_oss_config()
    experts = _randomized(GptOssExperts(config), seed=0, std=0.5)  # wide enough that the clamps bite
    experts.down_proj.mul_(0.1)  # outputs of order 1, where float32 rounding stays below the tolerance
    router = _randomized(GptOssTopKRouter(config), seed=1, std=0.5)
    tokens = torch.randn(64, config.hidden_size, generator=torch.Generator().manual_seed(3))
    logits, weights, index = router(tokens)
    own_weights, own_index = route(GPT_OSS_ROUTING, logits, router.top_k)
    assert (_dense(own_weights, own_index, 4) - _dense(weights, index, 4)).abs().max() <= TOLERANCE
    layout = _gpt_oss_layout(config)
    with torch.no_grad():
        reference = experts(tokens, index, weights)
    routed = _seam_output(layout, experts, tokens, own_weights, own_index)
    assert (routed - reference).abs().max() <= TOLERANCE
    projected = tokens @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
    assert projected[..., ::2].max() > config.swiglu_limit and projected[..., 1::2].abs().max() > config.swiglu_limit
    concatenated = _seam_output(replace(layout, interleaved=False), experts, tokens, own_weights, own_index)
    assert (concatenated - reference).abs().max() > 0.01  # the layout's fields are what makes it agree


# --- DeepSeek-V3: sigmoid scores, a selection-only bias, group-limited top-k, renormalize, routed scaling -------

def _deepseek_v3_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                            norm_topk_prob=True, routed_scaling_factor=2.5, moe_intermediate_size=16,
                            n_shared_experts=1)


def _deepseek_v3_router():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    router = _randomized(DeepseekV3TopkRouter(_deepseek_v3_config()), seed=4, std=0.3)
    router.e_score_correction_bias.normal_(std=0.3, generator=torch.Generator().manual_seed(5))
    rule = Routing(renormalize=True, scale=2.5, scores=SIGMOID, selection_bias=True, groups=4, top_groups=2)
    return router, rule


def test_deepseek_v3_routing_through_the_seam():
    router, rule = _deepseek_v3_router()
    tokens = torch.randn(128, 32, generator=torch.Generator().manual_seed(6))
    logits, weights, index = router(tokens)
    bias = router.e_score_correction_bias
    own_weights, own_index = route(rule, logits, router.top_k, selection_bias=bias)
    assert (_dense(own_weights, own_index, 16) - _dense(weights, index, 16)).abs().max() <= TOLERANCE
    chosen = _dense(own_weights, own_index, 16) != 0
    unbiased = _dense(*route(rule, logits, router.top_k), 16) != 0
    ungrouped = _dense(*route(replace(rule, groups=1), logits, router.top_k, selection_bias=bias), 16) != 0
    assert not torch.equal(chosen, unbiased) and not torch.equal(chosen, ungrouped)  # both really choose


def test_route_keeps_removed_experts_out_even_when_a_selection_bias_favours_them():
    router, rule = _deepseek_v3_router()
    tokens = torch.randn(32, 32, generator=torch.Generator().manual_seed(7))
    logits, _, _ = router(tokens)
    removed = torch.zeros(16, dtype=torch.bool)
    removed[:6] = True
    bias = torch.where(removed, 10.0, 0.0)
    _, index = route(replace(rule, groups=1), logits, router.top_k, removed, selection_bias=bias)
    assert not removed[index].any()


# --- Expert Drop takes every per-expert tensor with its expert ----------------------------------------------------

def _one_layer_model(config, block) -> torch.nn.Module:
    """A model whose one decoder layer's `mlp` is `block`: what surgery walks (model.layers.0.mlp)."""
    layer = torch.nn.Module()
    layer.mlp = block
    layer.self_attn = layer.input_layernorm = layer.post_attention_layernorm = torch.nn.Identity()
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([layer])
    model.config = config
    return model


def _adapter(**declared):
    from dataclasses import fields

    from moeexport.adapters.declaration import Family
    from moeexport.adapters.surgery import MoEAdapter

    family = Family(family="test", routing=lambda config: Routing(renormalize=True), **declared)
    return MoEAdapter(**{field.name: getattr(family, field.name) for field in fields(Family)})


def test_keep_experts_slices_the_selection_bias_and_the_router_still_routes_as_declared():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    from moeexport.adapters.surgery import keep_experts

    router, rule = _deepseek_v3_router()
    block = DeepseekV3MoE(_deepseek_v3_config())
    block.gate = router
    adapter = _adapter(model_type="deepseek_v3", num_experts_key="n_routed_experts",
                       router_tensors=("weight", "e_score_correction_bias"), selection_bias="e_score_correction_bias")
    model = _one_layer_model(_deepseek_v3_config(), block)
    bias = router.e_score_correction_bias.clone()
    keep = [0, 3, 4, 6, 9, 10, 13, 15]  # two of each group of four: the groups stay equal
    keep_experts(adapter, model, 0, keep)
    view = adapter.layer_view(model, 0)
    assert torch.equal(view.selection_bias, bias[keep]) and view.num_experts == 8
    assert block.experts.gate_up_proj.shape[0] == 8 and block.experts.down_proj.shape[0] == 8
    tokens = torch.randn(64, 32, generator=torch.Generator().manual_seed(8))
    logits, weights, index = router(tokens)
    own_weights, own_index = route(rule, logits, router.top_k, selection_bias=view.selection_bias)
    assert (_dense(own_weights, own_index, 8) - _dense(weights, index, 8)).abs().max() <= TOLERANCE


def test_keep_experts_slices_a_bias_stored_as_one_row_of_experts():
    from transformers import Ernie4_5_MoeConfig
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock

    from moeexport.adapters.surgery import keep_experts

    config = Ernie4_5_MoeConfig(hidden_size=32, moe_intermediate_size=16, moe_num_experts=6, moe_k=2,
                                moe_num_shared_experts=0)
    block = _randomized(Ernie4_5_MoeSparseMoeBlock(config), seed=2, std=0.3)
    bias = block.gate.moe_statics.e_score_correction_bias
    adapter = _adapter(model_type="ernie4_5_moe", num_experts_key="moe_num_experts", top_k_key="moe_k",
                       router_tensors=("weight", "moe_statics.e_score_correction_bias"),
                       selection_bias="moe_statics.e_score_correction_bias")
    before = bias.clone()
    keep_experts(adapter, _one_layer_model(config, block), 0, [5, 1, 2])
    assert torch.equal(block.gate.moe_statics.e_score_correction_bias, before[:, [5, 1, 2]])
    assert isinstance(block.gate.moe_statics.e_score_correction_bias, torch.nn.Parameter)


def test_keep_experts_slices_router_and_expert_biases_with_their_experts():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    from moeexport.adapters.surgery import keep_experts

    config = _gpt_oss_config()
    block = _randomized(GptOssMLP(config), seed=3, std=0.3)
    adapter = _adapter(model_type="gpt_oss", num_experts_key="num_local_experts", router="router",
                       router_tensors=("weight", "bias"), expert_layout=lambda config: _gpt_oss_layout(config))
    original = {name: tensor.clone() for name, tensor in block.state_dict().items()}
    keep_experts(adapter, _one_layer_model(config, block), 0, [3, 0])
    for name, tensor in block.state_dict().items():
        assert torch.equal(tensor, original[name][[3, 0]]), name


def test_merging_refuses_a_family_whose_experts_carry_more_than_rows_and_stacks():
    from moeexport.adapters.surgery import check_experts_can_merge
    from moeexport.errors import MoeExportError

    with pytest.raises(MoeExportError, match="use Expert Drop instead of merge"):
        check_experts_can_merge(_adapter(model_type="x", num_experts_key="n", router_tensors=("weight", "bias")), None)
    check_experts_can_merge(_adapter(model_type="x", num_experts_key="n"), None)


# --- the declaration is torch-free --------------------------------------------------------------------------------

def test_the_declaration_and_the_memory_plan_import_no_torch():
    code = ("import sys; import moeexport.adapters, moeexport.adapters.declaration, moeexport.memory; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
    for name in ("declaration.py", "registry.py", "families.py", "__init__.py"):
        text = (REPO / "moeexport" / "adapters" / name).read_text()
        assert "import torch" not in text and "from torch" not in text, name
