"""Weight quantizers that are not a uniform affine grid: binary, ternary, k-means codebook,
product quantization and power-of-two levels.

Each returns a `CodebookQuant`: the dequantized weight (what the float graph runs), the codes,
the codebook or scales needed to decode them, and `size_bits`, the storage a deployment would
need. Size accounting: codes at their bit width (ternary at 2 bits: no base-3 packing),
k-means/PQ centroids stored as **fp16** (the dequantized weight uses the fp16-rounded centroids,
so the accounting is honest), per-channel/per-tensor scales as **fp32**. Biases are not counted
(they are the same for every method; `transform.size_bits` counts them).

Weights are read with the output channel on axis 0, as conv and linear weights are laid out.
Everything is torch-only and deterministic for a given `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CENTROID_BITS = 16   # k-means / PQ centroids stored as fp16
SCALE_BITS = 32      # scales stored as fp32


@dataclass(frozen=True)
class CodebookQuant:
    """A weight quantized by a codebook-style method, and what it costs to store."""

    weight: torch.Tensor              # dequantized, same shape and dtype as the input
    codes: torch.Tensor               # int64: indices into the codebook, or signed levels
    codebook: torch.Tensor | None     # centroids: (k,) for k-means, (m, k, d) for PQ
    scales: torch.Tensor | None       # per-channel or per-tensor scale(s), when used
    size_bits: int                    # codes + codebook + scales
    method: str

    @property
    def bits_per_weight(self) -> float:
        return self.size_bits / self.weight.numel()


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).float()


def _per_row(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return v.reshape([-1] + [1] * (w.dim() - 1))


# ---------------------------------------------------------------- binary and ternary

def binarize(w: torch.Tensor, per_channel: bool = True) -> CodebookQuant:
    """XNOR-Net weights: sign(w)·α with α = mean|w| (per output channel, or per tensor),
    the α that minimises ‖w − α·sign(w)‖². sign(0) is taken as +1 so every code is ±1."""
    r = _rows(w)
    alpha = r.abs().mean(dim=1) if per_channel else r.abs().mean().reshape(1)
    sign = torch.where(r >= 0, 1.0, -1.0)
    deq = (sign * alpha.reshape(-1, 1)).reshape(w.shape).to(w.dtype)
    size = w.numel() * 1 + alpha.numel() * SCALE_BITS
    return CodebookQuant(deq, sign.to(torch.int64).reshape(w.shape), None, alpha, size, "binary")


def ternarize(w: torch.Tensor, threshold_ratio: float = 0.7, per_channel: bool = True
              ) -> CodebookQuant:
    """Ternary weight networks (Li & Liu 2016): codes in {−1, 0, +1}, Δ = 0.7·mean|w|, and
    α = mean of |w| over the weights above Δ (the least-squares α for that support).
    TWN uses one Δ, α per layer; `per_channel` (default) takes them per output channel."""
    r = _rows(w)
    a = r.abs()
    mean = a.mean(dim=1, keepdim=True) if per_channel else a.mean().expand(r.shape[0], 1)
    delta = threshold_ratio * mean
    mask = a > delta
    if per_channel:
        alpha = (a * mask).sum(1) / mask.sum(1).clamp(min=1)
    else:
        alpha = ((a * mask).sum() / mask.sum().clamp(min=1)).reshape(1)
    codes = torch.sign(r) * mask
    deq = (codes * alpha.reshape(-1, 1)).reshape(w.shape).to(w.dtype)
    size = w.numel() * 2 + alpha.numel() * SCALE_BITS
    return CodebookQuant(deq, codes.to(torch.int64).reshape(w.shape), None, alpha, size, "ternary")


def fake_binarize(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Binary weight with a straight-through gradient (identity), for QAT."""
    return w + (binarize(w, per_channel).weight - w).detach()


def fake_ternarize(w: torch.Tensor, threshold_ratio: float = 0.7,
                   per_channel: bool = True) -> torch.Tensor:
    """Ternary weight with a straight-through gradient (identity), for QAT."""
    return w + (ternarize(w, threshold_ratio, per_channel).weight - w).detach()


# ---------------------------------------------------------------- k-means

def _assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest centroid for each row of x (n, d) among c (k, d)."""
    if x.shape[1] == 1:  # 1-D: sorted centroids, nearest by midpoints, O(n log k)
        order = torch.argsort(c[:, 0])
        cs = c[order, 0]
        mid = (cs[1:] + cs[:-1]) / 2
        return order[torch.bucketize(x[:, 0], mid)]
    out = [((xb[:, None, :] - c[None]) ** 2).sum(-1).argmin(1) for xb in x.split(chunk)]
    return torch.cat(out)


def _init(x: torch.Tensor, k: int, init: str, gen: torch.Generator) -> torch.Tensor:
    if init == "linear":  # Deep Compression's choice: spreads centroids over the whole range,
        # so the rare large weights keep a centroid of their own.
        if x.shape[1] != 1:
            raise ValueError("linear init is for scalar k-means; use kmeans++ for vectors")
        return torch.linspace(float(x.min()), float(x.max()), k).reshape(k, 1)
    if init != "kmeans++":
        raise ValueError(f"unknown init {init!r} (use linear or kmeans++)")
    if len(x) > 4096:  # seed from a sample: bounded cost, still D²-weighted
        x = x[torch.randperm(len(x), generator=gen)[:4096]]
    centers = [x[torch.randint(len(x), (1,), generator=gen)].reshape(-1)]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        if float(d2.sum()) == 0.0:  # fewer distinct points than k: repeat one
            centers.append(centers[-1])
            continue
        i = torch.multinomial(d2, 1, generator=gen)
        centers.append(x[i].reshape(-1))
        d2 = torch.minimum(d2, ((x - centers[-1]) ** 2).sum(1))
    return torch.stack(centers)


def _kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator, init: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations on x (n, d); returns centroids (k, d) and assignments (n,).
    An empty cluster keeps its previous centroid. Stops early once assignments settle."""
    c = _init(x, k, init, gen)
    a = _assign(x, c)
    for _ in range(iters):
        sums = torch.zeros_like(c).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k).unsqueeze(1)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        new = _assign(x, c)
        if torch.equal(new, a):
            break
        a = new
    return c, a


