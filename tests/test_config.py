"""vqpipe.config in-process: defaults, files, overrides, validation with the key named. No Ray, no torch."""

from __future__ import annotations

import pytest

from vqpipe import config
from vqpipe.errors import ConfigError


def test_preset_names_are_the_model_presets():
    """The config validates preset names without importing torch; the model package owns the presets."""
    from vqpipe.model import PRESETS

    assert set(config.PRESET_NAMES) == set(PRESETS)


def test_unknown_preset_is_a_config_error_naming_the_known_ones():
    data = {"inputs": ["a.tar"], "output": "o", "model": {"preset": "var1024", "random_weights": True}}
    with pytest.raises(
        ConfigError,
        match=r"model.preset: unknown preset 'var1024'; known: var256, var512, tiny, small256, demo",
    ):
        config.build_config(data)


def minimal(**sections):
    return {"inputs": ["a.tar"], "output": "o/", "model": {"random_weights": True}, **sections}


def test_defaults_and_normalised_paths():
    cfg = config.build_config({"inputs": "a.tar", "output": "s3://b/out/", "model": {"random_weights": True}})
    assert cfg.inputs == ("a.tar",) and cfg.output == "s3://b/out"
    assert cfg.model == config.ModelConfig(random_weights=True)
    assert cfg.encode == config.EncodeConfig() and cfg.run == config.RunConfig()
    assert cfg.encode.max_image_pixels == config.MAX_IMAGE_PIXELS


def test_files_in_toml_and_yaml_say_the_same(tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text(
        'inputs = ["a.tar"]\noutput = "o"\n[model]\nrandom_weights = true\n[run]\nmax_error_rate = 0\n'
    )
    yaml = tmp_path / "job.yaml"
    yaml.write_text("inputs: [a.tar]\noutput: o\nmodel: {random_weights: true}\nrun: {max_error_rate: 0}\n")
    a, b = config.from_sources(str(toml), {}), config.from_sources(str(yaml), {})
    assert a == b and a.run.max_error_rate == 0.0 and isinstance(a.run.max_error_rate, float)


def test_overrides_win_over_the_file_and_none_means_not_given(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(
        'inputs = ["a.tar"]\noutput = "o"\n[model]\nrandom_weights = true\n[encode]\nbatch_size = 3\n'
    )
    cfg = config.from_sources(str(path), {"encode": {"batch_size": None, "var_input": False}, "output": "p"})
    assert (cfg.encode.batch_size, cfg.encode.var_input, cfg.output) == (3, False, "p")


def test_storage_options_are_taken_whole_not_merged(tmp_path):
    merged = config.merge({"storage_options": {"anon": True}}, {"storage_options": {"key": "k"}})
    assert merged["storage_options"] == {"key": "k"}


@pytest.mark.parametrize(
    "data, message",
    [
        (
            minimal(model={"random_weights": True, "precison": "exact"}),
            "model.precison: unknown setting (did you mean 'precision'?)",
        ),
        ({**minimal(), "modle": {}}, "modle: unknown setting (did you mean 'model'?)"),
        (minimal(encode={"batch_size": "4"}), "encode.batch_size: expected int, got '4'"),
        (minimal(encode={"batch_size": True}), "encode.batch_size: expected int, got True"),
        (minimal(encode={"batch_size": 0}), "encode.batch_size: must be > 0, got 0"),
        (
            minimal(model={"random_weights": True, "precision": "fp8"}),
            "model.precision: must be one of exact, tf32, bf16, got 'fp8'",
        ),
        (
            minimal(model={"random_weights": True, "device": 1}),
            "model.device: must be one of auto, cpu, cuda, got 1",
        ),
        (minimal(encode={"decode": "gpu"}), "encode.decode: must be one of pil, device, got 'gpu'"),
        (minimal(run={"max_error_rate": 1.5}), "run.max_error_rate: must be between 0 and 1, got 1.5"),
        (minimal(run={"replicas": -1}), "run.replicas: must be >= 0, got -1"),
        (minimal(run={"min_errors_to_fail": 0}), "run.min_errors_to_fail: must be > 0, got 0"),
        (minimal(run={"limit_shards": 0}), "run.limit_shards: must be > 0, got 0"),
        (
            minimal(run={"replicas": 2, "max_replicas": 4}),
            "run.min_replicas/max_replicas: bound replicas = 0",
        ),
        (minimal(run={"min_replicas": 0}), "run.min_replicas: must be >= 1, got 0"),
        (minimal(run={"min_replicas": 3, "max_replicas": 2}), "run.max_replicas: must be >= 3, got 2"),
        (minimal(run={"max_failed_shards": -1}), "run.max_failed_shards: must be >= 0, got -1"),
        (
            minimal(run={"max_failed_fraction": 2}),
            "run.max_failed_fraction: must be between 0 and 1, got 2.0",
        ),
        (minimal(model={}), "model.checkpoint: preset 'var256' needs weights"),
        (minimal(model={"random_weights": True, "checkpoint": "x.pth"}), "model.random_weights: conflicts"),
        (minimal(model="tiny"), "model: expected a table of settings, got str"),
        ({"output": "o", "model": {"random_weights": True}}, "inputs: give at least one shard path"),
        ({"inputs": ["a.tar"], "model": {"random_weights": True}}, "output: give the output directory"),
        (minimal(storage_options=["anon"]), "storage_options: expected a table of fsspec options"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(data, message):
    with pytest.raises(ConfigError) as e:
        config.build_config(data)
    assert message in str(e.value)


def test_unreadable_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml"):
        config.load_file(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("inputs = [\n")
    with pytest.raises(ConfigError, match=r"bad.toml: cannot parse"):
        config.load_file(str(bad))
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a table/mapping at the top level"):
        config.load_file(str(top))


def test_fingerprint_covers_output_settings_only():
    cfg = config.build_config(minimal())
    base = config.output_settings(cfg, "abc")
    moved = config.build_config(minimal(run={"replicas": 4, "max_attempts": 9}) | {"output": "elsewhere"})
    assert config.output_settings(moved, "abc") == base  # where and how it runs: same output
    changed = config.build_config(minimal(encode={"var_input_dtype": "float32"}))
    assert config.fingerprint(config.output_settings(changed, "abc")) != config.fingerprint(base)
    assert config.fingerprint(config.output_settings(cfg, "abd")) != config.fingerprint(base)
    # fast paths are recorded only when not at their default, so older outputs keep their fingerprint
    assert "channels_last" not in base
    fast = config.build_config(minimal(model={"random_weights": True, "channels_last": True}))
    assert config.output_settings(fast, "abc")["channels_last"] is True


def test_config_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, vqpipe.config, vqpipe.options; print(sorted({'torch', 'ray', 'fsspec', 'pyarrow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
