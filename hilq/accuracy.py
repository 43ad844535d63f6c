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
    kind:<k>        optional: what output k is (`KINDS`), decided on the host from the FP32
                    outputs; absent means class logits (the built-in classifiers). Top-1,
                    agreement and KL are only computed over class scores: a top-1 over a
                    box tensor means nothing. Every output gets SQNR and cosine, and maps,
                    sequences, token strings and detections get a task figure (`task`:
                    map IoU, greedy-CTC agreement, exact match, mAP@0.5 against FP32's
                    detections through pycocotools where the device has it)
    fixed:<name>    optional: an input that is the same for every sample (a recurrent state,
                    a sample rate), fed as it is rather than sliced
    metric:source, metric:function
                    optional: a user's metric (`--metric module:fn`, as NNCF's
                    `validation_fn`), its module's source carried inside the set so it runs
                    where the artifact runs and the set's sha256 names the code too:
                    `fn(outputs, fp32_outputs, labels) -> {name: value}`, higher is better

Standard library and numpy only: this file travels in the agent bundle.
"""

from __future__ import annotations

import numpy as np

WORST = 10  # sample indices returned, the largest KL (or wrong) first
# what an output can be: class logits or probabilities (N, C); a dense map (N, C, H, W);
# per-position class probabilities (N, T, V), read by greedy CTC decoding; decoded tokens
# (N, T) integers; raw detections (N, 4+C, A) or (N, A, 4+C); anything else
KINDS = ("logits", "probs", "map", "sequence", "tokens", "detections", "tensor")
SCORES = ("logits", "probs")
# the task figures `task_figures` reports, by the kinds that have one
TASK_FIGURES = ("map_iou", "sequence_agreement", "token_agreement", "detection_map50")


def output_kind(ref: np.ndarray) -> str:
    """What an FP32 output (N samples on axis 0) holds, from its shape and values: the
    host decides once, at export, and the evaluation set carries the answer."""
    a = np.asarray(ref)
    if np.issubdtype(a.dtype, np.integer):
        return "tokens" if a.ndim == 2 else "tensor"
    if a.ndim == 2 and a.shape[1] > 1:
        rows = a.sum(axis=1)
        probs = a.min() >= 0 and np.allclose(rows, 1.0, atol=1e-3)
        return "probs" if probs else "logits"
    if a.ndim == 4 and min(a.shape[2:]) >= 8:
        return "map"
    if a.ndim == 3:
        t, v = a.shape[1:]
        if v > 1 and a.min() >= 0 and np.allclose(a.sum(axis=2), 1.0, atol=1e-3):
            return "sequence"
        small, large = min(t, v), max(t, v)
        scores = a[:, 4:, :] if t < v else a[:, :, 4:]     # YOLO: classes (objectness) in [0, 1]
        if 5 <= small <= 128 and large >= max(200, 16 * small) and scores.min() >= 0 \
                and scores.max() <= 1:
            return "detections"
    return "tensor"


def map_iou(ref: np.ndarray, got: np.ndarray) -> float | None:
    """Mean over samples of the IoU of the two maps thresholded at 0.5 (probabilities) or
    0 (logits): the region a segmentation or text detector would draw."""
    t = 0.5 if ref.min() >= 0 and ref.max() <= 1 else 0.0
    a = ref.reshape(len(ref), -1) > t
    b = got.reshape(len(got), -1) > t
    union = (a | b).sum(axis=1)
    inter = (a & b).sum(axis=1)
    keep = union > 0
    return float((inter[keep] / union[keep]).mean()) if keep.any() else None


def ctc_greedy(probs: np.ndarray, blank: int = 0) -> list[tuple]:
    """Greedy CTC decoding of (N, T, V) scores: best class per step, repeats merged,
    blanks dropped (PaddleOCR's and CRNN's decoder)."""
    best = probs.argmax(axis=2)
    out = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        out.append(tuple(int(c) for c in row[keep] if c != blank))
    return out


SCORE_MIN, NMS_IOU = 0.25, 0.45   # the decode every YOLO-family exporter ships


def decode_detections(raw: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Raw YOLO-family output -> per sample (boxes xyxy, scores, classes) after the model's
    usual decode and class-aware NMS. Channels-first (N, 4+C, A) is YOLOv8's head (box, then
    class scores); channels-last (N, A, 5+C) YOLOv5's and YOLOX's (box, objectness, classes)."""
    out = []
    first = raw.shape[1] < raw.shape[2]
    for a in raw.astype(np.float64):
        a = a.T if first else a
        box = a[:, :4]
        cls = a[:, 4:] if first else a[:, 5:] * a[:, 4:5]
        if cls.shape[1] == 0:
            cls = a[:, 4:5]
        c, score = cls.argmax(axis=1), cls.max(axis=1)
        keep = score >= SCORE_MIN
        xyxy = np.concatenate([box[:, :2] - box[:, 2:] / 2, box[:, :2] + box[:, 2:] / 2], axis=1)
        xyxy, score, c = xyxy[keep], score[keep], c[keep]
        kept = _nms(xyxy + c[:, None] * 1e5, score)      # offset per class: class-aware
        out.append((xyxy[kept], score[kept], c[kept]))
    return out


