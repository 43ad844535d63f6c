"""`digits-cnn`: a small CNN trained on scikit-learn's bundled `load_digits` (8×8 grayscale).

Real data with no download: 1,797 images of handwritten digits ship inside scikit-learn.
Inputs stay at their native 1×8×8, scaled to [0, 1] (pixel / 16). The model is a few
Conv-BN-ReLU blocks with one residual block (so folding meets an `add` and tie groups exist),
global average pooling and a Linear head. It is deliberately small: with few channels per
layer, low-bit activations (A4) and weights (≤ W3) cost accuracy visibly under plain min-max,
so calibration methods and repairs can be ranked on it.

Training is deterministic (fixed seed, fixed stratified split, fixed epochs, full-batch order
from a seeded generator, deterministic algorithms) and takes a few seconds on 2 cores. The
trained weights are cached as `digits-cnn-<recipe hash>.pt` under `$HILQ_CACHE` (default
`~/.cache/hilq`); changing the recipe changes the hash, so a stale cache is never reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import Data, ModelEntry

NAME = "digits-cnn"
INPUT_SHAPE = (1, 8, 8)
CODE_VERSION = 1   # bump when the architecture or the training loop changes


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights; its hash names the cache file."""

    width: int = 12
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    test_size: float = 0.25
    calib_size: int = 256
    standardize: bool = True

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "code": CODE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class DigitsCNN(nn.Module):
    """1×8×8 → conv(w) → residual(w) → conv(2w, stride 2) → 4×4 → conv(2w) → GAP → Linear(10)."""

    def __init__(self, width: int = 12, num_classes: int = 10):
        super().__init__()
        w = width
        self.stem = conv_bn(1, w)
        self.block = ResidualBlock(w)
        self.down = conv_bn(w, 2 * w, stride=2)
        self.conv = conv_bn(2 * w, 2 * w)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.down(self.block(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@functools.lru_cache(maxsize=4)
def _split(test_size: float):
    """sklearn's bundled digits and the fixed stratified split (read once per process)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    tr, te = train_test_split(list(range(len(digits.target))), test_size=test_size,
                              random_state=0, stratify=digits.target)
    return digits.images, digits.target, tr, te


def load_data(recipe: Recipe = Recipe()) -> Data:
    """The fixed split: stratified, `random_state=0`; calibration = a fixed train subset.

    Pixels are scaled to [0, 1] and, by default, standardised per pixel with the train
    split's mean and std; the model expects inputs prepared this way (they are what `Data`
    holds)."""
    images, target, tr, te = _split(recipe.test_size)
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.int64)
    tr, te = torch.tensor(tr), torch.tensor(te)
    if recipe.standardize:
        # Per-pixel z-score from the train split (sklearn's StandardScaler): border pixels
        # that rarely carry ink get long tails (z up to ~12), as real sensor inputs do.
        mean = x[tr].mean(dim=0, keepdim=True)
        std = x[tr].std(dim=0, keepdim=True).clamp(min=1.0 / 16)
        x = (x - mean) / std
    g = torch.Generator().manual_seed(recipe.seed)
    calib = tr[torch.randperm(len(tr), generator=g)[: recipe.calib_size]]
    return Data(calib_x=x[calib], test_x=x[te], test_y=y[te], train_x=x[tr], train_y=y[tr],
                name="sklearn-digits")


def train(recipe: Recipe = Recipe(), data: Data | None = None) -> DigitsCNN:
    """Train from scratch, deterministically: same recipe, same weights."""
    data = data or load_data(recipe)
    was_det = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    # One thread: the net is tiny (thread start-up dominates), it is faster on a shared
    # machine, and results do not depend on how many cores the machine has.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(recipe.seed)
        model = DigitsCNN(recipe.width)
        g = torch.Generator().manual_seed(recipe.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr,
                                weight_decay=recipe.weight_decay)
        steps = recipe.epochs * -(-len(data.train_y) // recipe.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for _ in range(recipe.epochs):
            perm = torch.randperm(len(data.train_y), generator=g)
            for i in range(0, len(perm), recipe.batch_size):
                b = perm[i: i + recipe.batch_size]
                opt.zero_grad()
                loss_fn(model(data.train_x[b]), data.train_y[b]).backward()
                opt.step()
                sched.step()
    finally:
        torch.use_deterministic_algorithms(was_det)
        torch.set_num_threads(threads)
    return model.eval()


def cache_dir() -> Path:
    return Path(os.environ.get("HILQ_CACHE") or Path.home() / ".cache" / "hilq")


def cache_path(recipe: Recipe = Recipe()) -> Path:
    return cache_dir() / f"{NAME}-{recipe.key()}.pt"


def build(recipe: Recipe = Recipe()) -> DigitsCNN:
    """The trained model: from the cache, or trained now and cached (atomic write)."""
    path = cache_path(recipe)
    model = DigitsCNN(recipe.width)
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError):
            pass    # a corrupt or foreign file: retrain and replace it
    model = train(recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return model


def entry(recipe: Recipe = Recipe()) -> ModelEntry:
    return ModelEntry(NAME, lambda: build(recipe), lambda: load_data(recipe), INPUT_SHAPE,
                      "small CNN with a residual block on sklearn's bundled 8x8 digits "
                      "(trained on first use, cached)")
