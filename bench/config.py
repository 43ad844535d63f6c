"""The nightly/search config: TOML (stdlib `tomllib`) validated at the boundary.

Unknown keys are errors naming the key, so a typo never silently changes what is measured.
Budgets are absolute (`latency_ms = 4.2`) or relative to the fastest and slowest uniform
configurations measured on that device (`latency_ms = "50%"` = halfway between them), which
keeps one config meaningful across machines.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from hilq.quant.spec import SpecError, parse_variant

from hilq.measurement import Protocol

# shipped in the wheel; configs/nightly-local.toml is a link to it, one file
DEFAULT_CONFIG = Path(__file__).resolve().parent / "nightly-local.toml"


class ConfigError(SpecError):
    """A config that cannot be run as written; the message names the key."""


class _ModelDoor:
    """The model door's keys (`quant.models.ModelRef`), shared by [[bench]] and [[search]]."""

    @property
    def ref(self):
        from hilq.quant.models import ModelRef

        return ModelRef(self.model, data=self.data, input_shape=self.input_shape,
                        input_shapes=self.input_shapes, preprocess=self.preprocess,
                        route=self.route, metric=self.metric)


@dataclass(frozen=True)
class Bench(_ModelDoor):
    """A [[bench]] entry: one model's variants, each built, measured on every device and
    runtime named, and stored.

    The comments beside the fields are the keys' descriptions in `hilq config reference`."""

    model: str                    # built-in name, package.module:factory, or path/to/model.onnx
    variants: tuple[str, ...]     # fp32, fp16, bf16, wXaY (w8a8, w4a8, w4a16), config:PATH.json
    devices: tuple[str, ...] = ("local",)   # device names of the inventory
    runtimes: tuple[str, ...] = ("ort",)    # runtimes, as `hilq runtimes` lists them
    accuracy: bool = True         # measure accuracy on the device (false: latency only)
    data: str | None = None       # image folder, .npy/.npz, or package.module:factory
    # batch-first shape for a model without data or an ONNX file with dynamic dimensions:
    # [1, 3, 224, 224], or an ONNX file's inputs by name ({x = [1, 3, 48, 192]})
    input_shape: tuple[int, ...] | None = None
    # an ONNX file's inputs by name (input_shape = {x = [1, 3, 48, 192], state = [2, 1, 128]})
    input_shapes: tuple | None = None
    # image preprocessing, torchvision's names: "imagenet", or
    # "resize=256,crop=224,mean=0.485/0.456/0.406" (or the same as a table)
    preprocess: str | None = None
    route: str = "auto"           # an ONNX file's integer variants: auto | torch | onnx
    metric: str | None = None     # module:function, your figure of merit (higher is better)
    calib_data: str = "real"      # real | distilled | noise, for the INT8 variants
    # runtime -> its engine settings, e.g. {"openvino": {"hint": "throughput"}} (checked
    # against the runtime's declared OPTIONS)
    runtime_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Search(_ModelDoor):
    """A [[search]] entry: the model door, where to search, and the search's own options
    (`bench.search.SearchOptions`, whose keys the table takes directly, defaults included:
    the command line and the config build the same object)."""

    model: str
    options: object               # bench.search.SearchOptions, checked when built
    device: str = "local"         # the device searched on, a name of the inventory
    runtime: str = "ort"          # the runtime searched on
    data: str | None = None
    input_shape: tuple[int, ...] | None = None
    input_shapes: tuple | None = None
    preprocess: str | None = None
    route: str = "auto"
    metric: str | None = None

    @property
    def calib_data(self) -> str:
        return self.options.calib_data


# A search's options that the night sets for all of them, not each [[search]] table.
NIGHT_WIDE = ("rounds", "seed")

