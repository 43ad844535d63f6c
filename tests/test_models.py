"""Built-in models: exact architectures, seeded weights, non-trivial BatchNorm, the digits CNN's
deterministic training and cache, and the `package.module:factory` door for user models."""

import sys
from pathlib import Path

import pytest
import torch
from hilq.quant.evaluate import agreement, top1
from hilq.quant.models import BUILTIN, Data, ModelError, convnets, digits, load_model, transformer
from hilq.quant.transform import fold_bn, quantizable_layers
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

# torchvision's published parameter counts (torchvision.models docs, "num_params").
PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("factory,name", [(convnets.resnet18, "resnet18"),
                                          (convnets.resnet50, "resnet50"),
                                          (convnets.mobilenet_v2, "mobilenet_v2")])
def test_convnet_parameter_counts_match_torchvision(factory, name):
    assert n_params(factory()) == PARAMS[name]


def test_convnet_structure_details():
    r50 = convnets.resnet50()
    # ResNet v1.5: stride on the 3x3 conv of the first bottleneck of layer2.
    assert r50.layer2[0].conv2.stride == (2, 2) and r50.layer2[0].conv1.stride == (1, 1)
    mb = convnets.mobilenet_v2()
    dw = [m for m in mb.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == 17 and all(m.groups == m.in_channels == m.out_channels for m in dw)
    assert any(isinstance(m, nn.ReLU6) for m in mb.modules())
    assert sum(isinstance(m, convnets.InvertedResidual) and m.use_res_connect
               for m in mb.modules()) == 10


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_convnet_entry_forward_bn_stats_and_folding(name):
    entry = load_model(name)
    assert entry.input_shape == (3, 224, 224)
    model = entry.build()
    assert n_params(model) == PARAMS[name]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:   # non-trivial statistics and affine parameters: folding means something
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert bn.running_mean.abs().max() > 1e-3
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
    data = entry.data()
    assert data.test_y is None and data.calib_x.shape[1:] == (3, 224, 224)
    with torch.no_grad():
        y = model(data.test_x[:2])
        yf = fold_bn(model)(data.test_x[:2])
    assert y.shape == (2, 1000) and torch.isfinite(y).all() and y.std() > 1e-3
    assert (y - yf).abs().max() < 1e-3 * y.abs().max()


def test_convnet_init_is_seeded():
    def small():
        return convnets.init_seeded(convnets.resnet18(), seed=3, stats_batch=2,
                                    input_shape=(3, 64, 64))
    a, b = small().state_dict(), small().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_transformer():
    entry = load_model("tiny-transformer")
    model = entry.build()
    data = entry.data()
    assert data.test_y is None and tuple(data.calib_x.shape[1:]) == entry.input_shape
    with torch.no_grad():
        y = model(data.test_x[:2])
    assert y.shape == (2, transformer.SEQ_LEN, transformer.VOCAB) and torch.isfinite(y).all()
    linears = quantizable_layers(model)
    assert len(linears) == 1 + 6 * transformer.DEPTH + 1
    for name in linears:   # every feature dim is a multiple of 128: INT4 groups apply
        w = model.get_submodule(name).weight
        assert w.shape[0] % 128 == 0 and w.shape[1] % 128 == 0, name
    assert {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.o"} <= set(linears)
    torch.fx.symbolic_trace(model)   # traceable: folding and repairs see the graph


def test_digits_data_split_is_fixed_and_standardised():
    a, b = digits.load_data(), digits.load_data()
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.calib_x, b.calib_x)
    assert len(a.test_y) == 450 and len(a.train_y) == 1347 and len(a.calib_x) == 256
    assert a.name == "sklearn-digits" and a.test_x.shape[1:] == (1, 8, 8)
    assert abs(float(a.train_x.mean())) < 0.05
    # Standardised inputs have long tails: what makes min-max calibration at 4 bits costly.
    assert float(a.calib_x.max()) > 5


def test_digits_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HILQ_CACHE", str(tmp_path))
    recipe = digits.Recipe(epochs=1)
    m1, m2 = digits.train(recipe), digits.train(recipe)
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k
    assert recipe.key() != digits.Recipe().key()
    built = digits.build(recipe)
    path = digits.cache_path(recipe)
    assert path.parent == tmp_path and path.name == f"digits-cnn-{recipe.key()}.pt"
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(),
                                                 m1.state_dict().values()))
    path.write_bytes(b"garbage")    # a corrupt cache file is replaced, not trusted
    rebuilt = digits.build(recipe)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(),
                                                 m1.state_dict().values()))


@pytest.mark.slow
def test_digits_cnn_accuracy():
    entry = load_model("digits-cnn")
    model, data = entry.build(), entry.data()
    acc = top1(model, data.test_x, data.test_y)
    assert 0.95 <= acc <= 1.0
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.block, digits.ResidualBlock)


def test_builtin_names_and_unknown_model():
    assert set(BUILTIN) == {"digits-cnn", "resnet18", "resnet50", "mobilenet_v2",
                            "tiny-transformer"}
    with pytest.raises(ModelError, match="built-in: digits-cnn"):
        load_model("no-such-model")


def test_user_model_via_factory(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    entry = load_model("tests.quantize_user_model:build", "tests.quantize_user_model:data")
    data = entry.data()
    assert isinstance(data, Data) and entry.input_shape == (16,)
    assert top1(entry.build(), data.test_x, data.test_y) == 1.0
    with pytest.raises(ModelError, match="needs --data"):
        load_model("tests.quantize_user_model:build")
    with pytest.raises(ModelError, match="cannot import"):
        load_model("tests.quantize_user_model:build", "tests.no_such_module:data")
    assert "tests.quantize_user_model" in sys.modules


def test_evaluate_helpers():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
        model.bias.zero_()
    x = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [2.0, 1.0, 0], [0, 3.0, 0]])
    assert top1(model, x, torch.tensor([0, 1, 0, 0]), batch_size=3) == 0.75
    with pytest.raises(ValueError):
        top1(model, x, torch.tensor([0]))
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.5], [1.5, 1.0]])
    agr = agreement(a, b)
    assert agr.top1 == 0.5 and agr.max_abs_diff == 1.5 and agr.mean_abs_diff == 0.5
