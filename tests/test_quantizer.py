"""Uniform quantizer: bit-exact parity with PyTorch's fake-quant, grids, rounding, STE."""

import itertools

import pytest
import torch
from hilq.quant.quantizer import dequantize, fake_quant, minmax, qparams, quant_error, quantize
from hilq.quant.spec import QuantSpec, SpecError

BITS = range(2, 9)



def _data(shape=(4, 3, 5, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0
    x.view(-1)[:8] *= 10.0  # some values far outside any calibrated range: exercise clipping
    return x


def _ranges(x, spec, shrink):
    """A range smaller than min-max (so clipping happens), as calibration would give."""
    lo, hi = minmax(x, spec)
    return lo * shrink, hi * shrink


@pytest.mark.parametrize("bits,symmetric,narrow", [
    (b, s, n) for b, s, n in itertools.product(BITS, (True, False), (False, True))])
def test_per_tensor_parity_with_torch(bits, symmetric, narrow):
    x = _data()
    spec = QuantSpec(bits=bits, symmetric=symmetric, narrow_range=narrow)
    for shrink in (1.0, 0.3):
        scale, zp = qparams(*_ranges(x, spec, shrink), spec)
        ours = fake_quant(x, scale, zp, spec)
        ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), spec.qmin, spec.qmax)
        assert torch.equal(ours, ref)
        # also with the tensor-qparams overload of the reference
        ref_t = torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(()), zp.to(torch.int32).reshape(()), spec.qmin, spec.qmax)
        assert torch.equal(ours, ref_t)


@pytest.mark.parametrize("bits,symmetric,axis,narrow", [
    (b, s, a, n) for b, s, a, n in itertools.product(BITS, (True, False), (0, 1), (False, True))])
def test_per_channel_parity_with_torch(bits, symmetric, axis, narrow):
    x = _data()
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel", axis=axis,
                     narrow_range=narrow)
    for shrink in (1.0, 0.3):
        scale, zp = qparams(*_ranges(x, spec, shrink), spec)
        ours = fake_quant(x, scale, zp, spec)
        ref = torch.fake_quantize_per_channel_affine(x, scale, zp.to(torch.int32), axis,
                                                     spec.qmin, spec.qmax)
        assert torch.equal(ours, ref)


def test_parity_holds_on_exact_half_way_values():
    """Ties round half to even, as nearbyint does."""
    spec = QuantSpec(bits=4, symmetric=True)
    scale, zp = torch.tensor(0.5), torch.tensor(0)
    x = torch.arange(-5.0, 5.0, 0.25)
    ours = fake_quant(x, scale, zp, spec)
    ref = torch.fake_quantize_per_tensor_affine(x, 0.5, 0, spec.qmin, spec.qmax)
    assert torch.equal(ours, ref)


def test_qmin_qmax():
    assert (QuantSpec(bits=8).qmin, QuantSpec(bits=8).qmax) == (-128, 127)
    assert (QuantSpec(bits=8, narrow_range=True).qmin, QuantSpec(bits=8, narrow_range=True).qmax) == (-127, 127)
    assert (QuantSpec(bits=8, symmetric=False).qmin, QuantSpec(bits=8, symmetric=False).qmax) == (0, 255)
    assert QuantSpec(bits=8, symmetric=False, narrow_range=True).qmax == 254
    assert (QuantSpec(bits=4).qmin, QuantSpec(bits=4).qmax) == (-8, 7)
    assert (QuantSpec(bits=2).qmin, QuantSpec(bits=2).qmax) == (-2, 1)
    assert (QuantSpec(bits=1, symmetric=False).qmin, QuantSpec(bits=1, symmetric=False).qmax) == (0, 1)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits_raise_spec_error(bits):
    with pytest.raises(SpecError):
        QuantSpec(bits=bits)


def test_other_bad_specs():
    with pytest.raises(SpecError):
        QuantSpec(bits=1, symmetric=True)
    with pytest.raises(SpecError):
        QuantSpec(granularity="row")
    with pytest.raises(SpecError):
        QuantSpec(rounding="up")


def test_narrow_range_codes_are_symmetric():
    x = _data()
    spec = QuantSpec(bits=8, narrow_range=True)
    scale, zp = qparams(*minmax(x, spec), spec)
    q = quantize(x, scale, zp, spec)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert int(q.abs().max()) == 127
    assert torch.equal(quantize(-x, scale, zp, spec), -q)  # symmetric grid: Q(-x) = -Q(x)