def kmeans_quantize(w: torch.Tensor, bits: int, iters: int = 30, seed: int = 0,
                    init: str = "linear") -> CodebookQuant:
    """Per-tensor scalar k-means codebook (Deep Compression): 2^bits fp16 centroids and a
    `bits`-bit index per weight. `init` is `linear` (default) or `kmeans++`."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    k = 2**bits
    x = w.detach().reshape(-1, 1).float()
    c, _ = _kmeans(x, k, iters, torch.Generator().manual_seed(seed), init)
    c = c.half().float()  # stored as fp16: decode with what is stored
    codes = _assign(x, c)
    deq = c[codes, 0].reshape(w.shape).to(w.dtype)
    size = w.numel() * bits + k * CENTROID_BITS
    return CodebookQuant(deq, codes.reshape(w.shape), c.reshape(k), None, size, "kmeans")


def product_quantize(w: torch.Tensor, sub_dim: int, bits: int, iters: int = 30,
                     seed: int = 0) -> CodebookQuant:
    """Product quantization (Jégou et al. 2011; Stock et al. 2020 for weights): each output
    row (flattened input × kernel) is cut into sub-vectors of `sub_dim` contiguous values;
    sub-space j has its own codebook of up to 2^bits fp16 centroids (k-means++), and each
    sub-vector is stored as one `bits`-bit index. Codes (rows, m); codebook (m, k, d)."""
    r = _rows(w)
    rows, cols = r.shape
    if sub_dim < 1 or cols % sub_dim:
        raise ValueError(f"row length {cols} is not a multiple of sub_dim {sub_dim}")
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    m, k = cols // sub_dim, min(2**bits, rows)
    gen = torch.Generator().manual_seed(seed)
    sub = r.reshape(rows, m, sub_dim)
    books, codes = [], []
    for j in range(m):
        c, _ = _kmeans(sub[:, j], k, iters, gen, "kmeans++")
        c = c.half().float()
        books.append(c)
        codes.append(_assign(sub[:, j], c))
    book, code = torch.stack(books), torch.stack(codes, dim=1)
    deq = book[torch.arange(m)[None, :], code].reshape(w.shape).to(w.dtype)
    size = rows * m * bits + m * k * sub_dim * CENTROID_BITS
    return CodebookQuant(deq, code, book, None, size, "pq")


# ---------------------------------------------------------------- power of two

def pow2_quantize(w: torch.Tensor, bits: int, per_channel: bool = False) -> CodebookQuant:
    """Logarithmic quantization (Miyashita et al. 2016): values sign·α·2^−j, j = 0..L−1, and 0,
    with L = 2^(bits−1) − 1 magnitudes (one code is zero) and α = max|w| (fp32). The exponent
    is log2(|w|/α) rounded to nearest, so levels are chosen geometrically; a value below half
    the smallest level becomes 0. Multiplications become shifts on integer hardware.
    Codes are signed: ±(j + 1), 0 for zero."""
    if not 2 <= bits <= 8:
        raise ValueError(f"power-of-two quantization needs 2..8 bits, got {bits}")
    levels = 2 ** (bits - 1) - 1
    r = _rows(w)
    alpha = r.abs().amax(dim=1) if per_channel else r.abs().amax().reshape(1)
    alpha = alpha.clamp(min=torch.finfo(torch.float32).tiny)
    rel = r.abs() / alpha.reshape(-1, 1)
    j = torch.round(-torch.log2(rel.clamp(min=1e-38))).clamp(0, levels - 1)
    zero = rel < 2.0 ** -(levels - 1) / 2
    mag = torch.where(zero, 0.0, 2.0 ** -j)
    deq = (torch.sign(r) * mag * alpha.reshape(-1, 1)).reshape(w.shape).to(w.dtype)
    codes = torch.where(zero | (r == 0), 0, (j + 1) * torch.sign(r)).to(torch.int64)
    book = 2.0 ** -torch.arange(levels, dtype=torch.float32)
    size = w.numel() * bits + alpha.numel() * SCALE_BITS
    return CodebookQuant(deq, codes.reshape(w.shape), book, alpha, size, "pow2")


def quant_error(result: CodebookQuant, w: torch.Tensor) -> float:
    """‖w − Q(w)‖², comparable across methods."""
    return float(((w.detach().float() - result.weight.float()) ** 2).sum())


def codebook_entropy_bits(codes: torch.Tensor) -> float:
    """Empirical entropy of the codes in bits per code: the size Huffman coding would reach
    (Deep Compression's last stage); reported, not counted in `size_bits`."""
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum()) if len(p) > 1 else 0.0


__all__ = ["CodebookQuant", "binarize", "ternarize", "fake_binarize", "fake_ternarize",
           "kmeans_quantize", "product_quantize", "pow2_quantize", "quant_error",
           "codebook_entropy_bits", "CENTROID_BITS", "SCALE_BITS"]
