"""Job configuration: frozen dataclasses, loading from TOML/YAML with CLI overrides, validation, fingerprint.

Settings are grouped by the stage that uses them. Precedence: defaults < config file < command line.
Unknown keys and bad values raise `ConfigError` naming the key; nothing is silently ignored.

One module although over ~300 lines: the dataclasses are the single table of options (options.py derives the
flags and docs/options.md from them), and loading, validation and the fingerprint are written against that table.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .errors import ConfigError
from .views import DEFAULT_VIEWS, parse_views

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FORMAT_VERSION = "2.0"  # of the files written and the OUT layout (CHANGELOG.md, docs/format.md)
# The format version inside the fingerprint stays 1.0: what 1.1 changed is in the output settings on its own
# terms (the `var_input` layout, only when var_input is written; `views`, only when not the default), so a
# codes-only OUT keeps its fingerprint while an OUT of 1.0 var_input files is not mixed with 1.1 ones.
FINGERPRINT_FORMAT_VERSION = "1.0"

# The choices of the settings that take one of a few names: the types say them once, validation and the
# command line's help read them from there.
# Equal to model.presets.PRESETS (a test checks).
PresetName = Literal["var256", "var512", "tiny", "small256", "demo"]
Precision = Literal["exact", "tf32", "bf16"]
DecodeBackend = Literal["pil", "device"]
VarInputDtype = Literal["float16", "float32"]
Device = Literal["auto", "cpu", "cuda"]
PRESET_NAMES: tuple[str, ...] = get_args(PresetName)
PRECISIONS: tuple[str, ...] = get_args(Precision)
DECODERS: tuple[str, ...] = get_args(DecodeBackend)
VAR_INPUT_DTYPES: tuple[str, ...] = get_args(VarInputDtype)
DEVICES: tuple[str, ...] = get_args(Device)

# Equal to PIL's own default `Image.MAX_IMAGE_PIXELS` (about 9459x9459); vqpipe applies it before decoding.
MAX_IMAGE_PIXELS = 89_478_485

# glibc returns big freed blocks (a batch's activations, 100+ MB) to the kernel at once, so every batch on a CPU
# page-faults them in again: about half of a CPU encoder's time (benchmarks/README.md). Keeping them in the heap
# roughly doubles its throughput; RSS then stays at its high-water mark, which is bounded per actor anyway.
CPU_ALLOCATOR_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
}


def option(default: Any, help: str, *, flag: str | None = None, metavar: str | None = None) -> Any:
    """A setting: its default and its one-line help, from which the command line (`vqpipe.options`) and
    docs/options.md are derived. `flag` overrides the derived flag name (`--batch-size`, or `--no-var-input`
    for a boolean that defaults to true)."""
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar})


# Adding a setting: one field with its help below (and its check in `_validate` if it has bounds).


@dataclass(frozen=True)
class ModelConfig:
    """Which tokenizer, which weights, and how numerically strict to be."""

    preset: PresetName = option(
        "var256",
        "var256: VAR's tokenizer (patch nums 1,2,3,4,5,6,8,10,13,16; 256 px); var512: same weights "
        "(1,2,3,4,6,9,13,18,24,32; 512 px); tiny: tests (64 px); small256: benchmarks (VAR's 256 px schedule "
        "on a light backbone); demo: the README demo, trainable from scratch on a CPU (64 px)",
        flag="--model",
    )
    checkpoint: str | None = option(
        None,
        "VAR-format state dict (local path or URL), e.g. vae_ch160v4096z32.pth; loaded with weights_only=True, "
        "strict keys and shapes. Required unless --random-weights",
        metavar="URL",
    )
    random_weights: bool = option(
        False, "use the preset's fixed-seed random weights (smoke tests and demos only); never implicit"
    )
    precision: Precision = option(
        "exact",
        "exact: float32, TF32 off, deterministic cuDNN (VAR-identical codes). Opt-in: tf32, bf16 (encoder "
        "under bf16 autocast, quantizer in float32)",
    )
    channels_last: bool = option(False, "NHWC encoder convolutions (faster on tensor cores; not bit-exact)")
    compile: bool = option(
        False, "torch.compile the encoder convolutions (one compile per replica; not bit-exact)"
    )
    device: Device = option("auto", "where the encoder runs (auto: CUDA when the replica has a GPU)")


@dataclass(frozen=True)
class EncodeConfig:
    """What each sample becomes and how samples are batched."""

    batch_size: int = option(16, "images (crops, with views) per encoder batch")
    var_input: bool = option(True, "write the teacher-forcing tensor var_input (off: codes only)")
    var_input_dtype: VarInputDtype = option("float16", "dtype of var_input")
    max_image_pixels: int = option(
        MAX_IMAGE_PIXELS, "larger images are sample errors, checked before decoding (decompression bombs)"
    )
    decode_threads: int = option(0, "image decode threads per replica (0: one per CPU given to the replica)")
    decode: DecodeBackend = option(
        "pil", "pil is VAR-exact; device decodes and resizes JPEGs on the GPU (nvJPEG; not VAR-exact)"
    )
    rows_per_group: int = option(
        512,
        "rows per Parquet row group: every group of a data file has exactly this many but its last (bounds memory)",
    )
    views: tuple[str, ...] = option(
        DEFAULT_VIEWS,
        "augmented views, one row each, comma-separated: center (default), hflip, tl, tr, bl, br, X+hflip, "
        "crops5, crops10 (docs/views.md); stored expanded in canonical order; other than center alone, the "
        "data files get a `view` column",
    )


@dataclass(frozen=True)
class RunConfig:
    """How the job is distributed, retried and judged."""

    address: str | None = option(
        None, "Ray cluster address (default: RAY_ADDRESS, a Ray job's cluster, else a local cluster)"
    )
    replicas: int = option(
        0,
        "encoder actors, exactly this many; 0 (auto): as many as the cluster can host (its GPUs / "
        "gpus_per_replica, or without GPUs its CPUs / cpus_per_replica), re-evaluated while the job runs",
    )
    min_replicas: int | None = option(
        None,
        "auto: request at least N, placed or not (an autoscaler adds nodes for them); default 1",
        metavar="N",
    )
    max_replicas: int | None = option(None, "auto: at most N replicas (default: no limit)", metavar="N")
    spread_replicas: bool = option(True, "replicas on different nodes where there is a choice (CPUs, NICs)")
    cpus_per_replica: float | None = option(
        None,
        "CPUs reserved per actor; also its decode and torch threads (default: a GPU node's CPUs divided among "
        "its GPUs' replicas, the smallest share in the cluster; without GPUs, auto: the smallest node's CPUs, "
        "replicas = N: the cluster's CPUs divided among them, at most one node's). Set it on clusters that "
        "autoscale GPU nodes from zero",
    )
    gpus_per_replica: float | None = option(
        None,
        "GPUs per actor (default: 1 when the cluster has GPUs at start, else 0); set 1 on clusters that "
        "autoscale GPU nodes from zero",
    )
    in_flight_per_replica: int = option(
        2, "shards queued per actor, so the next one streams while one encodes (raised for small shards)"
    )
    max_attempts: int = option(
        3, "tries per shard (on another replica when one dies), with exponential backoff, before it fails"
    )
    retry_backoff_s: float = option(2.0, "seconds before a failed shard's first retry (doubling after)")
    speculative: bool = option(True, "re-issue the slowest tail shards to idle actors")
    max_error_rate: float = option(
        0.1, "a shard with more bad samples than this fraction fails: a bug or the wrong input, not noise"
    )
    min_errors_to_fail: int = option(
        10,
        "max_error_rate fails a shard only once it has at least this many bad samples: one bad image of a "
        "4-sample shard is 25 %, noise rather than a bug (1: the rate alone)",
        metavar="N",
    )
    retry_failed: bool = option(
        False,
        "retry shards that failed for what their input holds (not_a_tar, bad_tar, truncated_tar) although the "
        "input is unchanged since (default: they stay failed and are not retried)",
    )
    max_failed_shards: int | None = option(
        None,
        "exit 0 when at most N planned shards failed (still listed in the summary and status)",
        metavar="N",
    )
    max_failed_fraction: float | None = option(
        None,
        "exit 0 when at most this fraction of the planned shards failed (with max_failed_shards: both hold)",
    )
    limit_shards: int | None = option(None, "process only the first N shards (by shard id)", metavar="N")
    reprocess_changed: bool = option(
        False, "redo done shards whose input changed (size/mtime/ETag) since they were committed"
    )
    allow_config_change: bool = option(
        False,
        "write into an OUT made with different output settings (never another token layout: preset, views, var_input)",
    )
    repair: bool = option(
        False,
        "first read every committed file in full (as `vqpipe status --verify`) and tokenize the shards of damaged "
        "ones again, where their inputs are among this run's",
    )
    allow_unterminated_tar: bool = option(
        False,
        "accept tars without an end-of-archive marker (for writers that omit it; a cut-off copy then passes)",
    )
    progress_interval_s: float = option(10.0, "seconds between progress log lines")
    # The run lease on OUT (docs/reliability.md).
    lease_ttl_s: float = option(120.0, "a lease holder silent this long is taken for gone")
    wait_for_lease_s: float = option(
        0.0,
        "when another run is writing into OUT, wait this long for it to end (0: refuse at once)",
        flag="--wait-for-lease",
        metavar="SECONDS",
    )
    placement_timeout_s: float = option(
        900.0,
        "a replica not placed this long is given up, with a warning; when none can be placed the run exits 75 "
        "(autoscaling may take minutes)",
    )
    stop_grace_s: float = option(20.0, "after SIGTERM/SIGINT: how long running shards may take to commit")
    tune_cpu_allocator: bool = option(
        True, "CPU replicas keep freed activation memory (about 2x encoder speed; RSS stays at its peak)"
    )


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
            inner = out.get(k)
            out[k] = merge(inner if isinstance(inner, dict) else {}, v)
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
    if get_origin(hint) is Literal:  # which of the names: checked in _validate, after the types
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be one of {', '.join(get_args(hint))}, got {value!r}")
        return value
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
    if m.preset not in PRESET_NAMES:
        raise ConfigError(f"model.preset: unknown preset {m.preset!r}; known: {', '.join(PRESET_NAMES)}")
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        for key, hint in get_type_hints(cls).items():
            if get_origin(hint) is Literal:
                _choice(f"{name}.{key}", getattr(section, key), get_args(hint))
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
    if r.replicas and (r.min_replicas, r.max_replicas) != (None, None):
        raise ConfigError(
            f"run.min_replicas/max_replicas: bound replicas = 0 (auto), not replicas = {r.replicas}"
        )
    for key, low in (("min_replicas", 1), ("max_replicas", r.min_replicas or 1), ("max_failed_shards", 0)):
        if (value := getattr(r, key)) is not None:
            _at_least(f"run.{key}", value, low)
    _fraction("run.max_failed_fraction", r.max_failed_fraction)
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
    _positive("run.min_errors_to_fail", r.min_errors_to_fail)
    _fraction("run.max_error_rate", r.max_error_rate)
    if r.limit_shards is not None:
        _positive("run.limit_shards", r.limit_shards)


def _fraction(key: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}: must be between 0 and 1, got {value}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
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
