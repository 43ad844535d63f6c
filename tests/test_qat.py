"""QAT: fine-tuning a low-bit model recovers accuracy; the KD loss is what it says; seeded."""

import pytest
import torch
from hilq.quant.evaluate import logits, top1
from hilq.quant.qat import finetune, kd_loss
from hilq.quant.spec import SpecError, parse_variant, variant_config
from hilq.quant.transform import prepare, quantizable_layers, quantize
from torch import nn


def task(n: int = 512, seed: int = 0):
    """Four classes, each a fixed 1×6×6 pattern under heavy noise: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn((4, 1, 6, 6), generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, 4, (n,), generator=g)
    return patterns[y] + 2.0 * torch.randn((n, 1, 6, 6), generator=g), y


def trained_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 36, 4))
    x, y = task()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(6):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i: i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    model = trained_model()
    x, y = task()
    cfg = variant_config(parse_variant("w2a2"), quantizable_layers(model))
    return model, quantize(model, cfg, x[:128]), x, y, task(400, seed=1)


def train_ce(model, x, y) -> float:
    return float(nn.functional.cross_entropy(logits(model, x), y))


def test_qat_lowers_the_loss_and_raises_accuracy_of_a_low_bit_model(setup):
    model, qmodel, x, y, (tx, ty) = setup
    fp, ptq = top1(model, tx, ty), top1(qmodel, tx, ty)
    assert fp > 0.9 and ptq < fp - 0.1, (fp, ptq)        # W2A2: a real gap to recover
    for distill in (True, False):
        tuned = finetune(qmodel, model, x, y, epochs=3, lr=3e-3, distill=distill)
        assert train_ce(tuned, x, y) < 0.6 * train_ce(qmodel, x, y), distill
        assert top1(tuned, tx, ty) > ptq + 0.01, distill


def test_finetune_is_seeded_and_leaves_its_input_alone(setup):
    model, qmodel, x, y, _ = setup
    before = {k: v.clone() for k, v in qmodel.state_dict().items() if v is not None}
    a = finetune(qmodel, model, x, y, epochs=1, lr=1e-3, seed=1)
    b = finetune(qmodel, model, x, y, epochs=1, lr=1e-3, seed=1)
    c = finetune(qmodel, model, x, y, epochs=1, lr=1e-3, seed=1, distill=False)
    assert all(torch.equal(v, qmodel.state_dict()[k]) for k, v in before.items())
    wa, wb, wc = (m.state_dict()["0.layer.weight"] for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.get_submodule("0").mode == "quant"


def test_activation_scales_learned_or_frozen(setup):
    model, qmodel, x, y, _ = setup
    learned = finetune(qmodel, model, x, y, epochs=1, lr=1e-3)
    frozen = finetune(qmodel, model, x, y, epochs=1, lr=1e-3, learn_scales=False)
    for name in ("0", "3", "7"):
        q, ql, qf = (m.get_submodule(name) for m in (qmodel, learned, frozen))
        assert torch.equal(qf.act_scale, q.act_scale)
        assert not torch.equal(ql.act_scale, q.act_scale) and ql.act_scale.requires_grad is False
        assert ql.act_spec == q.act_spec and not ql._forward_pre_hooks   # a plain model again


def test_kd_loss_terms():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    ce = nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, None, y), ce)
    assert torch.allclose(kd_loss(s, t, y, alpha=0.0), ce)
    assert torch.allclose(kd_loss(s, s, y, alpha=0.3), 0.7 * ce)   # KL(p‖p) = 0
    soft = nn.functional.kl_div(nn.functional.log_softmax(s / 2, -1),
                                nn.functional.softmax(t / 2, -1), reduction="batchmean")
    assert torch.allclose(kd_loss(s, t, y, temperature=2.0, alpha=1.0), 4 * soft)
    assert not torch.allclose(kd_loss(s, t, y), ce)


def test_qat_needs_labels_and_a_calibrated_model(setup):
    model, qmodel, x, y, _ = setup
    with pytest.raises(SpecError, match="labelled training data"):
        finetune(qmodel, model, x, None)
    observing = prepare(model, variant_config(parse_variant("w4a4"), quantizable_layers(model)))
    with pytest.raises(SpecError, match="calibrated"):
        finetune(observing, model, x, y)
