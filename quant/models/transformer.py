"""`tiny-transformer`: a Linear-heavy stack of pre-LN transformer blocks, for weight-only INT4.

Input is float, shape (seq_len, d_model) per sample: already-embedded tokens. We chose float
input over int64 token ids so that exported artifacts (ONNX, ONNX Runtime, TensorRT) see one
float input like every other built-in model, and an embedding table (a Gather, not a MatMul)
is not part of what INT4 weight quantization measures. The first layer (`embed`, a Linear)
projects the input embeddings; then `depth` pre-LN blocks, each multi-head self-attention
written with separate `nn.Linear` q/k/v/o projections (so all four are quantizable layers,
not hidden inside `nn.MultiheadAttention`) and a 4× GELU MLP; then a final LayerNorm and a
Linear head giving per-token logits over `vocab` classes, shape (batch, seq_len, vocab).
All feature dimensions are multiples of 128, so per-group INT4 with group 32/64/128 applies
to every Linear. Weights are seeded random; data is seeded Gaussian, without labels.

Sequence length (`entry(seq_len=L)`, `hilq bench --seq-len`): the learned positional table is
drawn once with `MAX_SEQ_LEN` rows and a model built for length L keeps its first L rows, so
every length runs the same weights (the default 64 is bit-identical to a 64-row draw). We size
the table at build time rather than slicing it in `forward` by the input's length: the
deployed graph stays the plain one (no Shape/Slice nodes around the positions), every
artifact has a static sequence axis, as OpenVINO and TensorRT want, and each length is
calibrated and evaluated on inputs of its own length. The cost is one artifact per length,
which a sweep builds anyway.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import Data, ModelEntry, ModelError

NAME = "tiny-transformer"
SEQ_LEN, D_MODEL, HEADS, DEPTH, VOCAB = 64, 256, 4, 4, 512
MAX_SEQ_LEN = 1024    # rows of the learned positional table; a model keeps the first seq_len


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
        self.heads, self.head_dim = heads, d_model // heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.reshape(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, d_model: int = D_MODEL, heads: int = HEADS, depth: int = DEPTH,
                 vocab: int = VOCAB, seq_len: int = SEQ_LEN):
        super().__init__()
        self.input_shape = (seq_len, d_model)
        self.embed = nn.Linear(d_model, d_model)
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model))
        self.blocks = nn.Sequential(*[Block(d_model, heads) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(self.blocks(self.embed(x) + self.pos)))


def check_seq_len(seq_len: int) -> int:
    if not isinstance(seq_len, int) or not 1 <= seq_len <= MAX_SEQ_LEN:
        raise ModelError(f"--seq-len {seq_len!r}: {NAME} takes 1..{MAX_SEQ_LEN} "
                         "(the rows of its learned positional table)")
    return seq_len


@torch.no_grad()
def build(seed: int = 0, seq_len: int = SEQ_LEN) -> TinyTransformer:
    """Seeded weights: Linear N(0, 0.02) (GPT-2's init), positions N(0, 0.02) (the first
    `seq_len` rows of one `MAX_SEQ_LEN`-row draw), LayerNorm γ around 1 and β around 0 so
    LayerNorm is not an identity."""
    torch.manual_seed(seed)    # module constructors draw too; then overwrite deterministically
    model = TinyTransformer(seq_len=check_seq_len(seq_len))
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, 0.02, generator=g)
            m.bias.normal_(0.0, 0.01, generator=g)
        elif isinstance(m, nn.LayerNorm):
            m.weight.uniform_(0.8, 1.2, generator=g)
            m.bias.normal_(0.0, 0.02, generator=g)
    model.pos.copy_(torch.empty(MAX_SEQ_LEN, model.pos.shape[1]).normal_(0.0, 0.02,
                                                                         generator=g)[:seq_len])
    return model.eval()


def random_data(seed: int = 0, n_calib: int = 32, n_test: int = 32,
                seq_len: int = SEQ_LEN) -> Data:
    g = torch.Generator().manual_seed(seed + 1)
    shape = (seq_len, D_MODEL)
    return Data(calib_x=torch.randn((n_calib, *shape), generator=g),
                test_x=torch.randn((n_test, *shape), generator=g), test_y=None,
                name="gaussian-embeddings")


def entry(seed: int = 0, seq_len: int = SEQ_LEN) -> ModelEntry:
    """The model at `seq_len`; its data (and so its evaluation set) is drawn at that length."""
    check_seq_len(seq_len)
    return ModelEntry(NAME, lambda: build(seed, seq_len), lambda: random_data(seed, seq_len=seq_len),
                      (seq_len, D_MODEL),
                      f"{DEPTH} pre-LN transformer blocks, d_model {D_MODEL}, {HEADS} heads, "
                      f"MLP 4x, float input (seq {seq_len}, d_model {D_MODEL}), seeded weights",
                      at_seq_len=lambda n: entry(seed, n), output_kinds=("logits",))
