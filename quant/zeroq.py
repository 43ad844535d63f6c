"""ZeroQ distilled data: calibration inputs made from the model alone.

A trained network's BatchNorm layers remember the per-channel mean and variance of the
activations they saw in training. ZeroQ (Cai et al., 2020) starts from Gaussian noise and
optimises the inputs themselves until the activations feeding every BatchNorm have those
statistics; the result calibrates activation ranges almost as well as real data, with no
data at all. `calibration_data` is the one switch between that, the model's own real data,
and plain Gaussian noise (ZeroQ's ablation).

BatchNorm is *not* folded here: its running statistics are the signal. A model without
BatchNorm has nothing to match, so it is an error, never a silent fall-back to noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .spec import SpecError

CALIB_DATA = ("real", "distilled", "noise")
_BN = nn.modules.batchnorm._BatchNorm


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers whose running statistics distillation matches."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, _BN) and m.track_running_stats and m.running_mean is not None]


def _require_bn(model: nn.Module, name: str | None) -> list[tuple[str, nn.Module]]:
    bns = bn_layers(model)
    if not bns:
        label = name or type(model).__name__
        raise SpecError(f"model {label!r} has no BatchNorm layers (with running statistics): "
                        "ZeroQ distillation matches BatchNorm statistics, so it cannot run; "
                        "use --calib-data real or noise")
    return bns


def _channel_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (axis 1) mean and std over every other axis, as BatchNorm sees them."""
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims)
    std = torch.sqrt(x.var(dim=dims, unbiased=False) + eps)
    return mean, std


def _sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ZeroQ's per-layer distance: squared L2 divided by the channel count, so that wide
    layers do not dominate narrow ones."""
    return (a - b).pow(2).sum() / a.numel()


OBJECTIVES = ("batch", "sample")


def _sample_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std ([N, C]) over the remaining axes."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return flat.mean(-1), torch.sqrt(flat.var(-1, unbiased=False) + eps)


def _sample_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference code's distance: ‖a − b‖² over samples and channels, divided by N."""
    return (a - b).pow(2).sum() / a.shape[0]


def bn_loss(model: nn.Module, x: torch.Tensor, *, input_mean: float = 0.0,
            input_std: float = 1.0, objective: str = "batch") -> torch.Tensor:
    """The distillation objective on a batch, mean over BatchNorm layers and the input.

    `batch` (hilq's default): the batch's per-channel statistics against the running ones,
    ‖μ − μ_bn‖²/C + ‖σ − σ_bn‖²/C. `sample` (ZeroQ's reference code,
    amirgholami/ZeroQ `distill_data.py`): every sample's own per-channel statistics against
    them, summed over samples and channels and divided by the batch size. Differentiable in
    `x`; the model is used in eval mode."""
    if objective not in OBJECTIVES:
        raise SpecError(f"unknown distillation objective {objective!r} (use "
                        f"{', '.join(OBJECTIVES)})")
    bns = _require_bn(model, None)
    terms: list[torch.Tensor] = []
    stats, dist = ((_channel_stats, _sq) if objective == "batch"
                   else (_sample_stats, _sample_sq))

    def hook(bn, inputs):
        mean, std = stats(inputs[0], bn.eps)
        terms.append(dist(mean, bn.running_mean.expand_as(mean))
                     + dist(std, torch.sqrt(bn.running_var + bn.eps).expand_as(std)))

    was_training = model.training
    model.eval()
    handles = [bn.register_forward_pre_hook(hook) for _, bn in bns]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    mean, std = stats(x, 1e-5)
    terms.append(dist(mean, torch.full_like(mean, input_mean))
                 + dist(std, torch.full_like(std, input_std)))
    return torch.stack(terms).mean()