def test_zero_is_exact_and_round_trip_error_is_half_a_step():
    x = _data()
    for spec in (QuantSpec(bits=4), QuantSpec(bits=4, symmetric=False),
                 QuantSpec(bits=6, granularity="channel", axis=0)):
        scale, zp = qparams(*minmax(x, spec), spec)
        assert torch.all(fake_quant(torch.zeros_like(x), scale, zp, spec) == 0)
        back = dequantize(quantize(x, scale, zp, spec), scale, zp, spec)
        step = scale if spec.granularity == "tensor" else scale.reshape(-1, 1, 1, 1)
        assert torch.all((back - x).abs() <= step / 2 + 1e-6)


def test_group_quantization_round_trip():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    w[:, 32:] *= 100.0  # second group of each row is much wider than the first
    spec = QuantSpec(bits=4, granularity="group", axis=1, group_size=32)
    scale, zp = qparams(*minmax(w, spec), spec)
    assert scale.shape == (8, 2)
    q = quantize(w, scale, zp, spec)
    assert q.shape == w.shape and int(q.min()) >= -8 and int(q.max()) <= 7
    back = dequantize(q, scale, zp, spec)
    assert torch.allclose(back, fake_quant(w, scale, zp, spec))
    per_group_step = scale.repeat_interleave(32, dim=1)
    assert torch.all((back - w).abs() <= per_group_step / 2 + 1e-6)
    # groups keep the narrow first half precise; a per-channel grid would not
    err_group = ((back - w)[:, :32] ** 2).mean()
    ch = QuantSpec(bits=4, granularity="channel", axis=0)
    err_channel = ((fake_quant(w, *qparams(*minmax(w, ch), ch), ch) - w)[:, :32] ** 2).mean()
    assert err_group < err_channel / 20
    with pytest.raises(ValueError, match="group_size"):
        minmax(torch.randn(8, 40), spec)


def test_stochastic_rounding_is_unbiased():
    spec = QuantSpec(bits=4, rounding="stochastic")
    scale, zp = torch.tensor(0.1), torch.tensor(0)
    x = torch.linspace(-0.6, 0.6, 97)  # inside the grid, mostly between grid points
    gen = torch.Generator().manual_seed(0)
    n = 2000
    draws = torch.stack([fake_quant(x, scale, zp, spec, gen) for _ in range(n)])
    # each draw is one of the two neighbouring grid points
    assert torch.all((draws - x).abs() < 0.1 + 1e-6)
    # per-element error variance is at most step²/4, so the mean over n draws has
    # std <= 0.05/sqrt(n) ~ 1.1e-3; a 5-sigma bound:
    assert (draws.mean(0) - x).abs().max() < 5 * 0.05 / n**0.5
    # nearest rounding is biased on the same points
    near = fake_quant(x, scale, zp, QuantSpec(bits=4))
    assert (near - x).abs().max() > 0.04
    # seeded: the same generator seed gives the same draws
    a = fake_quant(x, scale, zp, spec, torch.Generator().manual_seed(3))
    b = fake_quant(x, scale, zp, spec, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=3, symmetric=False),
                                  QuantSpec(bits=4, granularity="channel", axis=0),
                                  QuantSpec(bits=4, granularity="group", axis=1, group_size=4)])
def test_ste_gradient_passes_inside_and_blocks_clipped(spec):
    x = torch.tensor([[-10.0, -0.5, -0.1, 0.0, 0.2, 0.4, 0.7, 10.0]] * 2, requires_grad=True)
    lo = torch.full((2,) if spec.granularity == "channel" else (), -1.0)
    hi = torch.full((2,) if spec.granularity == "channel" else (), 1.0)
    if spec.granularity == "group":
        lo, hi = torch.full((2, 2), -1.0), torch.full((2, 2), 1.0)
    scale, zp = qparams(lo, hi, spec)
    y = fake_quant(x, scale, zp, spec)
    y.backward(torch.full_like(y, 3.0))
    expected = torch.tensor([[0, 3, 3, 3, 3, 3, 3, 0]] * 2, dtype=torch.float32)
    assert torch.equal(x.grad, expected)


def test_quant_error_decreases_with_bits():
    x = _data()
    errs = [quant_error(x, QuantSpec(bits=b)) for b in BITS]
    assert all(a > b for a, b in zip(errs, errs[1:]))
