"""Binary, ternary, k-means, product and power-of-two weight quantizers."""

import pytest
import torch
from hilq.quant.codebook import (
    CENTROID_BITS,
    SCALE_BITS,
    binarize,
    codebook_entropy_bits,
    fake_binarize,
    fake_ternarize,
    kmeans_quantize,
    pow2_quantize,
    product_quantize,
    quant_error,
    ternarize,
)


def _w(shape=(16, 8, 3, 3), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_binarize_exact():
    w = torch.tensor([[1.0, -3.0, 0.0, 2.0], [-0.5, -0.5, 0.5, 1.5]])
    r = binarize(w)
    assert torch.equal(r.scales, torch.tensor([1.5, 0.75]))
    assert torch.equal(r.codes, torch.tensor([[1, -1, 1, 1], [-1, -1, 1, 1]]))
    assert torch.equal(r.weight, torch.tensor([[1.5, -1.5, 1.5, 1.5], [-0.75, -0.75, 0.75, 0.75]]))
    assert r.size_bits == 8 * 1 + 2 * SCALE_BITS
    t = binarize(w, per_channel=False)
    assert torch.equal(t.scales, torch.tensor([1.125])) and t.size_bits == 8 + SCALE_BITS


def test_binarize_alpha_is_least_squares():
    w = _w()
    r = binarize(w)
    base = quant_error(r, w)
    for f in (0.9, 1.1):  # any other α is worse
        other = torch.sign(w) * r.scales.reshape(-1, 1, 1, 1) * f
        assert float(((w - other) ** 2).sum()) > base


def test_ternarize_exact():
    w = torch.tensor([[1.0, -2.0, 0.1, 0.3, -0.1, 2.6]])  # mean|w| = 1.0 -> Δ = 0.7
    r = ternarize(w)
    assert torch.equal(r.codes, torch.tensor([[1, -1, 0, 0, 0, 1]]))
    assert torch.allclose(r.scales, torch.tensor([(1.0 + 2.0 + 2.6) / 3]))
    assert torch.allclose(r.weight, r.codes * r.scales[0])
    assert r.size_bits == 6 * 2 + SCALE_BITS
    assert set(ternarize(_w()).codes.unique().tolist()) == {-1, 0, 1}


def test_fake_binary_ternary_have_identity_gradient():
    for f in (fake_binarize, fake_ternarize):
        w = _w((4, 6)).requires_grad_()
        y = f(w)
        y.sum().backward()
        assert torch.equal(w.grad, torch.ones_like(w))
    assert torch.equal(fake_binarize(_w((4, 6))), binarize(_w((4, 6))).weight)


def test_kmeans_exact_on_clustered_data():
    w = torch.tensor([0.0, 0.1, 5.0, 5.2, -3.0, -3.1, 9.0, 9.0]).reshape(2, 4)
    r = kmeans_quantize(w, bits=2, init="linear")
    expected = torch.tensor([-3.05, 0.05, 5.1, 9.0]).half().float()
    assert torch.equal(r.codebook.sort().values, expected)
    assert torch.equal(r.weight, r.codebook[r.codes])
    assert r.size_bits == 8 * 2 + 4 * CENTROID_BITS
    r2 = kmeans_quantize(w, bits=2, init="kmeans++", seed=1)
    assert torch.equal(r2.codebook.sort().values, expected)


def test_kmeans_is_deterministic_and_improves_with_bits():
    w = _w((32, 16, 3, 3))
    for init in ("linear", "kmeans++"):
        a = kmeans_quantize(w, 3, seed=4, init=init)
        b = kmeans_quantize(w, 3, seed=4, init=init)
        assert torch.equal(a.weight, b.weight)
        errs = [quant_error(kmeans_quantize(w, bits, init=init), w) for bits in range(1, 7)]
        assert all(x > y for x, y in zip(errs, errs[1:])), errs
    # a codebook fits the data: k-means beats a uniform grid with the same number of levels
    from hilq.quant.quantizer import fake_quant_minmax
    from hilq.quant.spec import QuantSpec
    uniform = float(((w - fake_quant_minmax(w, QuantSpec(bits=3))) ** 2).sum())
    assert quant_error(kmeans_quantize(w, 3), w) < uniform


def test_product_quantization():
    w = _w((64, 8))
    r = product_quantize(w, sub_dim=2, bits=4, seed=0)
    m, k = 4, 16
    assert r.codes.shape == (64, m) and r.codebook.shape == (m, k, 2)
    assert r.size_bits == 64 * m * 4 + m * k * 2 * CENTROID_BITS
    # decoding the codes with the stored codebooks gives the weight
    rebuilt = torch.cat([r.codebook[j][r.codes[:, j]] for j in range(m)], dim=1)
    assert torch.equal(rebuilt, r.weight)
    errs = [quant_error(product_quantize(w, 2, bits), w) for bits in (1, 2, 4, 6)]
    assert all(x > y for x, y in zip(errs, errs[1:])), errs
    # with as many centroids as rows, every row is its own codeword: only fp16 error remains
    exact = product_quantize(w, 2, bits=6)
    assert torch.allclose(exact.weight, w, atol=1e-2)
    # conv weight: rows are output channels
    assert product_quantize(_w((8, 4, 3, 3)), sub_dim=9, bits=2).codes.shape == (8, 4)
    with pytest.raises(ValueError, match="sub_dim"):
        product_quantize(w, sub_dim=3, bits=2)


def test_pow2_exact():
    w = torch.tensor([[8.0, -4.0, 3.0, 1.1, 0.9, 0.4, -0.2, 0.0]])
    r = pow2_quantize(w, bits=3)  # magnitudes 8, 4, 2 and 0
    assert torch.equal(r.weight, torch.tensor([[8.0, -4.0, 4.0, 2.0, 0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(r.codes, torch.tensor([[1, -2, 2, 3, 0, 0, 0, 0]]))  # 0.9 < 2/2: zero
    assert torch.equal(r.codebook, torch.tensor([1.0, 0.5, 0.25]))
    assert r.size_bits == 8 * 3 + SCALE_BITS
    # 3.0 sits above the geometric midpoint of 2 and 4 (2.83): log rounding takes 4
    assert float(pow2_quantize(torch.tensor([[8.0, 2.8]]), 3).weight[0, 1]) == 2.0
    # every nonzero value is α times a power of two
    r = pow2_quantize(_w(), bits=5, per_channel=True)
    rel = (r.weight.reshape(16, -1).abs() / r.scales.reshape(-1, 1))
    nz = rel[rel > 0]
    assert torch.equal(torch.log2(nz), torch.log2(nz).round())


def test_pow2_error_decreases_with_bits():
    w = _w()
    errs = [quant_error(pow2_quantize(w, b), w) for b in range(2, 9)]
    assert all(x >= y for x, y in zip(errs, errs[1:])) and errs[0] > errs[-1]


def test_binary_ternary_sizes_and_errors_order():
    w = _w((64, 32))
    b, t, k2 = binarize(w), ternarize(w), kmeans_quantize(w, 2)
    assert b.bits_per_weight < t.bits_per_weight
    assert quant_error(t, w) < quant_error(b, w)
    assert quant_error(k2, w) < quant_error(t, w)
    assert 0 < codebook_entropy_bits(k2.codes) <= 2
