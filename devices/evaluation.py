"""Data through the engine outside the timed window (part of the agent bundle: standard
library and numpy only): the reference check (`check_outputs`), the timed run's inputs
(`inputs`) and the pass over an evaluation set (`evaluate`). Many samples go through an
engine compiled for a fixed batch in slices of that batch (`run_in_batches`)."""

from __future__ import annotations

import time

if __package__:  # imported as devices.evaluation (host-side tools, tests)
    from hilq import accuracy

    from .failures import Failure
    from .runtimes import sha256_file
else:  # in the agent's bundle, beside it
    import accuracy
    from failures import Failure
    from runtimes import sha256_file


def named(arrays, prefix: str) -> dict:
    """`prefix:<name>` arrays of a reference or evaluation set, by name."""
    return {k[len(prefix):]: arrays[k] for k in arrays if k.startswith(prefix)}


def inputs(session, seed: int, reference: str | None = None) -> dict:
    """The timed run's inputs: the reference's real samples where it has them (a model whose
    work depends on its input, a sample rate or a state that must be valid), repeated to
    the engine's shape; seeded random values otherwise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    real: dict = {}
    if reference:
        with np.load(reference) as ref:
            real = {**named(ref, "input:"), **named(ref, "fixed:")}
    feeds = {}
    for name, shape, dtype in session.inputs:
        r = real.get(name)
        if r is not None and tuple(r.shape) == tuple(shape):
            feeds[name] = r.astype(dtype)
        elif r is not None and r.ndim == len(shape) and tuple(r.shape[1:]) == tuple(shape[1:]):
            feeds[name] = np.resize(r, shape).astype(dtype)   # samples repeated to the batch
        elif np.issubdtype(np.dtype(dtype), np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = rng.integers(0, 8, size=shape).astype(dtype)
    return feeds


def run_in_batches(session, feeds: dict, max_batch: int = 64, fixed: dict | None = None
                   ) -> list:
    """Run many inputs through an engine compiled for a fixed batch (OpenVINO's static
    reshape, TensorRT profiles): slices of that batch, the last one padded by repeating its
    rows, outputs joined. An engine with a dynamic batch gets slices of `max_batch` (an
    evaluation set of thousands of images would not fit at once). `fixed` inputs (a state,
    a sample rate) go whole with every slice."""
    import numpy as np

    fixed = fixed or {}
    batch = {name: shape[0] for name, shape, _ in session.inputs if shape}
    n = len(next(iter(feeds.values())))
    b = batch.get(next(iter(feeds)), n)
    if not isinstance(b, int) or b < 1:
        b = min(n, max_batch)
    if b == n:
        return session.run({**feeds, **fixed})
    parts = []
    for start in range(0, n, b):
        chunk = {k: v[start:start + b] for k, v in feeds.items()}
        short = b - len(next(iter(chunk.values())))
        if short:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)])
                     for k, v in chunk.items()}
        # padding rows are cut from outputs batched on axis 0; an output batched elsewhere
        # (sequence-first [T, N, V]) is kept whole, as the host's reference run keeps it
        parts.append([np.asarray(o)[: b - short] if short and np.ndim(o) else np.asarray(o)
                      for o in session.run({**chunk, **fixed})])
    return [np.concatenate(outs) if outs[0].ndim else outs[0] for outs in zip(*parts)]


def check_outputs(session, reference: str, rtol: float, atol: float) -> dict:
    import numpy as np

    with np.load(reference) as ref:
        arrays = {k: ref[k] for k in ref.files}
    feeds, fixed = named(arrays, "input:"), named(arrays, "fixed:")
    want = [arrays[f"output:{k}"] for k in range(len(named(arrays, "output:")))]
    got = run_in_batches(session, feeds, fixed=fixed)
    worst_abs, worst_rel, ok = 0.0, 0.0, len(got) >= len(want)
    for g, w in zip(got, want):
        g, w = np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64)
        if g.shape != w.shape:
            ok = False
            continue
        diff = np.abs(g - w)
        worst_abs = max(worst_abs, float(diff.max(initial=0)))
        worst_rel = max(worst_rel, float((diff / (np.abs(w) + 1e-12)).max(initial=0)))
        ok = ok and bool(np.all(diff <= atol + rtol * np.abs(w)))
    return {"ok": ok, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
            "rtol": rtol, "atol": atol, "outputs": len(want)}


def evaluate(session, path: str) -> dict:
    """The artifact over the whole evaluation set: `accuracy.evaluate`'s figures plus the
    set's sha256 (what the figures were measured on)."""
    import numpy as np

    try:
        ev = dict(np.load(path))
    except (OSError, ValueError) as e:
        raise Failure("bad_input", f"evaluation set {path}: {e}") from e
    feeds = named(ev, "input:")
    if not feeds:
        raise Failure("bad_input", f"evaluation set {path} holds no input:<name> arrays")
    t0 = time.perf_counter()
    outs = [np.asarray(o) for o in run_in_batches(session, feeds, fixed=named(ev, "fixed:"))]
    res = accuracy.evaluate(outs, ev)
    res["eval_sha256"] = sha256_file(path)
    res["wall_s"] = time.perf_counter() - t0
    return res
