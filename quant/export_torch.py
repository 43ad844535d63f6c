"""PyTorch artifacts: a `torch.export` program saved with `torch.export.save` (`.pt2`).

- `fp32`: the BN-folded float model, exported.
- `w8a8` (x86 CPU): torchao's PT2E flow with `X86InductorQuantizer`'s default config
  (u8 activations per-tensor affine, s8 weights per-channel symmetric), calibrated on the
  model's calibration data, converted, and exported again. The saved program is the
  *reference* Q/DQ graph (quantize/dequantize around float aten ops); the integer oneDNN
  kernels appear only when the `torch` runtime compiles it with inductor freezing.
- `device="cuda"` (for the `torch-cuda` runtime): the float program, with the variant
  (`fp16`, `bf16`, `w8a8`, `w4a16`) applied by the runtime at load time (weights quantized
  there: no x86-specific ops in the file). The manifest says so (`quantized_at_load`).

The batch dimension is exported dynamic when the model allows it (recorded in the manifest).
torchao is imported lazily: only `w8a8` for CPU needs it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .artifact import Artifact, file_stem
from .spec import SpecError

CPU_VARIANTS = ("fp32", "w8a8")
CUDA_VARIANTS = ("fp32", "fp16", "bf16", "w8a8", "w4a16")
FORMAT = "torch-export"


def _export(model: nn.Module, sample: torch.Tensor) -> tuple[torch.export.ExportedProgram, dict]:
    """Export with a dynamic batch (example batch 2: export specialises batch 1), tracing
    strictly (TorchDynamo) first: strict export names each call of a reused module apart
    (`source_fn_stack`), which PT2E's pattern annotation needs; non-strict export groups the
    two calls of e.g. a shared `self.relu` into one partition and the quantizer fails. Falls
    back to non-strict, then to a static batch of 1; the manifest records which."""
    x = sample[:1].expand(2, *sample.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=4096)
    errors = []
    for strict, dynamic in ((True, True), (False, True), (False, False)):
        try:
            ep = torch.export.export(model, (x if dynamic else sample[:1],), strict=strict,
                                     dynamic_shapes=({0: batch},) if dynamic else None)
            return ep, {"strict_export": strict, "dynamic_batch": dynamic}
        except Exception as e:  # noqa: BLE001 — try the next, more permissive, export
            errors.append(f"{type(e).__name__}: {e}")
    raise RuntimeError("torch.export failed: " + " | ".join(errors))


def quantize_pt2e_x86(model: nn.Module, calib: torch.Tensor, batch_size: int = 32):
    """PT2E W8A8 for x86 inductor: prepare, calibrate, convert. Returns the converted
    GraphModule and how it was exported (strict, dynamic batch)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config())
    ep, how = _export(model, calib)
    prepared = prepare_pt2e(ep.module(), quantizer)
    step = batch_size if how["dynamic_batch"] else 1
    with torch.no_grad():
        for i in range(0, len(calib), step):
            prepared(calib[i: i + step])
    return convert_pt2e(prepared), how


def export_module(model: nn.Module, variant: str, calib: torch.Tensor, path: str | Path,
                  device: str = "cpu") -> dict:
    """Write `model` as a `.pt2` for `variant`; returns the settings for the manifest.
    `calib`: calibration inputs with a batch dimension (used by CPU `w8a8` only)."""
    from .transform import fold_bn

    allowed = CUDA_VARIANTS if device == "cuda" else CPU_VARIANTS
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, not {device!r}")
    if variant not in allowed:
        raise ValueError(f"torch export for {device} supports {', '.join(allowed)}, "
                         f"not {variant!r}")
    model = fold_bn(model.eval())
    settings = {"bn_folded": True, "device": device}
    if device == "cpu" and variant == "w8a8":
        converted, how = quantize_pt2e_x86(model, calib)
        dynamic = how["dynamic_batch"]
        x = calib[:1].expand(2, *calib.shape[1:]).contiguous() if dynamic else calib[:1]
        dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
        ep = torch.export.export(converted, (x,), dynamic_shapes=dyn)
        settings.update(quantizer="torchao X86InductorQuantizer (default config: u8 "
                        "activations per-tensor affine, s8 weights per-channel symmetric)",
                        calib_samples=len(calib), quantized_at_load=False)
    else:
        ep, how = _export(model, calib)
        settings["quantized_at_load"] = variant != "fp32"
    settings.update(how)
    torch.export.save(ep, str(path))
    return settings


def _versions() -> dict:
    out = {"torch": torch.__version__}
    try:
        import torchao

        out["torchao"] = torchao.__version__
    except ImportError:
        out["torchao"] = None
    return out


def build(model: str, variant: str, out_dir: str | Path, seed: int = 0,
          device: str = "cpu", calib_samples: int = 128) -> Artifact:
    """Build the `.pt2` artifact of a named model (see `quant.models.load_model`)."""
    from .models import load_model, name_of

    entry = load_model(model)
    model_ref, model = model, name_of(model)
    torch.manual_seed(seed)
    net = entry.build().eval()
    data = entry.data()
    if data.calib_x is None and variant != "fp32":
        raise SpecError(f"model {model!r} has no data to calibrate the torch {variant} "
                        "artifact on: give --data")
    calib = (data.calib_x if data.calib_x is not None else data.test_x)[:calib_samples].float()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if device == "cpu" else f"-{device}"
    seq = getattr(model_ref, "seq_len", None)     # a sequence-length sweep: one file per length
    suffix += f"-s{seq}" if seq else ""
    path = out_dir / f"{file_stem(model)}-{variant}{suffix}.pt2"
    settings = export_module(net, variant, calib, path, device=device)
    settings.update(seed=seed)
    runtime = "torch-cuda" if device == "cuda" else "torch"
    return Artifact.create(path, model=model, variant=variant, target=runtime,
                           input_shape=[1, *entry.input_shape], input_dtype="float32",
                           format=FORMAT, runtimes=[runtime], versions=_versions(),
                           settings=settings,
                           **_evaluation(net, path, data, model, variant, device, settings,
                                         (entry.output_kinds or (None,))[0]))


def _evaluation(net: nn.Module, path: Path, data, model: str, variant: str, device: str,
                settings: dict, kind: str | None = None) -> dict:
    """The evaluation set for accuracy on the device, keyed by the program's own input name.
    The simulated side is the saved program run eagerly here (the reference Q/DQ graph for
    CPU `w8a8`: fake-quant arithmetic in float); CUDA variants quantized at load have no
    host-side twin, so they get the set and the device figure but no simulated one."""
    from .assembly import evaluation_fields

    ep = torch.export.load(str(path))
    name = ep.graph_signature.user_inputs[0]
    twin = None
    if device == "cpu" or variant == "fp32":
        twin = _Program(ep.module(), None if settings.get("dynamic_batch") else 1)
    return evaluation_fields(net, twin, data, path.parent, name, model, kind=kind)


class _Program(nn.Module):
    """An exported program as a module the evaluation helpers can call: `eval()` stops here
    (exported programs refuse it; they have no train mode to leave), and a static-batch
    program gets its inputs `step` at a time."""

    def __init__(self, program, step: int | None):
        super().__init__()
        self._run = (program,)          # a tuple: not a submodule, so eval() does not reach it
        self.step = step

    def train(self, mode: bool = True):
        return self

    def forward(self, x):
        step = self.step or len(x)
        return torch.cat([self._run[0](x[i: i + step]) for i in range(0, len(x), step)])
