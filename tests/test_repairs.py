"""PTQ repairs on a small seeded CNN with BatchNorm: CLE, outlier splitting, bias correction,
AdaRound."""

import pytest
import torch
import torch.nn.functional as F
from hilq.quant.repairs import (
    _run_to,
    adaround,
    bias_correction,
    equalize,
    layer_pairs,
    reconstruction_error,
    split_outliers,
)
from hilq.quant.spec import BitConfig, QuantSpec, act_spec, weight_spec
from hilq.quant.transform import fold_bn, prepare, quant_layers, quantizable_layers, quantize
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


def _model(seed=0):
    torch.manual_seed(seed)
    m = SmallCNN()
    g = torch.Generator().manual_seed(seed)
    for bn in (m.bn1, m.bn2, m.bn3):  # uneven channel scales, as trained networks have
        n = bn.num_features
        bn.weight.data = torch.exp(torch.randn(n, generator=g) * 1.2)
        bn.bias.data = torch.randn(n, generator=g) * 0.3
        bn.running_mean = torch.randn(n, generator=g) * 0.2
        bn.running_var = torch.rand(n, generator=g) + 0.5
    return m.eval()


def _data(n=128, seed=1):
    """Image-like inputs: spatially smooth and correlated across channels. (On white noise
    nearest rounding is already optimal for the first layer: AdaRound gains from correlations.)"""
    x = torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
    x = F.avg_pool2d(x, 5, stride=1)  # 8 x 8
    mix = torch.tensor([[1.0, 0.6, 0.3], [0.6, 1.0, 0.6], [0.3, 0.6, 1.0]])
    return torch.einsum("ij,njhw->nihw", mix, x) * 2


def _config(model, w, a=None):
    return BitConfig.uniform(quantizable_layers(model), w, a)


def _ranges(w):
    return w.abs().reshape(w.shape[0], -1).amax(1)


@torch.no_grad()
def test_layer_pairs_follow_the_graph():
    fm = fold_bn(_model())
    assert layer_pairs(fm) == [("conv1", "conv2"), ("conv2", "conv3"), ("conv3", "fc")]

    class Branchy(nn.Module):  # conv1 feeds two consumers: no pair; residual add ends chains
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = F.relu(self.c1(x))
            return self.c3(self.c2(y) + y)

    assert layer_pairs(Branchy()) == []


@torch.no_grad()
def test_equalize_preserves_function_and_evens_ranges():
    model, x = _model(), _data()
    eq = equalize(model)
    ref, out = model(x), eq(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    folded = fold_bn(model)
    for name in ("conv1", "conv2"):
        before = _ranges(folded.get_submodule(name).weight.detach())
        after = _ranges(eq.get_submodule(name).weight.detach())
        assert float(after.max() / after.min()) < float(before.max() / before.min())
    # per-tensor W4 weights lose less after CLE
    cfg = _config(model, weight_spec(4, granularity="tensor"))
    err_plain = float(((quantize(model, cfg, None)(x) - ref) ** 2).mean())
    err_cle = float(((quantize(eq, cfg, None)(x) - ref) ** 2).mean())
    assert err_cle < err_plain
    # the original is untouched
    assert torch.equal(model(x), ref)


@torch.no_grad()
def test_split_outliers_preserves_function_and_shrinks_max():
    model, x = fold_bn(_model()), _data()
    model.conv2.weight[3, 5, 1, 1] = 8.0 * float(model.conv2.weight.abs().max())
    model.fc.weight[2, 7] = -6.0 * float(model.fc.weight.abs().max())
    ref = model(x)
    split = split_outliers(model)
    assert torch.allclose(split(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    for name in ("conv2", "fc"):
        w0, w1 = model.get_submodule(name).weight, split.get_submodule(name).weight
        assert float(w1.abs().max()) == pytest.approx(float(w0.abs().max()) / 2)
    # producers were widened to match
    assert split.conv1.out_channels == split.conv2.in_channels > 8
    assert split.conv3.out_channels == split.fc.in_features > 16
    # a model without outliers is left as it is (no channel above 3 std)
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        plain[2].weight.fill_(0.5)
    assert split_outliers(plain)[2].in_features == 4


def test_bias_correction_reduces_mean_output_error():
    model, x, held_out = _model(), _data(256), _data(256, seed=7)
    fm = fold_bn(model)
    cfg = _config(model, weight_spec(4, granularity="tensor"), act_spec(8))
    qm = quantize(model, cfg, x)
    ref = fm(held_out).detach()

    @torch.no_grad()
    def mean_error(m):
        return float((m(held_out) - ref).mean(0).abs().mean())

    before = mean_error(qm)
    bias_correction(qm, fm, x)
    after = mean_error(qm)
    assert after < 0.5 * before, (before, after)
    assert torch.allclose(fm(held_out), ref)  # the float model is untouched


def test_bias_correction_creates_missing_bias():
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False))
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    qm = quantize(model, _config(model, weight_spec(2, granularity="tensor")), None)
    bias_correction(qm, fold_bn(model), x)
    assert qm[0].layer.bias is not None and qm[0].layer.bias.shape == (5,)


def _at(model, module, x, what):
    """A module's raw inputs or its outputs when `model` runs on x."""
    acc = []
    _run_to(model, module, x, lambda args, out: acc.append(args[0] if what == "in" else out))
    return torch.cat(acc)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_adaround_beats_nearest_rounding(granularity):
    model, x = _model(), _data()
    fm = fold_bn(model)
    cfg = _config(model, weight_spec(3, granularity=granularity), act_spec(8))
    qm = quantize(model, cfg, x)
    adaround(qm, fm, x, iters=200, seed=0)
    ratios = {}
    for name, q in quant_layers(qm).items():
        override = q.weight_override
        assert override is not None and override.shape == q.layer.weight.shape
        # on the layer's grid: the override is weight codes × the layer's own scales
        scale = q.w_scale.reshape(-1, *[1] * (override.dim() - 1)) if granularity == "channel" \
            else q.w_scale
        assert torch.allclose(override / scale, (override / scale).round(), atol=1e-3)
        # layer-wise reconstruction: inputs from the (AdaRounded) quantized model up to the
        # layer, target the float model's output of that layer
        xin, target = _at(qm, q, x, "in"), _at(fm, fm.get_submodule(name), x, "out")
        learned = reconstruction_error(q, xin, target)
        q.weight_override = None
        nearest = reconstruction_error(q, xin, target)
        q.weight_override = override
        ratios[name] = learned / nearest
    # never worse; clearly better on the conv layers (spatially correlated inputs)
    assert all(r <= 1 + 1e-5 for r in ratios.values()), ratios
    assert all(ratios[n] < 0.9 for n in ("conv1", "conv2", "conv3")), ratios
    # and the whole model is closer to the float one than with nearest rounding
    nearest_model = quantize(model, cfg, x)
    with torch.no_grad():
        ref = fm(x)
        assert float(((qm(x) - ref) ** 2).mean()) < float(((nearest_model(x) - ref) ** 2).mean())


def test_adaround_group_spec_and_requires_calibration():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=3, granularity="group", group_size=4)
    qm = quantize(model, _config(model, spec), None)
    adaround(qm, fold_bn(model), x, iters=50)
    assert qm[0].weight_override.shape == (8, 16)
    uncalibrated = prepare(model, _config(model, spec, act_spec(8)))
    with pytest.raises(ValueError):
        adaround(uncalibrated, fold_bn(model), x, iters=5)
