"""A user's metric as `--metric tests.user_metric:...` names it: fn(outputs, fp32_outputs,
labels) -> {name: value}, higher is better. It runs from its source on the device."""

import numpy as np


def logits_close(outputs, fp32_outputs, labels):
    """Fraction of logits within 0.01 of FP32's, and whether the class matches."""
    got, ref = outputs[-1], fp32_outputs[-1]
    return {"close": float(np.mean(np.abs(got - ref) <= 0.01)),
            "same_class": float(np.mean(got.argmax(1) == ref.argmax(1)))}


def broken(outputs, fp32_outputs, labels):
    raise ValueError("no such thing")
