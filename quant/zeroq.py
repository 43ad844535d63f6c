"""ZeroQ distilled data: calibration inputs made from the model alone.

A trained network's BatchNorm layers remember the per-channel mean and variance of the
activations they saw in training. ZeroQ (Cai et al., 2020) starts from Gaussian noise and
optimises the inputs themselves until the activations feeding every BatchNorm have those
statistics; the result calibrates activation ranges almost as well as real data, with no
data at all. `calibration_data` is the one switch between that, the model's own real data,
and plain Gaussian noise (ZeroQ's ablation).

What the inputs themselves look like is not in any BatchNorm. ZeroQ assumes N(0, 1); a
declared preprocessing says better (`input_prior`): photographs through the model's own
normalisation, kept inside the range it can produce. On EfficientNet-Lite0 (inputs in [−1, 1])
ZeroQ's assumption let the inputs wander to ±12, and W8A8 calibrated on them agreed with FP32
on 76–84% of real photographs in simulation; with the prior, 94–95%, as real photographs do
(`experiments/distill_study.py`).

BatchNorm is *not* folded here: its running statistics are the signal. A model without
BatchNorm has nothing to match, so it is an error, never a silent fall-back to noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .spec import CALIB_DATA, DISTILL_ITERS, SpecError

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


def bn_loss(model: nn.Module, x: torch.Tensor, *, input_mean: float | Sequence[float] = 0.0,
            input_std: float | Sequence[float] = 1.0, objective: str = "batch") -> torch.Tensor:
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
    terms.append(dist(mean, torch.as_tensor(input_mean, dtype=mean.dtype).expand_as(mean))
                 + dist(std, torch.as_tensor(input_std, dtype=std.dtype).expand_as(std)))
    return torch.stack(terms).mean()


def _input_shape(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    shape = input_shape or getattr(model, "input_shape", None)
    if not shape:
        raise SpecError("distillation needs the input shape of one sample, e.g. (3, 224, 224)")
    return tuple(int(s) for s in shape)


def distill(model: nn.Module, n: int = 32, input_shape: Sequence[int] | None = None, *,
            iters: int = DISTILL_ITERS, lr: float = 0.5, seed: int = 0, patience: int = 100,
            min_lr: float = 1e-4, input_mean: float | Sequence[float] = 0.0,
            input_std: float | Sequence[float] = 1.0,
            input_range: tuple[Sequence[float], Sequence[float]] | None = None,
            name: str | None = None, objective: str = "batch",
            progress: Callable[[int, int, float], None] | None = None,
            snapshot: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """A batch of `n` inputs whose activations match every BatchNorm's running statistics.

    ZeroQ's recipe and defaults: Adam on the inputs with lr 0.5, ReduceLROnPlateau
    (patience 100, floor 1e-4) on the loss; `DISTILL_ITERS` iterations (the paper's 500
    drift further from real inputs, docs/distill.md). `objective="batch"` (hilq's)
    starts from seeded N(input_mean, input_std) and matches the batch's statistics;
    `"sample"` follows ZeroQ's reference code: near-zero uniform start, U(−0.1, 0.1), and
    every sample's own statistics (see `bn_loss`). The input term pulls each input channel
    to mean `input_mean`, std `input_std` (scalars or one per channel; 0 and 1 are ZeroQ's
    assumption of normalised inputs, `input_prior` gives the real ones of a declared
    preprocessing). `input_range` (per-channel lows and highs) keeps every step inside the
    inputs the preprocessing can produce: without it the optimiser wanders to values no
    photograph reaches and the input's range, and every range after it, grows with them.
    The model's weights are untouched (gradients go to the inputs only). `progress(i, iters,
    loss)` is called after each step, for a progress bar; `snapshot(i, x)` too, for studies
    of the iteration count (not memoised). Raises `SpecError` naming the model when it has
    no BatchNorm layers.
    """
    _require_bn(model, name)
    if n < 1 or iters < 0:
        raise SpecError(f"distillation needs n >= 1 and iters >= 0, got n={n}, iters={iters}")
    shape = _input_shape(model, input_shape)
    if objective not in OBJECTIVES:
        raise SpecError(f"unknown distillation objective {objective!r} (use "
                        f"{', '.join(OBJECTIVES)})")
    settings = dict(iters=iters, lr=lr, seed=seed, patience=patience, min_lr=min_lr,
                    input_mean=_channels(input_mean, shape), input_std=_channels(input_std, shape),
                    input_range=None if input_range is None else
                    tuple(_channels(r, shape) for r in input_range), objective=objective)
    key = (weights_sha256(model), n, tuple(shape), *settings.values())
    if snapshot is not None or key not in _DISTILLED:
        _DISTILLED[key] = _distill(model, n, shape, progress=progress, snapshot=snapshot,
                                   **settings)
    return _DISTILLED[key].clone()


def _channels(v: float | Sequence[float], shape: Sequence[int]) -> tuple[float, ...]:
    """A scalar or per-channel setting as one float per input channel (axis 1 of a batch)."""
    vals = (float(v),) * shape[0] if isinstance(v, (int, float)) else tuple(map(float, v))
    if len(vals) != shape[0]:
        raise SpecError(f"{len(vals)} per-channel values for an input with {shape[0]} channels")
    return vals


def input_prior(preprocess) -> dict:
    """What a declared preprocessing (a `Preprocess`, its text or its manifest dict) says
    about a model's inputs before any data is seen: natural photographs' per-channel pixel
    mean and std (ImageNet's, in [0, 1]) and the extremes 0 and 1, each taken through the
    preprocessing's own normalisation, as `distill`'s keyword arguments. With
    EfficientNet-Lite's mean 127 / std 128, inputs lie in [−0.99, 1.0] with a std near 0.45,
    not the N(0, 1) ZeroQ assumes. `{}` when nothing is declared, or the inputs are raw
    uint8 or channels-last (ZeroQ's assumption holds)."""
    from .data import IMAGENET, parse_preprocess

    preprocess = parse_preprocess(preprocess)
    if (preprocess is None or not preprocess.mean or preprocess.dtype != "float32"
            or preprocess.layout != "NCHW"):     # distillation's channels are axis 1
        return {}
    grey = preprocess.mode == "L"
    pm, ps = ((sum(IMAGENET.mean) / 3,), (sum(IMAGENET.std) / 3,)) if grey else \
        (IMAGENET.mean, IMAGENET.std)
    m, s = preprocess.mean, preprocess.std
    return {"input_mean": tuple((a - b) / c for a, b, c in zip(pm, m, s)),
            "input_std": tuple(a / c for a, c in zip(ps, s)),
            "input_range": (tuple(-b / c for b, c in zip(m, s)),
                            tuple((1 - b) / c for b, c in zip(m, s)))}


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


def _distill(model, n, shape, *, iters, lr, seed, patience, min_lr, input_mean, input_std,
             input_range, objective, progress, snapshot) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    view = (1, -1) + (1,) * (len(shape) - 1)      # per-channel values against [N, C, ...]
    mean, std = torch.tensor(input_mean).view(view), torch.tensor(input_std).view(view)
    x = (torch.randn((n, *shape), generator=g) * std + mean if objective == "batch"
         else torch.rand((n, *shape), generator=g) * 0.2 - 0.1)
    lo, hi = (None, None) if input_range is None else \
        (torch.tensor(input_range[0]).view(view), torch.tensor(input_range[1]).view(view))
    x = x if lo is None else torch.maximum(torch.minimum(x, hi), lo)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=patience, min_lr=min_lr)
    for i in range(iters):
        loss = bn_loss(model, x, input_mean=input_mean, input_std=input_std,
                       objective=objective)
        # Gradient w.r.t. the inputs only: the model's .grad fields stay as they were.
        (x.grad,) = torch.autograd.grad(loss, [x])
        opt.step()
        if lo is not None:           # projected: back inside what the preprocessing makes
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
        value = loss.item()
        sched.step(value)
        if progress is not None:
            progress(i + 1, iters, value)
        if snapshot is not None:
            snapshot(i + 1, x.detach().clone())
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
