"""What a device run is asked to do (`Protocol`) and what comes back (`Measurement`).

Both are plain dataclasses that round-trip through JSON: the protocol travels to the agent
as a file, the agent's JSON becomes a `Measurement`, and the store keeps every field.
Timing rules live in the protocol, owned by the harness, never by model or runtime code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

STATUSES = ("ok", "degraded", "failed")
# Typed failures, stored like any other result (TVM's RPC runner does the same).
FAILURES = ("unreachable", "auth", "hostkey", "timeout", "agent_crash", "runtime_error",
            "wrong_answer", "unsupported", "busy", "bad_input")


@dataclass(frozen=True)
class Protocol:
    """Warm-up by count and time; measure until BOTH min_iters and min_duration_s are met."""

    warmup_iters: int = 10
    warmup_s: float = 0.5
    min_iters: int = 50
    min_duration_s: float = 2.0
    max_iters: int = 100_000
    max_duration_s: float = 120.0
    batch: int = 1
    # the sequence length the artifact was built for (`hilq bench --seq-len`; 0 = the model's
    # own): static in the artifact, so the agent does not use it; recorded beside the batch so
    # every measurement names its shape, and the engine's resolved shapes are in its `timing`
    seq_len: int = 0
    threads: int = 0               # 0 = the runtime's default (all cores); recorded either way
    affinity: tuple[int, ...] = ()  # CPU ids to pin the agent to; empty = no pinning
    mode: str = "latency"          # latency (one request at a time) | throughput (offline, batch)
    power: str = "none"            # nvml | rapl | tegrastats | command:<cmd> | none
    power_interval_s: float = 0.05
    idle_s: float = 1.0            # idle baseline before timing, when a meter is on
    seed: int = 0
    busy_load: float = 0.5         # 1-min load average per core above which a run is flagged busy
    profile_iters: int = 0         # >0: a profiled run (warm-up, then this many inferences with
    #                                the engine's profiler on); no latency statistics from it
    # an MLPerf scenario run through LoadGen after hilq's own timing, in the same agent
    # process (devices/scenario.py): single-stream | multi-stream | server | offline; "" = none
    scenario: str = ""
    target_qps: float = 0.0        # server: arrival rate (0: half the measured rate); offline:
    #                                expected rate (0: 1.5× the measured rate)
    target_latency_ms: float = 0.0  # server: latency bound (0: LoadGen's default)
    samples_per_query: int = 8     # multi-stream
    min_queries: int = 0           # 0: what LoadGen's early stopping needs for the scenario
    # the engine's own settings, checked against the runtime's OPTIONS on the host
    # (devices/runtimes: --runtime-option key=value); recorded with every measurement
    runtime_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["affinity"] = list(self.affinity)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Protocol:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown protocol key(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        if "affinity" in d:
            d["affinity"] = tuple(d["affinity"])
        return cls(**d)


@dataclass
class Measurement:
    """One variant on one device and runtime. `latency_ms` holds named statistics
    (mean, std, min, max, p50, p90, p95, p99, iqr, ci95_p50, n, outliers, tail flags);
    `samples_ms` the raw samples they were derived from. A profiled run (`profile_iters` > 0)
    fills `profile` instead: {"iters", "nodes": [{name, op, ms, sources, exec, layer}],
    "layer_ms", "other_ms", "other_by_op", "total_ms", ...} (see devices/agent.py)."""

    model: str
    variant: str
    device: str
    runtime: str
    status: str = "ok"
    reason: str | None = None
    failure: str | None = None             # one of FAILURES when status == failed
    latency_ms: dict = field(default_factory=dict)
    samples_ms: list[float] = field(default_factory=list)
    device_latency_ms: dict | None = None  # GPU: CUDA-event device time, next to host wall time
    throughput: float | None = None        # samples per second
    energy_j_per_inference: float | None = None
    power: dict = field(default_factory=dict)     # avg_w, idle_w, meter, trace, reason
    kernels: dict = field(default_factory=dict)   # {"integer": [...], "float": [...]} from the engine
    facts: dict = field(default_factory=dict)     # device facts: OS, CPU, flags, GPU, versions
    protocol: dict = field(default_factory=dict)
    load: dict = field(default_factory=dict)      # load before/after, busy flag
    artifact_sha256: str | None = None
    outputs_check: dict | None = None      # agreement with the reference outputs, if given
    harness_overhead_ms: float | None = None  # what the timing loop adds to every sample
    timing: dict = field(default_factory=dict)    # warm-up iterations, wall time, caps, mode
    rounds: dict = field(default_factory=dict)    # spread of p50 across alternating rounds
    profile: dict = field(default_factory=dict)   # profiled run: per-engine-node and per-layer ms
    accuracy: dict = field(default_factory=dict)  # on the device, over an evaluation set (agent
    #   --eval): n, top1, agreement_fp32, kl, sqnr_db, cosine, worst, outputs, eval_sha256; the
    #   host adds simulated_top1 / simulated_agreement (the fake-quant model's, from the manifest)
    scenario: dict = field(default_factory=dict)  # LoadGen's result (devices/scenario.py):
    #   scenario, valid, result, reasons, metric, value, latency_ms, qps, early_stopping, summary
    memory: dict = field(default_factory=dict)    # resident MiB of the agent (devices/memory.py):
    #   rss_start, load_rss/peak, setup_*, timed_rss/peak (the timed window's own peak), engine

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Measurement:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def failed(cls, model: str, variant: str, device: str, runtime: str, failure: str,
               reason: str, **kw) -> Measurement:
        assert failure in FAILURES, failure
        return cls(model, variant, device, runtime, status="failed", failure=failure,
                   reason=reason, **kw)