# The config reference's words for keys whose dataclass (hilq.measurement.Protocol,
# bench.search.SearchOptions) has no comment beside them; every other key is described by
# the comment beside its field (`hilq config reference`).
NOTES = {
    "protocol": {
        "warmup_iters": "warm-up inferences before timing: at least this many, and warmup_s",
        "warmup_s": "warm-up before timing (s): at least this long, and warmup_iters",
        "min_iters": "timed inferences: at least this many, and min_duration_s",
        "min_duration_s": "timing (s): at least this long, and min_iters",
        "max_iters": "timing stops at this many inferences (the run is marked capped)",
        "max_duration_s": "warm-up and timing each stop after this long (s), marked capped",
        "batch": "inputs per inference",
        "power_interval_s": "the power meter's sampling interval (s)",
        "seed": "seeds the inputs the agent times",
    },
    "search": {
        "budgets": 'latency_ms = 4.2 (ms) or "50%" (that share of the way from the measured '
                   "all-INT8 to the all-float latency); size_bits may join it",
        "max_drop": "instead of a latency budget: the fastest configuration losing at most "
                    "this much of drop_metric against float",
        "min_agreement": "instead of a latency budget: the fastest configuration agreeing with "
                         "float's predictions on at least this fraction of the test inputs",
        "distill_iters": 'ZeroQ iterations with calib_data = "distilled"',
        "max_iters": "re-measure/refit iterations of the closed loop",
    },
}


@dataclass(frozen=True)
class Config:
    """The top level of a nightly config: the store, the regression rule, where it runs."""

    name: str = "nightly"         # the night's name, in its runs and reports
    seed: int = 0                 # seeds calibration and quantization; recorded with the run
    db: str = "results/hilq.sqlite"   # results store: a SQLite path or a database URL
    reports: str = "reports"      # folder for the Markdown + HTML reports
    inventory: str | None = None  # devices.toml naming the devices (`local` needs none)
    rounds: int = 2               # alternating rounds per variant, each a fresh agent process
    # relative change that, with a significant Mann-Whitney U, is a regression
    regression_threshold: float = 0.05
    lookback: int = 10            # nights of history for the z-score
    # adaptive rounds: add rounds to a series until its minimum detectable effect is at most
    # `detect` (bench.regress), within `detect_budget_s` of extra timing per device and
    # night (shared by its series, in config order) and `max_rounds`
    detect: float | None = None
    detect_budget_s: float = 240.0   # extra timing per device and night for `detect`
    max_rounds: int = 12          # most rounds a series gets from `detect`
    protocol: Protocol = Protocol()
    # where the work runs: "thread" (this process, a thread per device) or "ray" (a Ray
    # cluster at `ray_address`, each device an exclusive resource on its node: bench/farm.py)
    engine: str = "thread"
    ray_address: str | None = None   # engine = "ray": the cluster to join (unset: a local one)
    bench: tuple[Bench, ...] = ()
    search: tuple[Search, ...] = ()
    source: str = ""

    @property
    def hash(self) -> str:
        """Identity of what is measured: the same config resumes the same unfinished run."""
        d = asdict(self)
        for how in ("source", "engine", "ray_address"):   # where it runs is not what it measures
            d.pop(how)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


def _check_keys(where: str, table: dict, allowed) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


_SHAPE = {"type": "array", "items": {"type": "integer"}}   # [1, 3, 224, 224]
# keys a table may write in a shape other than its field's (normalised by `_door`): the
# shapes TOML may give them, as JSON Schema (`hilq config schema`); None: not a key
_RESHAPED = {
    "input_shape": {"anyOf": [
        _SHAPE, {"type": "string"}, {"type": "array", "items": {"type": "string"}},
        {"type": "object", "additionalProperties": {"anyOf": [_SHAPE, {"type": "string"}]}}]},
    "preprocess": {"anyOf": [{"type": "string"}, {"type": "object"}]},
    "input_shapes": None, "source": None,
}