def _input_shape(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    shape = input_shape or getattr(model, "input_shape", None)
    if not shape:
        raise SpecError("distillation needs the input shape of one sample, e.g. (3, 224, 224)")
    return tuple(int(s) for s in shape)


def distill(model: nn.Module, n: int = 32, input_shape: Sequence[int] | None = None, *,
            iters: int = 500, lr: float = 0.5, seed: int = 0, patience: int = 100,
            min_lr: float = 1e-4, input_mean: float = 0.0, input_std: float = 1.0,
            name: str | None = None, objective: str = "batch",
            progress: Callable[[int, int, float], None] | None = None) -> torch.Tensor:
    """A batch of `n` inputs whose activations match every BatchNorm's running statistics.

    ZeroQ's recipe and defaults: Adam on the inputs with lr 0.5, ReduceLROnPlateau
    (patience 100, floor 1e-4) on the loss, 500 iterations. `objective="batch"` (hilq's)
    starts from seeded N(0, 1) and matches the batch's statistics; `"sample"` follows ZeroQ's
    reference code: near-zero uniform start, U(−0.1, 0.1), and every sample's own statistics
    (see `bn_loss`). The input term
    pulls each input channel to mean `input_mean`, std `input_std` (0 and 1: ZeroQ assumes
    normalised inputs). The model's weights are untouched (gradients go to the inputs only).
    `progress(i, iters, loss)` is called after each step, for a progress bar.
    Raises `SpecError` naming the model when it has no BatchNorm layers.
    """
    _require_bn(model, name)
    if n < 1 or iters < 0:
        raise SpecError(f"distillation needs n >= 1 and iters >= 0, got n={n}, iters={iters}")
    shape = _input_shape(model, input_shape)
    if objective not in OBJECTIVES:
        raise SpecError(f"unknown distillation objective {objective!r} (use "
                        f"{', '.join(OBJECTIVES)})")
    key = (weights_sha256(model), n, tuple(shape), iters, lr, seed, patience, min_lr, input_mean,
           input_std, objective)
    if key not in _DISTILLED:
        _DISTILLED[key] = _distill(model, n, shape, iters, lr, seed, patience, min_lr,
                                   input_mean, input_std, objective, progress)
    return _DISTILLED[key].clone()


# Seeded and deterministic, so one process distils each (model, settings) once: a search
# builds many artifacts of one model, each calibrated on the same distilled batch.
_DISTILLED: dict[tuple, torch.Tensor] = {}


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the model's state (names and tensors): the identity of its weights, in
    the distillation memo here and in the export's cache key (a retrained model is new)."""
    import hashlib

    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _distill(model, n, shape, iters, lr, seed, patience, min_lr, input_mean, input_std,
             objective, progress) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((n, *shape), generator=g) if objective == "batch"
         else torch.rand((n, *shape), generator=g) * 0.2 - 0.1).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=patience, min_lr=min_lr)
    for i in range(iters):
        loss = bn_loss(model, x, input_mean=input_mean, input_std=input_std,
                       objective=objective)
        # Gradient w.r.t. the inputs only: the model's .grad fields stay as they were.
        (x.grad,) = torch.autograd.grad(loss, [x])
        opt.step()
        value = loss.item()
        sched.step(value)
        if progress is not None:
            progress(i + 1, iters, value)
    return x.detach()


def noise(n: int, input_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Gaussian N(0, 1) inputs: the ablation baseline that distillation must beat."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *tuple(input_shape)), generator=g)


def calibration_data(kind: str, model: nn.Module, *, real: torch.Tensor | None = None,
                     n: int = 32, input_shape: Sequence[int] | None = None, seed: int = 0,
                     name: str | None = None, **distill_kw) -> torch.Tensor:
    """Calibration inputs of one `kind`: `real` (the given data, all of it), `distilled`
    (ZeroQ, `n` samples; `distill_kw` go to `distill`) or `noise` (`n` Gaussian samples)."""
    if kind == "real":
        if real is None:
            raise SpecError(f"model {name or type(model).__name__!r} has no calibration data: "
                            "give --data (a folder of images, .npy/.npz or "
                            "package.module:factory), or --calib-data distilled or noise")
        return real
    if kind == "distilled":
        return distill(model, n, input_shape, seed=seed, name=name, **distill_kw)
    if kind == "noise":
        return noise(n, _input_shape(model, input_shape), seed)
    raise SpecError(f"unknown calibration data {kind!r} (use {', '.join(CALIB_DATA)})")
