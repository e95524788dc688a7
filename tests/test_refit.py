"""Least-squares fits of convolutions (pruning/refit.py): any conv's geometry reproduced, each
forward pass stopped where it has read, and the convolutions after a replaced block re-fitted
to what they wrote in the unpruned network."""
from __future__ import annotations

import torch
import torch.nn as nn

from test_blocks import Linear1x1Block
from tvsprune.pruning.blocks import apply_forms, running_units, successors
from tvsprune.pruning.refit import fit_conv, module_io, refittable


def test_a_strided_convolution_without_bias_is_fitted_exactly_in_its_own_geometry():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1, bias=False)
    x = torch.randn(16, 3, 9, 9)
    with torch.no_grad():
        fit = fit_conv([(x[:8], conv(x[:8])), (x[8:], conv(x[8:]))], conv, ridge=1e-10, positions=1000)
    assert fit.bias is None and fit.stride == (2, 2) and fit.weight.shape == conv.weight.shape
    assert torch.allclose(fit.weight, conv.weight, atol=1e-4)
    k = fit_conv([(x, x[:, :2] * 3 + 1)], 1, ridge=1e-10)  # an int: k x k, same padding, with bias
    assert k.bias is not None and torch.allclose(k.bias, torch.tensor([1.0, 1.0]), atol=1e-4)


def test_module_io_stops_where_it_has_read_and_matches_a_full_pass():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    ran = []
    model[2].register_forward_pre_hook(lambda m, a: ran.append(1))
    x = torch.randn(2, 3, 4, 4)
    xin, out = module_io(model, "0", x)
    assert ran == [] and torch.equal(xin, x) and torch.allclose(out, model[0](x))


def test_refittable_convolutions_are_ungrouped_and_called_once_in_running_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.b, self.a = nn.Conv2d(4, 4, 1), nn.Conv2d(3, 4, 3, padding=1)
            self.dw, self.twice = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.twice(self.twice(self.dw(self.b(self.a(x)))))

    assert refittable(Net(), torch.zeros(1, 3, 4, 4)) == ["a", "b"]


def test_the_convolutions_after_a_removed_block_are_refitted_to_what_they_wrote():
    torch.manual_seed(0)
    # linear through and through: with block 1 removed, the later convolutions can map what
    # they now read to what they wrote, exactly
    base = nn.Sequential(nn.Conv2d(3, 4, 1), Linear1x1Block(), Linear1x1Block(), nn.Conv2d(4, 2, 1)).eval()
    x, fresh = torch.randn(64, 3, 8, 8), torch.randn(8, 3, 8, 8)
    blocks, convs = ["1", "2"], refittable(base, x[:1])
    units = running_units(base, blocks, convs, x[:1])
    inner = {b: [c for c in convs if c.startswith(b + ".")] for b in blocks}
    assert units == ["0", "1", "2", "3"] and inner["2"] == ["2.a", "2.b"]
    forms = {"1": "identity"}
    model, record, refitted = apply_forms(base, forms, units, x, 1e-10, lambda m: None, successors(base, blocks), inner)
    assert record == {"1": {"form": "identity", "relu": False}} and refitted == ["2.a", "2.b", "3"]
    plain, _, none = apply_forms(base, forms, blocks, x, 1e-10, lambda m: None)  # no conv among the units
    assert none == [] and torch.equal(plain[0].weight, base[0].weight)
    with torch.no_grad():
        want = base(fresh)
        assert torch.allclose(model(fresh), want, atol=1e-3)
        assert (plain(fresh) - want).abs().max() > 1e-2
