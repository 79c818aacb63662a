"""Job configuration: frozen dataclasses, loading from TOML/YAML with CLI overrides, validation, fingerprint.

Settings are grouped by the stage that uses them. Precedence: defaults < config file < command line.
Unknown keys and bad values raise `ConfigError` naming the key; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import sys
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from .errors import ConfigError
from .views import DEFAULT_VIEWS, parse_views

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FORMAT_VERSION = "1.1"  # of the files written (CHANGELOG.md)
# The format version inside the fingerprint stays 1.0: what 1.1 changed is in the output settings on its own
# terms (the `var_input` layout, only when var_input is written; `views`, only when not the default), so a
# codes-only OUT keeps its fingerprint while an OUT of 1.0 var_input files is not mixed with 1.1 ones.
FINGERPRINT_FORMAT_VERSION = "1.0"
PRECISIONS = ("exact", "tf32", "bf16")
DECODERS = ("pil", "device")
VAR_INPUT_DTYPES = ("float16", "float32")
DEVICES = ("auto", "cpu", "cuda")

# glibc returns big freed blocks (a batch's activations, 100+ MB) to the kernel at once, so every batch on a CPU
# page-faults them in again: about half of a CPU encoder's time (benchmarks/README.md). Keeping them in the heap
# roughly doubles its throughput; RSS then stays at its high-water mark, which is bounded per actor anyway.
CPU_ALLOCATOR_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
}


@dataclass(frozen=True)
class ModelConfig:
    """Which tokenizer, which weights, and how numerically strict to be."""

    preset: str = "var256"
    checkpoint: str | None = None  # local path or fsspec URL of a VAR-format state dict
    random_weights: bool = False  # explicit opt-in to random init (smoke tests, demos); never implicit
    precision: str = "exact"
    channels_last: bool = False  # NHWC convolutions: faster on tensor cores, not bit-identical
    compile: bool = False  # torch.compile the encoder convolutions (one compile per replica)
    device: str = "auto"


@dataclass(frozen=True)
class EncodeConfig:
    """What each sample becomes and how samples are batched."""

    batch_size: int = 16
    var_input: bool = True
    var_input_dtype: str = "float16"
    max_image_pixels: int = 89_478_485  # PIL's own decompression-bomb threshold
    decode_threads: int = 0  # 0: one per CPU given to the replica
    decode: str = "pil"  # "device": JPEGs decoded and resized on the GPU (nvJPEG); not VAR-exact
    rows_per_group: int = 512  # Parquet row group size; bounds writer memory
    # Augmented views, one row each (vqpipe/views.py); stored expanded, in canonical order. Not `center` alone:
    # the data files get a `view` column.
    views: tuple[str, ...] = DEFAULT_VIEWS


@dataclass(frozen=True)
class RunConfig:
    """How the job is distributed, retried and judged."""

    address: str | None = None  # Ray address; None: RAY_ADDRESS, a Ray job's cluster, or a local cluster
    replicas: int = 0  # 0: one per GPU in the cluster, or one on a CPU-only cluster
    cpus_per_replica: float | None = None  # None: a GPU node's CPUs shared by its replicas (decode threads)
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else 0
    in_flight_per_replica: int = 2  # shards queued per actor so the next one streams while one encodes
    max_attempts: int = 3
    retry_backoff_s: float = 2.0
    speculative: bool = True  # re-issue the slowest tail shards to idle actors
    max_error_rate: float = 0.1  # a shard with a larger fraction of bad samples fails
    limit_shards: int | None = None
    reprocess_changed: bool = False  # redo done shards whose input changed since (size/mtime/ETag)
    allow_config_change: bool = False  # let a rerun into OUT use a different fingerprint
    allow_unterminated_tar: bool = False  # accept tars without an end-of-archive marker (cut copies too)
    progress_interval_s: float = 10.0
    # The run lease on OUT (docs/reliability.md): a holder silent this long is taken for gone; a second run
    # waits this long for a live holder to finish, then refuses (0: refuse at once).
    lease_ttl_s: float = 120.0
    wait_for_lease_s: float = 0.0
    placement_timeout_s: float = 900.0  # give up when no replica can be placed (autoscaling may take minutes)
    stop_grace_s: float = 20.0  # after SIGTERM/SIGINT: how long running shards may take to commit
    # CPU replicas keep freed activation memory (CPU_ALLOCATOR_ENV): about 2x encoder speed
    tune_cpu_allocator: bool = True


@dataclass(frozen=True)
class JobConfig:
    inputs: tuple[str, ...]
    output: str
    model: ModelConfig = field(default_factory=ModelConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    run: RunConfig = field(default_factory=RunConfig)
    storage_options: dict[str, Any] = field(default_factory=dict)  # passed to fsspec for every URL

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "encode": EncodeConfig, "run": RunConfig}


def load_file(path: str) -> dict[str, Any]:
    """Read a TOML or YAML config file into a plain nested dict."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(raw) or {}
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file, report it plainly
        raise ConfigError(f"config file {path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table/mapping at the top level")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge; values in `override` win, None in `override` means 'not given'."""
    out = dict(base)
    for k, v in override.items():
        if v is None:
            continue
        if isinstance(v, dict) and k != "storage_options":
            out[k] = merge(out.get(k) if isinstance(out.get(k), dict) else {}, v)
        else:
            out[k] = v
    return out


def build_config(data: dict[str, Any]) -> JobConfig:
    """Validate a nested dict (file + overrides) and turn it into a JobConfig."""
    top = {f.name for f in fields(JobConfig)}
    _reject_unknown(data, top, "")
    sections = {}
    for name, cls in SECTIONS.items():
        section = data.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: expected a table of settings, got {type(section).__name__}")
        sections[name] = _build_section(cls, section, name)
    inputs = data.get("inputs")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs or not isinstance(inputs, list | tuple) or not all(isinstance(i, str) for i in inputs):
        raise ConfigError("inputs: give at least one shard path, directory, glob or brace pattern")
    output = data.get("output")
    if not isinstance(output, str) or not output:
        raise ConfigError("output: give the output directory or URL (--output)")
    storage_options = data.get("storage_options", {})
    if not isinstance(storage_options, dict):
        raise ConfigError("storage_options: expected a table of fsspec options")
    sections["encode"] = dataclasses.replace(
        sections["encode"], views=parse_views(sections["encode"].views, "encode.views")
    )
    cfg = JobConfig(
        inputs=tuple(inputs),
        output=output.rstrip("/") or output,
        storage_options=dict(storage_options),
        **sections,
    )
    _validate(cfg)
    return cfg


def _reject_unknown(section: dict[str, Any], known: set[str], where: str) -> None:
    for key in section:
        if key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{where}{key}: unknown setting{suggestion}; known: {', '.join(sorted(known))}")


def _build_section(cls: type, values: dict[str, Any], name: str) -> Any:
    hints = get_type_hints(cls)
    _reject_unknown(values, set(hints), f"{name}.")
    kwargs = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one value against its annotation; accept ints where floats are expected."""
    if getattr(hint, "__origin__", None) is tuple:  # tuple[str, ...]: a list, or a comma-separated string
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(v.strip() for v in value)
    allowed = getattr(hint, "__args__", None) or (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def _validate(cfg: JobConfig) -> None:
    m, e, r = cfg.model, cfg.encode, cfg.run
    _choice("model.precision", m.precision, PRECISIONS)
    _choice("model.device", m.device, DEVICES)
    _choice("encode.var_input_dtype", e.var_input_dtype, VAR_INPUT_DTYPES)
    _choice("encode.decode", e.decode, DECODERS)
    if m.checkpoint is None and not m.random_weights:
        raise ConfigError(
            f"model.checkpoint: preset '{m.preset}' needs weights: pass --checkpoint "
            "(VAR's vae_ch160v4096z32.pth for var256/var512), or --random-weights for a smoke test"
        )
    if m.checkpoint is not None and m.random_weights:
        raise ConfigError("model.random_weights: conflicts with model.checkpoint; give one of them")
    if e.decode == "device" and e.views != DEFAULT_VIEWS:
        raise ConfigError(
            f"encode.views: {','.join(e.views)} needs encode.decode = pil (the device decoder makes the centre "
            "crop only); use --decode pil, or --views center"
        )
    _positive("encode.batch_size", e.batch_size)
    _positive("encode.max_image_pixels", e.max_image_pixels)
    _positive("encode.rows_per_group", e.rows_per_group)
    _at_least("encode.decode_threads", e.decode_threads, 0)
    _at_least("run.replicas", r.replicas, 0)
    if r.cpus_per_replica is not None:
        _positive("run.cpus_per_replica", r.cpus_per_replica)
    if r.gpus_per_replica is not None:
        _at_least("run.gpus_per_replica", r.gpus_per_replica, 0)
    _positive("run.in_flight_per_replica", r.in_flight_per_replica)
    _positive("run.max_attempts", r.max_attempts)
    _at_least("run.retry_backoff_s", r.retry_backoff_s, 0)
    _positive("run.progress_interval_s", r.progress_interval_s)
    _positive("run.placement_timeout_s", r.placement_timeout_s)
    _at_least("run.stop_grace_s", r.stop_grace_s, 0)
    _positive("run.lease_ttl_s", r.lease_ttl_s)
    _at_least("run.wait_for_lease_s", r.wait_for_lease_s, 0)
    if not 0.0 <= r.max_error_rate <= 1.0:
        raise ConfigError(f"run.max_error_rate: must be between 0 and 1, got {r.max_error_rate}")
    if r.limit_shards is not None:
        _positive("run.limit_shards", r.limit_shards)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value}")