def _check_types(where: str, table: dict, cls) -> None:
    """Each key of `table` against its field's type in `cls`, strictly (pydantic, as TOML
    parsed it: `rounds = "2"` is not an integer, `accuracy = "no"` is not a boolean): one
    line naming the key, the type expected and the value given."""
    import typing

    from pydantic import ConfigDict, ValidationError, create_model

    hints = typing.get_type_hints(cls)
    given = {k: v for k, v in table.items()
             if k in hints and k not in _RESHAPED and hints[k] is not object}
    model = create_model(f"{cls.__name__}Table", __config__=ConfigDict(strict=True),
                         **{k: (hints[k], None) for k in given})
    try:
        model.model_validate_json(json.dumps(given, default=str))
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(map(str, err["loc"]))
        raise ConfigError(f"{where}.{key}: {err['msg'].replace('Input should be', 'expected')}"
                          f", got {err['input']!r}") from None


def _keys(dc, skip=()) -> dict[str, type]:
    """The keys a config entry may use, in field order -> `dc`: the dataclass's fields, but
    `input_shapes`, which `input_shape = {name = [...]}` fills."""
    return {f.name: dc for f in fields(dc) if f.name not in {"input_shapes", *skip}}


# the tables nested in a config, beside its top-level keys
_TABLES = ("protocol", "bench", "search")


def table_keys() -> dict[str, dict[str, type]]:
    """Each table's keys -> the dataclass whose field types it: what `parse` accepts and what
    `bench.config_schema` describes, defined once for both."""
    from .search import SearchOptions

    return {"config": _keys(Config, skip=(*_TABLES, "source")),
            "protocol": _keys(Protocol),
            "bench": _keys(Bench),
            "search": {**_keys(Search, skip=("options",)),
                       **_keys(SearchOptions, skip=NIGHT_WIDE)}}


def _tuple(where: str, v) -> tuple:
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, list):
        raise ConfigError(f"{where}: expected a list")
    return tuple(v)


def _budget(where: str, key: str, v):
    from .loop import parse_budget

    try:
        return parse_budget(key, v)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _door(where: str, d: dict, base: Path) -> dict:
    """The model-door keys of one entry, paths made relative to the config file."""
    from hilq.quant.models import parse_shapes

    out = {}
    model = d["model"]
    if str(model).endswith(".onnx") and not Path(model).is_absolute():
        out["model"] = str(base / model)
    data = d.get("data")
    if data is not None:
        if not isinstance(data, str):
            raise ConfigError(f"{where}.data: expected a path or package.module:factory")
        if ":" not in data and not Path(data).is_absolute():
            out["data"] = str(base / data)
    if d.get("input_shape") is not None:
        try:
            out["input_shape"], out["input_shapes"] = parse_shapes(d["input_shape"])
        except SpecError as e:
            raise ConfigError(f"{where}.input_shape: {e}") from None
    pre = d.get("preprocess")
    if isinstance(pre, dict):
        out["preprocess"] = ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}"
                                     for k, v in pre.items())
    if d.get("calib_data", "real") not in ("real", "distilled", "noise"):
        raise ConfigError(f"{where}.calib_data: use 'real', 'distilled' or 'noise'")
    if d.get("route", "auto") not in ("auto", "torch", "onnx"):
        raise ConfigError(f"{where}.route: use 'auto', 'torch' or 'onnx'")
    if d.get("metric") is not None and (not isinstance(d["metric"], str) or ":" not in d["metric"]):
        raise ConfigError(f"{where}.metric: expected 'package.module:function'")
    return out


def _runtime_options(where: str, b: dict, runtimes: tuple[str, ...]) -> dict:
    from hilq.devices.runtimes import check_options

    given = b.get("runtime_options", {})
    if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
        raise ConfigError(f"{where}.runtime_options: a table per runtime, e.g. "
                          "runtime_options = {{ openvino = {{ hint = \"throughput\" }} }}")
    out = {}
    for runtime, opts in given.items():
        if runtime not in runtimes:
            raise ConfigError(f"{where}.runtime_options.{runtime}: not one of this entry's "
                              f"runtimes ({', '.join(runtimes)})")
        try:
            out[runtime] = check_options(runtime, opts)
        except ValueError as e:
            raise ConfigError(f"{where}.runtime_options.{runtime}: {e}") from None
    return out


