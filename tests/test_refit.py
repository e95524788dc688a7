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


def _normal_equations(pairs, k, ridge):
    """The ridge fit by the normal equations over every row (float64), as [unknowns, out]."""
    cols = [nn.functional.unfold(x, k, padding=k // 2).transpose(1, 2).reshape(-1, x.shape[1] * k * k)
            for x, _ in pairs]
    a = torch.cat([torch.cat([c, torch.ones(len(c), 1)], 1) for c in cols]).double()
    b = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]) for _, z in pairs]).double()
    g = a.T @ a
    g += ridge * g.diagonal()[:-1].mean() * torch.eye(len(g), dtype=g.dtype)
    return torch.linalg.solve(g, a.T @ b)


def test_a_fit_with_fewer_rows_than_unknowns_is_the_same_ridge_solution():
    """A 1x1 fit of 64 channels (65 unknowns) on 1x1 maps (one row per image: every row is read)
    is solved for the rows (a^T (a a^T + lam I)^-1 b) when there are 40 images, and by the
    normal equations when there are 100. Both equal the normal equations' ridge solution."""
    gen = torch.Generator().manual_seed(0)
    for images in (40, 100):  # 40 rows < 65 unknowns; 100 rows > 65
        pairs = [(torch.randn(images // 2, 64, 1, 1, generator=gen),
                  torch.randn(images // 2, 8, 1, 1, generator=gen)) for _ in range(2)]
        conv = fit_conv(pairs, 1, ridge=1e-3)
        want = _normal_equations(pairs, 1, 1e-3)
        got = torch.cat([conv.weight.reshape(8, -1).T, conv.bias[None]]).double()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (images, (got - want).abs().max())


def test_a_walks_kept_targets_give_the_same_fits_and_run_the_base_once_per_chunk(monkeypatch):
    """The blocks walk fits every candidate to the same base on the same images: its Targets keep
    the base's outputs. Fits through them are identical to fits through the base, and a second
    candidate, or a trial on the first chunks, runs the base no more; with no budget it runs it
    every time: once per chunk from the images, carried along the Sequential from there
    (ChainInputs), or for every fit without it."""
    from tvsprune.pruning import refit

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 1), Linear1x1Block(), Linear1x1Block(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(250, 3, 8, 8)  # three chunks
    blocks, convs = ["1", "2"], refittable(base, x[:1])
    units, inner = running_units(base, blocks, convs, x[:1]), {b: [c for c in convs if c.startswith(b + ".")]
                                                               for b in blocks}
    calls, real = [], refit.module_io
    monkeypatch.setattr(refit, "module_io", lambda m, *a, **k: calls.append(m is base) or real(m, *a, **k))

    def fit(through, forms, images):
        calls.clear()
        model = apply_forms(through, forms, units, images, 1e-6, lambda m: None, successors(base, blocks), inner)[0]
        return model, calls.count(True)

    kept = refit.Targets(base)
    plain, runs = fit(base, {"1": "identity"}, x)
    assert runs == 3  # from the images to 2.a on each of three chunks; 2.b and 3 read along the chain
    first, runs = fit(kept, {"1": "identity"}, x)
    assert runs == 3 and all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                                  first.state_dict().values()))
    again, runs = fit(kept, {"1": "identity"}, x)
    assert runs == 0 and all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                                  again.state_dict().values()))
    assert fit(kept, {"1": "identity"}, x[:200])[1] == 0  # a trial's images: the same first chunks
    assert fit(refit.Targets(base, budget=0), {"1": "identity"}, x)[1] == 3
    monkeypatch.setattr(refit, "CHAIN_BYTES", -1)  # no chain: every fit runs the base from the images
    # the chain's first try on each chunk, then 2.a, 2.b and 3 each from the images
    assert fit(refit.Targets(base, budget=0), {"1": "identity"}, x)[1] == 3 + 3 * 3


def test_a_last_small_chunk_joins_the_normal_equations_of_the_chunks_before_it():
    """Rows past the unknowns go to the normal equations; a last chunk with fewer rows than the
    unknowns joins them (it was once solved alone, for its own rows, dropping the rest)."""
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(m, 64, 1, 1, generator=gen), torch.randn(m, 8, 1, 1, generator=gen)) for m in (40, 40, 10)]
    conv = fit_conv(pairs, 1, ridge=1e-3)  # 65 unknowns: 40 held, 80 added, then 10
    want = _normal_equations(pairs, 1, 1e-3)
    got = torch.cat([conv.weight.reshape(8, -1).T, conv.bias[None]]).double()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got - want).abs().max()
