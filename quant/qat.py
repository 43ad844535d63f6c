"""Quantization-aware fine-tuning with knowledge distillation from the FP32 model.

A short fine-tune of a calibrated `QuantLayer` model: the forward pass fake-quantizes
weights and activations, the backward pass goes straight through (STE), so the float
weights move to where their quantized versions work. The FP32 model is the teacher: its
temperature-softened outputs carry more than the hard labels (which classes look alike),
which is what lets a few epochs recover most of a low-bit model's accuracy gap.

Choices: activation scales are learned (LSQ, Esser et al.: round passes the gradient
straight through, the scale gets its own gradient; zero-points stay), with their own,
larger learning rate: a min-max range set by a few outliers is what costs a low-bit model
most, and frozen scales leave QAT unable to fix it (on digits-cnn W4A4, frozen scales
recover a quarter of the gap, learned ones nearly all of it). `learn_scales=False` keeps
them as calibrated. Weight scales follow the weights (min-max re-taken after every step),
as export takes them. BatchNorm is already folded; the model stays in eval mode so that
nothing else drifts. The result is a plain calibrated `QuantLayer` model again.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import EPS
from .spec import SpecError
from .transform import quant_layers


def kd_loss(student: torch.Tensor, teacher: torch.Tensor | None, y: torch.Tensor, *,
            temperature: float = 4.0, alpha: float = 0.5) -> torch.Tensor:
    """α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y); plain CE without a teacher.

    T² keeps the soft term's gradient on the same scale as the hard term's (Hinton et al.).
    """
    hard = F.cross_entropy(student, y)
    if teacher is None:
        return hard
    t = temperature
    soft = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                    log_target=True, reduction="batchmean")
    return alpha * t * t * soft + (1 - alpha) * hard


def _lsq(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int):
    """Fake-quant differentiable in `scale` too; same values as `quantizer.fake_quant`."""
    v = x * (1.0 / scale)
    v = v + (torch.round(v) - v).detach()
    return (torch.clamp(v + zp, qmin, qmax) - zp) * scale


class _LearnedActScales:
    """While active, each static-activation `QuantLayer` quantizes its input with a learnable
    scale (a pre-hook, its `act_spec` set aside); on exit the learned scales go back into
    the layers' `act_scale` buffers and the specs return, so export sees a normal model."""

    def __init__(self, model: nn.Module):
        self.layers = {n: q for n, q in quant_layers(model).items()
                       if q.act_spec is not None and q.act_scale is not None}
        self.scales = {n: nn.Parameter(q.act_scale.detach().clone()) for n, q in self.layers.items()}

    def __enter__(self) -> list[nn.Parameter]:
        self.specs, self.handles = {}, []
        for name, q in self.layers.items():
            spec, scale = q.act_spec, self.scales[name]
            self.specs[name], q.act_spec = spec, None

            def hook(mod, inputs, spec=spec, scale=scale):
                return _lsq(inputs[0], scale.clamp(min=EPS), mod.act_zp, spec.qmin, spec.qmax)
            self.handles.append(q.register_forward_pre_hook(hook))
        return list(self.scales.values())

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        for name, q in self.layers.items():
            q.act_spec = self.specs[name]
            q.act_scale = self.scales[name].detach().clamp(min=EPS).clone()


def finetune(qmodel: nn.Module, fmodel: nn.Module, train_x: torch.Tensor | None,
             train_y: torch.Tensor | None, *, epochs: int = 3, distill: bool = True,
             temperature: float = 4.0, alpha: float = 0.5, lr: float = 1e-4,
             learn_scales: bool = True, scale_lr: float = 1e-2, batch_size: int = 64,
             seed: int = 0,
             progress: Callable[[int, int, float], None] | None = None) -> nn.Module:
    """A fine-tuned copy of the calibrated quantized model `qmodel` (the input is untouched).

    `fmodel` is the FP32 teacher (used only when `distill`). Adam on the float weights and
    biases (`lr`) and, with `learn_scales`, on the activation scales (`scale_lr`); shuffled
    mini-batches from a seeded generator: same seed, same result.
    `progress(epoch, epochs, mean_loss)` after each epoch.
    """
    if train_x is None or train_y is None:
        raise SpecError("QAT needs labelled training data; this model has none")
    if len(train_x) != len(train_y) or len(train_y) == 0:
        raise SpecError(f"QAT: {len(train_x)} inputs but {len(train_y)} labels")
    layers = quant_layers(qmodel)
    if any(q.mode != "quant" for q in layers.values()):
        raise SpecError("QAT needs a calibrated quantized model (run quantize/calibrate first)")
    student = copy.deepcopy(qmodel).eval()
    for q in quant_layers(student).values():
        q.weight_override = None   # a repair's fixed rounding would freeze the layer
    teacher = fmodel.eval() if distill else None
    scales = _LearnedActScales(student) if learn_scales else None
    groups = [{"params": [p for p in student.parameters() if p.requires_grad], "lr": lr}]
    if scales is not None and scales.scales:
        groups.append({"params": list(scales.scales.values()), "lr": scale_lr})
    with scales or contextlib.nullcontext():
        _train(student, teacher, train_x, train_y, torch.optim.Adam(groups), epochs=epochs,
               temperature=temperature, alpha=alpha, batch_size=batch_size, seed=seed,
               progress=progress)
    return student.eval()


def _train(student, teacher, train_x, train_y, opt, *, epochs, temperature, alpha,
           batch_size, seed, progress) -> None:
    g = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(train_y), generator=g)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            b = perm[i: i + batch_size]
            xb, yb = train_x[b], train_y[b]
            with torch.no_grad():
                t = teacher(xb) if teacher is not None else None
            loss = kd_loss(student(xb), t, yb, temperature=temperature, alpha=alpha)
            opt.zero_grad()
            loss.backward()
            opt.step()
            for q in quant_layers(student).values():
                if q.weight_spec is not None:
                    q.reset_weight_qparams()
            total += loss.item() * len(b)
        if progress is not None:
            progress(epoch, epochs, total / len(perm))