def _search(where: str, s: dict, base: Path, night: dict) -> Search:
    """A [[search]] table -> `Search`, its options checked by `SearchOptions` itself."""
    from .search import SearchOptions

    by = table_keys()["search"]
    own = {k for k, cls in by.items() if cls is SearchOptions}
    door = set(by) - own
    _check_keys(where, s, own | door)
    _check_types(where, {k: v for k, v in s.items() if k in own}, SearchOptions)
    _check_types(where, {k: v for k, v in s.items() if k in door}, Search)
    if "model" not in s:
        raise ConfigError(f"{where}: needs 'model'")
    budgets = {k: _budget(f"{where}.budgets", k, v) for k, v in s.get("budgets", {}).items()}
    try:
        options = SearchOptions(**{k: s[k] for k in own - {'budgets'} if k in s}, budgets=budgets,
                                **{k: night.get(k, getattr(Config, k)) for k in NIGHT_WIDE})
    except (SpecError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    fields_ = {k: s[k] for k in door if k in s}
    return Search(**{**fields_, **_door(where, s, base)}, options=options)


def parse(d: dict, source: str = "") -> Config:
    keys = table_keys()
    top = set(keys["config"])
    base = Path(source).resolve().parent if source else Path.cwd()
    _check_keys("config", d, top | set(_TABLES))
    _check_types("config", {k: v for k, v in d.items() if k in top}, Config)
    kw = {k: d[k] for k in top if k in d}
    try:
        proto = d.get("protocol", {})
        _check_keys("protocol", proto, keys["protocol"])
        _check_types("protocol", proto, Protocol)
        kw["protocol"] = Protocol.from_dict(proto)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"protocol: {e}") from None
    benches = []
    for i, b in enumerate(d.get("bench", [])):
        where = f"bench[{i}]"
        _check_keys(where, b, keys["bench"])
        _check_types(where, b, Bench)
        if "model" not in b or "variants" not in b:
            raise ConfigError(f"{where}: needs 'model' and 'variants'")
        variants = _tuple(f"{where}.variants", b["variants"])
        for v in variants:
            parse_variant(v)
        door = {k: b[k] for k in ("data", "input_shape", "preprocess", "calib_data", "route",
                                  "metric") if k in b}
        runtimes = _tuple(f"{where}.runtimes", b.get("runtimes", ["ort"]))
        benches.append(Bench(**{"model": b["model"], **door, **_door(where, b, base)},
                             variants=variants,
                             devices=_tuple(f"{where}.devices", b.get("devices", ["local"])),
                             runtimes=runtimes, accuracy=bool(b.get("accuracy", True)),
                             runtime_options=_runtime_options(where, b, runtimes)))
    searches = [_search(f"search[{i}]", s, base, kw)
                for i, s in enumerate(d.get("search", []))]
    cfg_detect = kw.get("detect")
    if cfg_detect is not None:
        thr = kw.get("regression_threshold", 0.05)
        if not isinstance(cfg_detect, (int, float)) or cfg_detect <= thr:
            raise ConfigError(f"detect = {cfg_detect!r}: the smallest change to detect must "
                              f"exceed regression_threshold ({thr}); no round count sees less")
    if kw.get("engine", "thread") not in ("thread", "ray"):
        raise ConfigError(f"engine = {kw['engine']!r}: use 'thread' or 'ray'")
    if not benches and not searches:
        raise ConfigError("config has no [[bench]] and no [[search]] entries: nothing to run")
    return Config(**kw, bench=tuple(benches), search=tuple(searches), source=source)


def load(path: str | Path | None = None) -> Config:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return parse(d, source=str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
