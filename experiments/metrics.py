"""User metrics for the third-party files, as `--metric experiments.metrics:NAME` takes them:
fn(outputs, fp32_outputs, labels) -> {name: value}, higher is better. Each runs on the
device from this file's source, so it imports nothing but numpy."""

import numpy as np


def vad_decisions(outputs, fp32_outputs, labels):
    """Silero VAD: the share of frames whose speech/no-speech decision (probability > 0.5,
    the package's default threshold) is the same as FP32's."""
    got, ref = np.ravel(outputs[0]), np.ravel(fp32_outputs[0])
    return {"vad_agreement": float(np.mean((got > 0.5) == (ref > 0.5)))}


def top_labels(outputs, fp32_outputs, labels):
    """A classifier's top-3 set: the share of samples whose three best classes are FP32's."""
    got, ref = np.asarray(outputs[0]), np.asarray(fp32_outputs[0])
    g = np.sort(np.argsort(-got, axis=1)[:, :3], axis=1)
    r = np.sort(np.argsort(-ref, axis=1)[:, :3], axis=1)
    return {"top3_same": float(np.mean(np.all(g == r, axis=1)))}