def _nms(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Greedy non-maximum suppression at `NMS_IOU`: indices kept, best score first."""
    order, keep = np.argsort(-scores, kind="stable"), []
    area = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        iou = inter / (area[i] + area[rest] - inter + 1e-12)
        order = rest[iou <= NMS_IOU]
    return np.asarray(keep, dtype=np.int64)


def detection_map(ref: np.ndarray, got: np.ndarray) -> dict:
    """mAP@0.5 (COCO's evaluation, pycocotools) of the quantized model's detections against
    FP32's as ground truth, both decoded the same way; None where pycocotools is absent or
    FP32 detects nothing."""
    import contextlib
    import io

    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        return {"detection_map50": None}
    truth, preds = decode_detections(ref), decode_detections(got)
    anns, dets = [], []
    for img, (b, _, c) in enumerate(truth):
        for box, cls in zip(b, c):
            w, h = box[2:] - box[:2]
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": int(cls),
                         "bbox": [float(box[0]), float(box[1]), float(w), float(h)],
                         "area": float(w * h), "iscrowd": 0})
    for img, (b, s, c) in enumerate(preds):
        for box, score, cls in zip(b, s, c):
            w, h = box[2:] - box[:2]
            dets.append({"image_id": img, "category_id": int(cls), "score": float(score),
                         "bbox": [float(box[0]), float(box[1]), float(w), float(h)]})
    if not anns:
        return {"detection_map50": None, "fp32_detections": 0}
    cats = sorted({a["category_id"] for a in anns} | {d["category_id"] for d in dets})
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in range(len(truth))], "annotations": anns,
                  "categories": [{"id": c} for c in cats]}
    with contextlib.redirect_stdout(io.StringIO()):   # the agent's stdout is its JSON channel
        gt.createIndex()
        if not dets:
            return {"detection_map50": 0.0, "fp32_detections": len(anns)}
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.iouThrs = np.array([0.5])
        ev.params.maxDets = [1, 10, 100]      # summarize() reads stats[0] at 100
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"detection_map50": float(max(ev.stats[0], 0.0)), "fp32_detections": len(anns)}


def task_figures(kind: str, ref: np.ndarray, got: np.ndarray) -> dict:
    """The task figure for one output of a known kind (higher is better, in [0, 1])."""
    if kind == "detections":
        return detection_map(ref, got)
    if kind == "map":
        return {"map_iou": map_iou(ref, got)}
    if kind == "sequence":
        a, b = ctc_greedy(ref), ctc_greedy(got)
        return {"sequence_agreement": float(np.mean([x == y for x, y in zip(a, b)]))}
    if kind == "tokens":
        return {"token_agreement": float(np.mean(np.all(ref == got, axis=1)))}
    return {}


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def kl_per_sample(ref: np.ndarray, got: np.ndarray, kind: str = "logits") -> np.ndarray:
    """KL(FP32 ‖ got) per sample over class scores (N, C): softmax first for `logits`,
    as they are for `probs`."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    p, q = (_softmax(ref), _softmax(got)) if kind == "logits" else (ref, np.clip(got, 0, None))
    return (p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum(axis=1)


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
    set's arrays (a mapping). Classification figures come from the first output of class
    scores (`kind:<k>`; output 0 where the set names no kinds)."""
    n = len(outputs[0])
    kinds = [str(np.asarray(ev[f"kind:{k}"]).reshape(-1)[0]) if f"kind:{k}" in ev
             else ("logits" if k == 0 else "tensor") for k in range(len(outputs))]
    # classification figures from the first output holding class scores (the headline
    # SQNR and cosine from output 0 where none does)
    c = next((k for k, kind in enumerate(kinds) if kind in SCORES), 0)
    out0 = _dequantized(outputs[c], ev, c)
    res = {"n": int(n), "top1": None, "agreement_fp32": None, "kl": None, "sqnr_db": None,
           "cosine": None, "worst": [], "outputs": [], "kinds": kinds, "task": {},
           "per_sample": {}}
    logits = out0.reshape(n, -1) if out0.ndim >= 2 and kinds[c] in SCORES else None
    pred = logits.argmax(axis=1) if logits is not None and logits.shape[1] > 1 else None
    score = None  # per-sample badness: KL to FP32, else 1 for a wrong label
    if "labels" in ev and pred is not None:
        labels = np.asarray(ev["labels"]).astype(np.int64).ravel()
        res["top1"] = float((pred == labels).mean())
        res["per_sample"]["top1"] = bits(pred == labels)
        score = (pred != labels).astype(np.float64)
    if f"fp32:{c}" in ev:
        ref = np.asarray(ev[f"fp32:{c}"], dtype=np.float64).reshape(n, -1)
        res["sqnr_db"] = sqnr_db(ref, out0.reshape(n, -1))
        res["cosine"] = cosine(ref, out0.reshape(n, -1))
        if pred is not None:
            res["agreement_fp32"] = float((pred == ref.argmax(axis=1)).mean())
            res["per_sample"]["agreement_fp32"] = bits(pred == ref.argmax(axis=1))
            kl = kl_per_sample(ref, logits, kinds[c])
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
        task = task_figures(kinds[k], ref, got)
        res["outputs"].append({"index": k, "kind": kinds[k], "sqnr_db": sqnr_db(ref, got),
                               "cosine": cosine(ref, got), **task})
        for name, value in task.items():
            if name != "fp32_detections":
                res["task"].setdefault(name if name not in res["task"] else f"{name}_{k}",
                                       value)
    if "metric:source" in ev:
        res.update(user_metric(outputs, ev))
    return res


def bits(hits: np.ndarray) -> str:
    """Per-sample hits as a string of 0s and 1s: what pairs two runs of the same evaluation
    set sample by sample (an exact McNemar test on the samples they disagree on)."""
    return "".join("1" if h else "0" for h in np.asarray(hits).ravel())


def _text(a) -> str:
    return str(np.asarray(a).reshape(-1)[0])


def user_metric(outputs: list, ev) -> dict:
    """{"metric": {name: value}} from the user's function the set carries, or
    {"metric_error": one line}: a metric that fails is said, never a crashed run."""
    fn_name = _text(ev["metric:function"])
    refs = [np.asarray(ev[f"fp32:{k}"]) for k in range(len(outputs)) if f"fp32:{k}" in ev]
    labels = np.asarray(ev["labels"]) if "labels" in ev else None
    try:
        scope: dict = {"__name__": "hilq_user_metric"}
        exec(compile(_text(ev["metric:source"]), f"<metric {fn_name}>", "exec"), scope)
        got = scope[fn_name]([np.asarray(o) for o in outputs], refs, labels)
        return {"metric": {str(k): float(v) for k, v in dict(got).items()}}
    except Exception as e:  # noqa: BLE001 — the user's code: its error, in one line
        return {"metric_error": f"{fn_name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                if str(e) else f"{fn_name}: {type(e).__name__}"}
