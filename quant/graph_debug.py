"""`hilq debug` for artifacts of the ONNX route: the per-layer tensors taken from graphs.

The PyTorch route compares the engine with hilq's fake-quant model; a file quantized on its
own graph has none, so the same `quant.debug.Capture` is filled from ONNX Runtime runs with
every optimisation off (Q/DQ executed as written, the route's simulation):

- `float_in` / `float_out`: each layer node's input and output in the normalised float graph;
- `chain`: the layer node's output in the artifact itself (the quantized layers before it
  feeding it), before its output QuantizeLinear;
- `own`: the same node's output in a graph where that layer alone is quantized, read on the
  float graph's input: the error the layer makes on its own.

From there `quant.debug` and the engine's debug copy work as for any artifact.
"""

from __future__ import annotations

import numpy as np
import torch

from .debug import Capture


def _values(proto, inputs, feeds: dict, fixed: dict, tensors: list[str]) -> dict:
    from .graph_route import with_outputs
    from .onnx_run import run, session

    got = run(session(with_outputs(proto, tensors, keep=False)), inputs, feeds, fixed)
    return dict(zip(tensors, got))


def capture(artifact, entry, feeds, n: int, progress=lambda s: None) -> Capture:
    """The tensors of `n` test samples for every layer the artifact quantized."""
    import onnx

    from . import graph_route as gr
    from .spec import BitConfig

    test = {k: v[:n] for k, v in feeds.test.items()}
    proto = gr.normalise(entry.onnx_path)
    config = BitConfig.from_dict(artifact.manifest.get("bit_config") or {})
    qlayers = gr.calibrated(proto, config, entry.inputs, feeds.all_calib(), feeds.fixed)
    ranges = gr.Ranges(proto, entry.inputs, feeds.all_calib(), feeds.fixed)
    nodes = {node.name: node for node in proto.graph.node if node.name in qlayers}
    f = _values(proto, entry.inputs, test, feeds.fixed,
                sorted({t for nd in nodes.values() for t in (nd.input[0], nd.output[0])}))
    deployed = onnx.load(artifact.path)
    out_of = {nd.name: nd.output[0] for nd in deployed.graph.node if nd.name in nodes}
    chain = _values(deployed, entry.inputs, test, feeds.fixed, sorted(set(out_of.values())))
    own = {}
    for i, name in enumerate(nodes):
        progress(f"own error {i + 1}/{len(nodes)}: {name}")
        alone, _ = gr.with_qdq(proto, {name: qlayers[name]}, ranges)
        y = next(nd.output[0] for nd in alone.graph.node if nd.name == name)
        own[name] = _values(alone, entry.inputs, test, feeds.fixed, [y])[y]
    logits = _values(proto, entry.inputs, test, feeds.fixed,
                     [o.name for o in proto.graph.output])
    first = entry.inputs[0].name
    x = torch.from_numpy(test[first]) if first in test else torch.zeros(0)
    return Capture(x, {n: f[nd.input[0]] for n, nd in nodes.items()},
                   {n: f[nd.output[0]] for n, nd in nodes.items()},
                   {n: chain[out_of[n]] for n in nodes if n in out_of}, own,
                   [np.asarray(v) for v in logits.values()])


def evalset_arrays(cap: Capture, taps, entry, feeds, n: int, labels) -> dict:
    """The debug copy's evaluation set (`quant.debug.evalset_arrays`) with every input of
    the file, fixed ones whole."""
    from .debug import evalset_arrays as arrays

    out = arrays(cap, taps, entry.inputs[0].name, len(cap.logits), labels)
    out.update({f"input:{k}": v[:n] for k, v in feeds.test.items()})
    out.update({f"fixed:{k}": v for k, v in feeds.fixed.items()})
    return out


def debug_input_shapes(debug_artifact, arrays: dict):
    """The debug copy's manifest with a static shape for each `debug_in:` input (its float
    input, one sample): the engines fix a dynamic height and width from there."""
    from pathlib import Path

    from .artifact import Artifact

    m = dict(debug_artifact.manifest)
    shapes = dict(m.get("input_shapes") or {})
    for k, v in arrays.items():
        if k.startswith("input:debug_in:"):
            shapes[k[len("input:"):]] = [1, *v.shape[1:]]
    keep = {k: v for k, v in m.items() if k not in ("file", "sha256", "size_bytes")}
    return Artifact.create(Path(debug_artifact.path), **{**keep, "input_shapes": shapes})