def output_settings(cfg: JobConfig, model_sha256: str) -> dict[str, Any]:
    """The settings that decide what the output contains; two runs agree on these or must not share OUT.

    Excluded on purpose: where inputs and outputs live, credentials, and how the work is distributed.
    """
    return {
        "format_version": FINGERPRINT_FORMAT_VERSION,
        "preset": cfg.model.preset,
        "model_sha256": model_sha256,
        "precision": cfg.model.precision,
        "var_input": cfg.encode.var_input,
        "var_input_dtype": cfg.encode.var_input_dtype if cfg.encode.var_input else None,
        "max_image_pixels": cfg.encode.max_image_pixels,
        # Added with format 1.0 already in use: recorded only when not the default, so outputs written
        # before these options existed keep their fingerprint.
        **{k: v for k, v in fast_paths(cfg.model, cfg.encode).items() if v != _FAST_PATH_DEFAULTS[k]},
        # Added with format 1.1, the same way: absent for the default (centre only).
        **({"views": list(cfg.encode.views)} if cfg.encode.views != DEFAULT_VIEWS else {}),
        # 1.1 stores var_input as nested fixed-size lists (1.0: an arrow.fixed_shape_tensor); readers that take
        # a directory as one table need one layout, so OUTs with var_input change fingerprint with it.
        **({"var_input_layout": "fixed_size_list"} if cfg.encode.var_input else {}),
    }


def fast_paths(model: ModelConfig, encode: EncodeConfig) -> dict[str, Any]:
    """The opt-in speed settings besides `model.precision`; any non-default one may change codes."""
    return {"channels_last": model.channels_last, "compile": model.compile, "decode": encode.decode}


_FAST_PATH_DEFAULTS = fast_paths(ModelConfig(), EncodeConfig())


def random_weights_id(preset: str) -> str:
    """Stands in for a checkpoint's sha256 when the weights are the model's fixed-seed random init."""
    return "random-init-" + hashlib.sha256(f"vqpipe:{preset}:seed=0".encode()).hexdigest()[:16]


def fingerprint(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def from_sources(config_file: str | None, overrides: dict[str, Any]) -> JobConfig:
    """Defaults < file < overrides (a nested dict where None means 'not given')."""
    data = load_file(config_file) if config_file else {}
    return build_config(merge(data, overrides))
