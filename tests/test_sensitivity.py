"""Sensitivity: KL falls with bits, a hard-to-quantize layer ranks first, Hutchinson agrees
with the exact Hessian trace, the table feeds the allocator, and the CLI writes its JSON."""

import json
import textwrap

import pandas as pd
import pytest
import torch
from hilq.bench.cli import main
from hilq.quant import sensitivity as S
from hilq.quant.allocate import CostTable, solve_ilp
from hilq.quant.spec import SpecError
from hilq.quant.transform import quantize
from torch import nn
from torch.func import functional_call

SHAPE = (3, 8, 8)



def bn_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def batch(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def table(rows):
    return {(r["layer"], r["precision"]): r["sensitivity"] for r in rows}


@pytest.mark.parametrize("act_bits", [None, 8])
def test_kl_falls_as_bits_rise(act_bits):
    rows = S.kl_sensitivity(bn_cnn(), batch(), (2, 4, 8), act_bits=act_bits)
    a = "a16" if act_bits is None else f"a{act_bits}"
    t = table(rows)
    for layer in ("0", "3", "8"):
        assert t[(layer, f"w2{a}")] > t[(layer, f"w4{a}")] > t[(layer, f"w8{a}")] >= 0


def dead_inputs() -> tuple[nn.Module, torch.Tensor, dict[int, int]]:
    """The CNN with one input channel of every layer always zero: x's channel 2, and
    channel 7 after each BN (γ 0, β −1, then ReLU). Returns {layer index: dead channel}."""
    model, x = bn_cnn(), batch()
    x[:, 2] = 0
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight[7], bn.bias[7] = 0.0, -1.0
    return model, x, {0: 2, 3: 7, 8: 7}


@pytest.mark.parametrize("method", ["kl", "hessian"])
def test_hard_to_quantize_layer_ranks_most_sensitive(method):
    """Huge weights on a dead input leave the function as it was but stretch every output
    channel's range 30x, so the layer's other weights all round to zero at 4 bits."""
    kw = {"max_iters": 30} if method == "hessian" else {}
    for index, dead in dead_inputs()[2].items():
        model, x, _ = dead_inputs()
        reference = model(x)
        with torch.no_grad():
            w = model[index].weight
            w[:, dead] = 30 * w.abs().amax()
        assert torch.allclose(model(x), reference)
        df = S.sensitivity_table(model, x, (4,), method=method, **kw)
        assert df.sort_values("sensitivity").iloc[-1]["layer"] == str(index), df


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def exact_traces(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """tr(H)/n per layer weight, from the full Hessian block by autograd."""
    labels = model(x).argmax(-1).detach()
    out = {}
    for name in ("a", "b"):
        key = f"{name}.weight"
        w0 = dict(model.named_parameters())[key].detach()

        def loss(w, key=key):
            params = {**dict(model.named_parameters()), key: w}
            return nn.functional.cross_entropy(functional_call(model, params, (x,)), labels)

        h = torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), w0.numel())
        out[name] = float(h.trace()) / w0.numel()
    return out


@pytest.mark.parametrize("blockwise", [True, False])
def test_hutchinson_matches_exact_hessian_trace(blockwise):
    model, x = Tiny(), torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    exact = exact_traces(model, x)
    est = S.hessian_traces(model, x, max_iters=1500, tol=0.0, seed=0, blockwise=blockwise)
    assert est.iters == 1500 and not est.converged
    for name, value in exact.items():       # observed within 2.5% over seeds 0-2
        assert est.per_param[name] == pytest.approx(value, rel=0.06), (name, est.per_param, exact)


def test_hutchinson_is_seeded_and_stops_at_tolerance():
    model, x = Tiny(), torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    a = S.hessian_traces(model, x, max_iters=20, tol=0.0, seed=5)
    b = S.hessian_traces(model, x, max_iters=20, tol=0.0, seed=5)
    assert a.per_param == b.per_param
    loose = S.hessian_traces(model, x, max_iters=500, tol=0.2, seed=5)
    assert loose.converged and loose.iters < 500


def test_table_feeds_the_allocator_and_back_to_a_bit_config():
    model, x = bn_cnn(), batch()
    df = S.sensitivity_table(model, x, (2, 4, 8), method="kl", act_bits=8)
    assert list(df.columns) == ["layer", "precision", "sensitivity", "size_bits", "bops"]
    assert set(df["precision"]) == {"w2a8", "w4a8", "w8a8"}
    row = df[(df.layer == "0") & (df.precision == "w4a8")].iloc[0]
    # 4-bit codes, a float32 scale per output channel, and the bias folded BN gives the conv
    assert row.size_bits == 3 * 8 * 9 * 4 + 8 * 32 + 8 * 32
    cost = CostTable.from_frame(df)
    uniform4 = df[df.precision == "w4a8"].size_bits.sum()
    alloc = solve_ilp(cost, {"size_bits": uniform4})
    assert alloc.ok and alloc.totals["size_bits"] <= uniform4
    cfg = S.config_from_allocation(model, alloc)
    assert {n: p.name for n, p in cfg.layers.items()} == alloc.config
    assert cfg.get("0").weight.granularity == "channel" and cfg.get("0").act.bits == 8
    quantize(model, cfg, x)(x)                          # a usable config
    assert S.config_from_allocation(model, {"8": "w4a16"}, act_bits=4).get("8").a_bits == 4
    assert S.config_from_allocation(model, {"8": "fp32"}).get("8").weight is None
    with pytest.raises(SpecError, match="not in the model"):
        S.config_from_allocation(model, {"nope": "w4a8"})


def test_unknown_method_and_layer_are_errors():
    with pytest.raises(SpecError, match="unknown sensitivity method"):
        S.sensitivity_table(bn_cnn(), batch(), method="vibes")
    with pytest.raises(SpecError, match="not a conv/linear layer"):
        S.kl_sensitivity(bn_cnn(), batch(), layers=["1"])


@pytest.fixture()
def user_model(tmp_path, monkeypatch):
    """A user model the CLI loads by `module:factory`, with and without BatchNorm."""
    (tmp_path / "sens_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def bn():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()

        def plain():
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))

        def data():
            g = torch.Generator().manual_seed(0)
            return {"calib_x": torch.rand(8, 3, 8, 8, generator=g),
                    "test_x": torch.rand(8, 3, 8, 8, generator=g)}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("method", ["kl", "hessian"])
def test_cli_writes_json_and_csv(user_model, method):
    out, csv = user_model / "s.json", user_model / "costs.csv"
    rc = main(["sensitivity", "--model", "sens_models:bn", "--data", "sens_models:data",
               "--method", method, "--bits", "2,4", "--act-bits", "8", "--samples", "4",
               "--iters", "5", "--hessian-iters", "3", "--json", str(out), "--csv", str(csv)])
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["method"] == method
    assert [(r["layer"], r["precision"]) for r in payload["table"]] == [
        ("0", "w2a8"), ("0", "w4a8"), ("4", "w2a8"), ("4", "w4a8")]
    assert all(isinstance(r["sensitivity"], float) for r in payload["table"])
    assert CostTable.from_frame(pd.read_csv(csv)).layers == ("0", "4")


def test_cli_errors_are_one_line(user_model, capsys):
    args = ["sensitivity", "--model", "sens_models:plain", "--data", "sens_models:data"]
    assert main(args + ["--iters", "1"]) == 2
    assert "'sens_models:plain' has no BatchNorm" in capsys.readouterr().err
    assert main(args + ["--calib-data", "real"]) == 0
    assert main(args + ["--bits", "2,x"]) == 2
    assert "--bits" in capsys.readouterr().err
