"""ZeroQ distillation: matches BatchNorm statistics, refuses models without BN, is seeded."""

import pytest
import torch
from hilq.quant import zeroq
from hilq.quant.spec import SpecError
from torch import nn

SHAPE = (3, 8, 8)



def bn_cnn(seed: int = 0) -> nn.Module:
    """A small CNN whose BatchNorm running statistics come from shifted, scaled inputs, so
    that Gaussian noise is far from them and distillation has something to do."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16, momentum=None),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand((64, *SHAPE), generator=g) * 3 + 1)
    return model.eval()


def test_distillation_reduces_bn_loss_by_a_large_factor():
    model = bn_cnn()
    # Inputs were U(1, 4): mean 2.5, std 0.87 is what the input term should ask for.
    kw = {"input_mean": 2.5, "input_std": 0.87}
    start = zeroq.distill(model, 8, SHAPE, iters=0, **kw)
    x = zeroq.distill(model, 8, SHAPE, iters=40, **kw)
    with torch.no_grad():
        before, after = float(zeroq.bn_loss(model, start, **kw)), float(zeroq.bn_loss(model, x, **kw))
    # The start is already drawn from N(2.5, 0.87), so only the BatchNorm terms are left
    # to fall: about 9x in 40 steps here.
    assert after < before / 5, (before, after)
    assert x.shape == (8, *SHAPE) and not x.requires_grad


def test_a_declared_preprocessing_bounds_and_centres_the_distilled_inputs():
    from hilq.quant.data import parse_preprocess

    # EfficientNet-Lite's normalisation (mean 127, std 128): pixels in [0, 1] map to [-0.99, 1].
    prior = zeroq.input_prior(parse_preprocess("mean=0.498/0.498/0.498,std=0.502/0.502/0.502"))
    lo, hi = prior["input_range"]
    assert lo == pytest.approx((-0.992,) * 3, abs=1e-3) and hi == pytest.approx((1.0,) * 3, abs=1e-2)
    assert prior["input_std"] == pytest.approx((0.456, 0.446, 0.448), abs=1e-3)
    model = bn_cnn()
    free = zeroq.distill(model, 8, SHAPE, iters=30)
    x = zeroq.distill(model, 8, SHAPE, iters=30, **prior)
    assert free.abs().max() > 1.5          # without the range, inputs leave [-1, 1]
    assert x.min() >= lo[0] - 1e-6 and x.max() <= hi[0] + 1e-6
    assert zeroq.input_prior(None) == {} and zeroq.input_prior(parse_preprocess("crop=8")) == {}


def test_distillation_leaves_the_model_alone():
    model = bn_cnn()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    zeroq.distill(model, 4, SHAPE, iters=5)
    assert model.training                      # mode restored
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_model_without_batchnorm_is_an_error_naming_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(SpecError, match=r"'tiny-mlp' has no BatchNorm"):
        zeroq.distill(model, 4, SHAPE, iters=1, name="tiny-mlp")
    with pytest.raises(SpecError, match=r"'Sequential' has no BatchNorm"):
        zeroq.calibration_data("distilled", model, input_shape=SHAPE)


def test_seeded_reproducibility():
    model = bn_cnn()
    a = zeroq.distill(model, 4, SHAPE, iters=10, seed=3)
    b = zeroq.distill(model, 4, SHAPE, iters=10, seed=3)
    c = zeroq.distill(model, 4, SHAPE, iters=10, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_progress_callback_and_input_term():
    model = bn_cnn()
    seen = []
    x = zeroq.distill(model, 8, SHAPE, iters=60, input_mean=2.0, input_std=0.5,
                      progress=lambda i, n, loss: seen.append((i, n, loss)))
    assert [s[0] for s in seen] == list(range(1, 61)) and seen[-1][1] == 60
    assert seen[-1][2] < seen[0][2]
    assert abs(float(x.mean()) - 2.0) < 0.5


def test_calibration_data_kinds():
    model = bn_cnn()
    real = torch.ones(5, *SHAPE)
    assert zeroq.calibration_data("real", model, real=real) is real
    noise = zeroq.calibration_data("noise", model, n=6, input_shape=SHAPE, seed=1)
    assert noise.shape == (6, *SHAPE) and torch.equal(noise, zeroq.noise(6, SHAPE, 1))
    with pytest.raises(SpecError, match="no calibration data"):
        zeroq.calibration_data("real", model)
    with pytest.raises(SpecError, match="unknown calibration data"):
        zeroq.calibration_data("imagined", model, input_shape=SHAPE)
    with pytest.raises(SpecError, match="input shape"):
        zeroq.distill(model, 2)
