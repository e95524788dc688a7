"""The README's worked example: a new criterion, allocation and model source, each one
registration, are accepted by the API, the plan maker and the config from then on."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from tiny_models import TinyCNN

from tvsprune.errors import TvsError
from tvsprune.registry import Registry


@contextlib.contextmanager
def registered(registry: Registry, name: str):
    try:
        yield
    finally:
        registry._entries.pop(name, None)


def test_registry_lookup_and_misspelling():
    r: Registry[int] = Registry("thing")
    r.register("alpha", 1)
    assert r.get("alpha") == 1 and "alpha" in r and r.names() == ("alpha",)
    with pytest.raises(TvsError, match=r"unknown thing 'alpah' \(did you mean 'alpha'\? valid: alpha\)"):
        r.get("alpah")
    with pytest.raises(ValueError, match="twice"):
        r.register("alpha", 2)


def test_a_new_criterion_is_one_registration():
    from tvsprune.pipeline import load_config
    from tvsprune.pruning.criteria import CRITERIA, WeightCriterion
    from tvsprune.pruning.scores import layer_scores

    with registered(CRITERIA, "l-inf"):
        @CRITERIA.entry("l-inf")
        class LInf(WeightCriterion):
            def layer(self, module, norm, name, inputs):
                return module.weight.detach().double().flatten(1).abs().amax(1)

        model = TinyCNN()
        scores = layer_scores("l-inf", model, None, ["features.0"])
        w = model.features[0].weight.detach().double().flatten(1)
        np.testing.assert_array_equal(scores["features.0"], w.abs().amax(1).numpy())
        cfg, _ = load_config(raw={"model": {"spec": "resnet20"}, "data": {"calibration": "imgs"},
                                  "prune": {"method": "l-inf"}})
        assert cfg.prune.method == "l-inf"
        with pytest.raises(TvsError, match="did you mean 'l-inf'"):
            load_config(raw={"model": {"spec": "resnet20"}, "data": {"calibration": "imgs"},
                             "prune": {"method": "l-infx"}})
    assert "l-inf" not in CRITERIA


def test_a_new_budget_metric_is_one_function_of_kept_widths():
    """A cost registered in COSTS (here: the kept output channels of the convolutions, a stand-in
    for a measured latency table) is a budget the plan meets, with no change to the budget code."""
    from tvsprune.models.probe import probe_model
    from tvsprune.pruning.budget import make_plan
    from tvsprune.pruning.costs import COSTS, CostModel, output_shapes
    from tvsprune.pruning.graph import ChannelGraph

    def conv_channels(table, widths):
        return sum(widths[n][0] for n, c in table.layers.items() if c.kind == "conv")

    with registered(COSTS, "conv-channels"):
        COSTS.register("conv-channels", conv_channels)
        model, example = TinyCNN().eval(), torch.zeros(1, 3, 16, 16)
        probe = probe_model(model, example)
        graph = ChannelGraph(model, example, probe.logits_layer)
        cost = CostModel(model, graph, output_shapes(model, (3, 16, 16)))
        assert cost.metric("conv-channels") == 8 + 16  # TinyCNN's two convolutions
        scores = {l.name: np.arange(l.channels, dtype=float) for l in probe.layers}
        plan = make_plan(graph, cost, scores, target=0.25, metric="conv-channels", allocation="global")
        kept = cost.metric("conv-channels", plan.removed())
        assert plan.meta["budget"]["metric"] == "conv-channels"
        assert 1 - kept / 24 >= 0.25 and kept >= 24 * 0.75 - 2  # met, to one step of the allocation


def test_a_new_allocation_is_one_registration():
    from tvsprune.models.probe import probe_model
    from tvsprune.pruning.allocations import ALLOCATIONS, Allocation
    from tvsprune.pruning.costs import CostModel, output_shapes
    from tvsprune.pruning.graph import ChannelGraph
    from tvsprune.pruning.budget import make_plan

    with registered(ALLOCATIONS, "first-only"):
        @ALLOCATIONS.entry("first-only", instantiate=False)
        class FirstOnly(Allocation):  # everything from the first group
            def n_remove(self, a, i, lam):
                return int(lam * a.channels[i]) if i == 0 else 0

        model, example = TinyCNN().eval(), torch.zeros(1, 3, 16, 16)
        probe = probe_model(model, example)
        graph = ChannelGraph(model, example, probe.logits_layer)
        cost = CostModel(model, graph, output_shapes(model, (3, 16, 16)))
        scores = {l.name: np.arange(l.channels, dtype=float) for l in probe.layers}
        plan = make_plan(graph, cost, scores, target=0.05, allocation="first-only")
        removed = [len(r) for r in plan.removed()]
        assert removed[0] > 0 and not any(removed[1:])


def test_a_new_model_source_is_one_registration():
    from tvsprune.models import load_model
    from tvsprune.models.sources import SOURCES, ModelSource

    with registered(SOURCES, "tiny"):
        @SOURCES.entry("tiny")
        class Tiny(ModelSource):
            priority, form = 5, "tiny:WIDTH"

            def matches(self, spec):
                return spec.startswith("tiny:")

            def build(self, spec, kwargs):
                return TinyCNN(width=int(spec.split(":")[1]), **kwargs)

            def describe(self, module, loaded):
                loaded.input_shape = (3, 16, 16)

        loaded = load_model("tiny:4", kwargs={"num_classes": 5})
        assert loaded.input_shape == (3, 16, 16) and loaded.module.classifier[-1].out_features == 5
    with pytest.raises(TvsError, match="'tiny'"):  # no longer registered: read as module:Name
        load_model("tiny:4")


def test_the_mac_counter_counts_channels_last_linear_at_every_position():
    from tvsprune.pruning.costs import count_params_macs

    class ChannelsLast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.mlp = torch.nn.Conv2d(3, 4, 1), torch.nn.Linear(4, 6)

        def forward(self, x):
            return self.mlp(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2))

    params, macs = count_params_macs(ChannelsLast(), (3, 5, 5))
    assert params == 3 * 4 + 4 + 4 * 6 + 6
    assert macs == 25 * 3 * 4 + 25 * 4 * 6
