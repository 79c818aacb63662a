"""Options stated once: the command line and docs/options.md come from the config dataclasses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vqpipe import config, options
from vqpipe.cli import parser

DOCS = Path(__file__).resolve().parent.parent / "docs" / "options.md"


def test_docs_options_table_is_current():
    assert DOCS.read_text() == options.markdown(), "regenerate: python -m vqpipe.options > docs/options.md"


def test_every_setting_has_a_flag_and_a_row():
    rows = options.markdown()
    for cls_name, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls_name}.{f.name} has no help"
            assert f"`{cls_name}.{f.name}`" in rows
    flags = [o.flag for o in options.options()]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize(
    "flag, key, expected",
    [
        (["--model", "tiny"], ("model", "preset"), "tiny"),
        (["--random-weights"], ("model", "random_weights"), True),
        (["--no-var-input"], ("encode", "var_input"), False),
        (["--batch-size", "4"], ("encode", "batch_size"), 4),
        (["--max-error-rate", "0.5"], ("run", "max_error_rate"), 0.5),
        (["--min-errors-to-fail", "3"], ("run", "min_errors_to_fail"), 3),
        (["--wait-for-lease", "3"], ("run", "wait_for_lease_s"), 3.0),
        (["--no-speculative"], ("run", "speculative"), False),
        (["--limit-shards", "2"], ("run", "limit_shards"), 2),
    ],
)
def test_flags_land_on_their_config_key(flag, key, expected):
    args = parser().parse_args(["tokenize", "in.tar", "-o", "out", "--random-weights", *flag])
    cfg = config.build_config(config.merge({}, options.overrides(args)))
    assert getattr(getattr(cfg, key[0]), key[1]) == expected


def test_flags_not_given_leave_the_file_values(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(
        'inputs = ["a.tar"]\noutput = "o"\n[model]\nrandom_weights = true\n[encode]\nbatch_size = 3\n'
    )
    args = parser().parse_args(["tokenize", "--config", str(path), "--max-attempts", "5"])
    cfg = config.from_sources(args.config, options.overrides(args))
    assert (cfg.encode.batch_size, cfg.run.max_attempts, cfg.encode.var_input) == (3, 5, True)
    assert cfg.inputs == ("a.tar",)
