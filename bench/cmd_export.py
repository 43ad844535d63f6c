"""`hilq export`: write a deployable artifact (ONNX Q/DQ) for a model and variant.

    hilq export --model NAME|pkg.mod:factory|FILE.onnx --variant w8a8 [--data D]
                [--input-shape 1,3,224,224] [--preprocess SPEC] [--calib-data real|distilled|noise]
                [--format onnx-qdq] [--target cpu|tensorrt] [--calib minmax]
                [--granularity channel] [--group-size 128] [--repair R,...]
                [--seed 0] --out DIR [--json OUT]

Prints the file's path, size and sha256 and each layer's precision and expected kernel.
Artifacts are cached in DIR by their settings: a second identical call reuses the file.
"""

from __future__ import annotations

from pathlib import Path

from .cli import add_model_arguments, defaults, model_ref
from .errors import UserError
from .output import write_json

FORMATS = ("onnx-qdq",)


def add_arguments(parser) -> None:
    from hilq.quant.options import ExportOptions
    from hilq.quant.spec import CALIB_DATA, GRANULARITIES

    d = defaults(ExportOptions)
    add_model_arguments(parser)
    parser.add_argument("--variant", required=True,
                        help="fp32, w8a8, w4a8, w4a16, w8a16, ... or config:PATH.json")
    parser.add_argument("--format", default="onnx-qdq", choices=FORMATS,
                        help="artifact format (default onnx-qdq; fp32 variants are plain ONNX)")
    parser.add_argument("--target", default=d["target"], choices=("cpu", "tensorrt"),
                        help="cpu: UINT8 asymmetric activations, ORT's QDQ placement; "
                             "tensorrt: INT8 symmetric activations, narrow-range weights")
    parser.add_argument("--calib", default=d["calib"], help="activation calibration method")
    parser.add_argument("--calib-data", default=d["calib_data"], choices=CALIB_DATA,
                        help="calibration inputs: real (--data, default), distilled (ZeroQ, "
                             "from the BatchNorm statistics), noise")
    parser.add_argument("--granularity", default=d["granularity"], choices=GRANULARITIES,
                        help="weight granularity (group: blocks of --group-size along K)")
    parser.add_argument("--group-size", type=int, default=d["group_size"])
    parser.add_argument("--repair", default="", help="comma-separated PTQ repairs (bias, adaround, ...)")
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--json", metavar="PATH", help="write the artifact's manifest as JSON")


def run(args) -> int:
    from hilq.quant.export import build_artifact
    from hilq.quant.options import ExportOptions

    options = ExportOptions(   # checks itself: one line, exit 2
        target=args.target, calib=args.calib, granularity=args.granularity,
        group_size=args.group_size, seed=args.seed, calib_data=args.calib_data,
        repairs=tuple(r.strip() for r in args.repair.split(",") if r.strip()))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror})") from None
    art = build_artifact(model_ref(args), args.variant, out, options=options)
    m = art.manifest
    print(f"artifact  {art.path}")
    print(f"format    {m.get('format')}  target {m.get('target')}  "
          f"input {m.get('input_name')} {m.get('input_shape')} {m.get('input_dtype')}")
    print(f"size      {m['size_bytes']:,} bytes")
    print(f"sha256    {m['sha256']}")
    layers = m.get("layer_map") or {}
    if layers:
        width = max(len(v["layer"]) for v in layers.values())
        print("layers:")
        for node, v in layers.items():
            print(f"  {v['layer']:<{width}}  {v['precision']:<6}  {v['kernel']:<11}  "
                  f"{v['op']} {node}")
    for note in (m.get("settings") or {}).get("notes") or []:
        print(f"note: {note}")
    write_json(args.json, {"path": art.path, **m})
    return 0
