"""Accuracy of an engine's outputs on an evaluation set, computed where the artifact runs.

The fake-quant model on the host is a simulation; what ships is the engine's arithmetic
(its rounding, fusions, saturation, kernel choices). So the agent runs the artifact over the
whole evaluation set, outside the timed window, and compares with what the set carries:

    input:<name>    the inputs, N samples on axis 0 (already preprocessed: the manifest's
                    preprocessing, applied once on the host, so every device sees the same)
    labels          optional int labels (N,)           -> top-1
    fp32:<k>        optional FP32 reference of output k -> agreement, KL, SQNR, cosine
    scale:<k>, zero_point:<k>
                    optional: output k is integer (an exposed QuantizeLinear, `hilq debug`)
                    and is dequantized with these before the comparison

Standard library and numpy only: this file travels in the agent bundle.
"""

from __future__ import annotations

import numpy as np

WORST = 10  # sample indices returned, the largest KL (or wrong) first


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float | None:
    """10·log10(‖ref‖² / ‖got − ref‖²); None for an all-zero reference, 200 dB for exact."""
    ref, got = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    signal, noise = float(ref @ ref), float((got - ref) @ (got - ref))
    if signal == 0.0:
        return None
    return 200.0 if noise == 0.0 else 10.0 * np.log10(signal / noise)


def cosine(ref: np.ndarray, got: np.ndarray) -> float | None:
    ref, got = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    den = float(np.linalg.norm(ref) * np.linalg.norm(got))
    return float(ref @ got) / den if den > 0 else None


def _dequantized(out: np.ndarray, ev, k: int) -> np.ndarray:
    if f"scale:{k}" not in ev:
        return np.asarray(out, dtype=np.float64)
    scale = np.asarray(ev[f"scale:{k}"], dtype=np.float64)
    zp = np.asarray(ev[f"zero_point:{k}"], dtype=np.float64) if f"zero_point:{k}" in ev else 0.0
    return (np.asarray(out, dtype=np.float64) - zp) * scale


def evaluate(outputs: list, ev) -> dict:
    """`outputs`: the engine's outputs for all N inputs, in graph order; `ev`: the evaluation
    set's arrays (a mapping). Classification figures come from output 0 when it is (N, C)."""
    n = len(outputs[0])
    out0 = _dequantized(outputs[0], ev, 0)
    res = {"n": int(n), "top1": None, "agreement_fp32": None, "kl": None, "sqnr_db": None,
           "cosine": None, "worst": [], "outputs": []}
    logits = out0.reshape(n, -1) if out0.ndim >= 2 else None
    pred = logits.argmax(axis=1) if logits is not None and logits.shape[1] > 1 else None
    score = None  # per-sample badness: KL to FP32, else 1 for a wrong label
    if "labels" in ev and pred is not None:
        labels = np.asarray(ev["labels"]).astype(np.int64).ravel()
        res["top1"] = float((pred == labels).mean())
        score = (pred != labels).astype(np.float64)
    if "fp32:0" in ev:
        ref = np.asarray(ev["fp32:0"], dtype=np.float64).reshape(n, -1)
        res["sqnr_db"] = sqnr_db(ref, out0.reshape(n, -1))
        res["cosine"] = cosine(ref, out0.reshape(n, -1))
        if pred is not None:
            res["agreement_fp32"] = float((pred == ref.argmax(axis=1)).mean())
            p, q = _softmax(ref), _softmax(logits)
            kl = (p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum(axis=1)
            res["kl"] = float(kl.mean())
            score = kl
    if score is not None:
        res["worst"] = [int(i) for i in np.argsort(-score, kind="stable")[:WORST]
                        if score[i] > 0]
    for k, out in enumerate(outputs):
        if f"fp32:{k}" not in ev:
            continue
        ref, got = np.asarray(ev[f"fp32:{k}"]), _dequantized(out, ev, k)
        if ref.shape != got.shape:
            res["outputs"].append({"index": k, "sqnr_db": None, "cosine": None,
                                   "reason": f"shape {list(got.shape)} != reference "
                                             f"{list(ref.shape)}"})
            continue
        res["outputs"].append({"index": k, "sqnr_db": sqnr_db(ref, got),
                               "cosine": cosine(ref, got)})
    return res
