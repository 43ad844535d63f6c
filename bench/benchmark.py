"""The bench verb: variants of one model (or prebuilt artifacts) measured on devices in
alternating rounds, over a batch and sequence-length sweep, each measurement stored as it
arrives. `BenchOptions` checks itself, so a bad setting is one line before any device opens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from hilq.quant.spec import CALIB_DATA, SpecError

from hilq.measurement import Measurement, Protocol

from .runner import bench_variants


@dataclass(frozen=True)
class BenchOptions:
    """What `bench` measures and how: `variants` (names, or prebuilt `Artifact`s), on each
    of `devices` (inventory names) with `runtime`, `rounds` alternating rounds of
    `protocol`, once per `batches` × `seq_lens` point (None: the model's own length);
    `reference`: an .npz of inputs/outputs the answers are checked against; `db`: the
    store (None: $HILQ_DB or results/hilq.sqlite), not used with `store` False."""

    variants: tuple = ("fp32",)
    devices: tuple[str, ...] = ("local",)
    runtime: str = "ort"
    rounds: int = 3
    batches: tuple[int, ...] = (1,)
    seq_lens: tuple = (None,)
    reference: str | None = None
    calib_data: str = "real"             # the INT8 variants' calibration inputs
    protocol: Protocol = field(default_factory=Protocol)
    inventory: str | None = None
    db: str | None = None
    store: bool = True

    def __post_init__(self):
        for name in ("variants", "devices", "batches", "seq_lens"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.rounds < 1:
            raise SpecError(f"rounds {self.rounds}: must be at least 1")
        if not self.variants or not self.devices:
            raise SpecError("give at least one variant and one device")
        if self.calib_data not in CALIB_DATA:
            raise SpecError(f"unknown calib_data {self.calib_data!r} "
                            f"(use {', '.join(CALIB_DATA)})")
        for name in ("batches", "seq_lens"):
            sizes = [n for n in getattr(self, name) if n is not None]
            if min(sizes, default=1) < 1 or len(set(getattr(self, name))) != len(getattr(self, name)):
                raise SpecError(f"{name} {getattr(self, name)}: expected distinct positive sizes")

    @property
    def agent_runs(self) -> int:
        """How many agent runs the bench plans (a progress bar's total)."""
        return (len(self.devices) * len(self.batches) * len(self.seq_lens) * len(self.variants)
                * self.rounds)


@dataclass
class BenchResult:
    run_id: str | None                   # None when not stored
    store: str | None
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.measurements)


def sweep_label(batch: int, seq_len: int | None, batches, lengths) -> str:
    """The suffix naming one point of a shape sweep: `@b8`, `@s64`, `@b8s64`; none when
    nothing is swept. One spelling for the store, reports and --json."""
    tag = (f"b{batch}" if len(batches) > 1 else "") + (f"s{seq_len}" if len(lengths) > 1 else "")
    return "@" + tag if tag else ""


def bench(model, options: BenchOptions, say: Callable[[str], None] = print) -> BenchResult:
    """Measure `model` (anything the model door takes; "" with prebuilt artifacts) as
    `options` say. Every device is opened (and so checked) before any runs; the run is
    stored as it goes and marked `interrupted` on Ctrl-C or SIGTERM."""
    from hilq.devices import inventory

    o = options
    if model:                    # a bad model or data door fails before any device opens
        from hilq.quant.models import load_model

        for n in o.seq_lens:
            load_model(replace(model, seq_len=n) if n is not None else model)
    devs = inventory.load(o.inventory)
    devices = [inventory.open_device(n, devs) for n in o.devices]
    store, run_id = _begin(model, o)
    res = BenchResult(run_id, store.name if store is not None else None)
    try:
        for device in devices:
            for n, b in ((n, b) for n in o.seq_lens for b in o.batches):
                ref = replace(model, seq_len=n) if n is not None else model
                res.measurements += bench_variants(
                    ref, list(o.variants), device, o.runtime,
                    replace(o.protocol, batch=b, seq_len=n or 0), rounds=o.rounds,
                    reference=o.reference, store=store, run_id=run_id,
                    calib_data=o.calib_data, label=sweep_label(b, n, o.batches, o.seq_lens),
                    on_result=say)
        if store is not None:
            store.finish_run(run_id, "ok" if res.ok else "failed")
            say(f"stored as run {run_id} in {store.name}")
    except KeyboardInterrupt:      # Ctrl-C, SIGTERM: what is stored stays; the run says so
        if store is not None:
            store.finish_run(run_id, "interrupted")
        raise
    finally:
        for device in devices:
            device.close()
        if store is not None:
            store.close()
    return res


def _begin(model, o: BenchOptions):
    """(store, run id) of this bench, or (None, None) when not stored."""
    if not o.store:
        return None, None
    from .store import open_store

    store = open_store(o.db)
    names = [v if isinstance(v, str) else v.manifest.get("variant", "?") for v in o.variants]
    run_id = store.begin_run({"command": "bench", "model": getattr(model, "name", model) or None,
                              "variants": ",".join(names), "devices": list(o.devices),
                              "runtime": o.runtime, "protocol": o.protocol.to_dict(),
                              "batch": list(o.batches),
                              **({"seq_len": list(o.seq_lens)} if o.seq_lens != (None,) else {})},
                             resume=False)
    return store, run_id
