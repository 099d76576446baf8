"""Expert Drop's `repair: refit`: the kept experts' down projections refit to the original layer's output."""

from __future__ import annotations

import copy

import pytest

from moeexport.calibration.sources import CalibrationConfig
from moeexport.compress import StatisticsProvider, compress
from moeexport.errors import MoeExportError
from moeexport.passes import repair
from moeexport.recipe import parse_recipe
from tests.test_selection import _kl
from tests.tiny_models import random_tokens, tiny_model

DROP = {"keep": 2, "score": "random", "seed": 4}


def _dropped(model, tokens, **options):
    provider = StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=tokens)
    model = copy.deepcopy(model)
    plan = compress(model, parse_recipe({"passes": [{"expert_drop": {**DROP, **options}}]}), provider).steps[0].plan
    return model, plan


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_refit_brings_the_dropped_model_closer_to_the_original(family):
    model = tiny_model(family)
    tokens = random_tokens(8, 32, seed=3)
    dropped, plain = _dropped(model, tokens)
    refit, plan = _dropped(model, tokens, repair="refit", ridge=1e-3)
    assert plan.keep == plain.keep and plain.repair_error == {}
    assert set(plan.repair_error) == set(plan.keep)
    assert all(after < before for before, after in plan.repair_error.values())
    assert "refit" in " ".join(plan.describe())
    assert _kl(model, refit, tokens) < 0.8 * _kl(model, dropped, tokens)  # on the tokens it was fit to


def test_a_large_ridge_keeps_the_original_weights():
    model = tiny_model("mixtral")
    tokens = random_tokens(4, 16, seed=2)
    dropped, _ = _dropped(model, tokens)
    refit, _ = _dropped(model, tokens, repair="refit", ridge=1e9)
    assert _kl(dropped, refit, tokens) < 1e-8


def test_refit_is_refused_before_any_work_when_its_system_would_not_fit(monkeypatch):
    model = tiny_model("mixtral")
    monkeypatch.setattr(repair, "MAX_GRAM_BYTES", 1000)
    original = copy.deepcopy(model)
    with pytest.raises(MoeExportError, match="use repair: none"):
        compress(model, parse_recipe({"passes": [{"expert_drop": {**DROP, "repair": "refit"}}]}),
                 StatisticsProvider(None, CalibrationConfig(), "tiny", cache_dir=None, tokens=random_tokens(2, 8)))
    assert _kl(original, model, random_tokens(2, 8)) == 0.0
