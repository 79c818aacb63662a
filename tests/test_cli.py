"""The command line in-process: argument parsing and the usage errors that stop before anything is written or
Ray starts (exit code 2, the key named). The end-to-end exit codes are in test_job.py (slow)."""

from __future__ import annotations

import pytest

from vqpipe.cli import EXIT_USAGE, main, parser


def test_tokenize_parses_every_group():
    args = parser().parse_args(
        ["tokenize", "a.tar", "b.tar", "-o", "out", "--model", "tiny", "--batch-size", "4", "--no-var-input"]
    )
    assert args.inputs == ["a.tar", "b.tar"] and args.output == "out"
    assert getattr(args, "model.preset") == "tiny" and getattr(args, "encode.batch_size") == 4
    assert getattr(args, "encode.var_input") is False and getattr(args, "run.max_attempts") is None


def test_a_flag_with_a_bad_value_type_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["tokenize", "a.tar", "--batch-size", "four"])
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--precision", "fp8"], "model.precision: must be one of"),
        (["--batch-size", "0"], "encode.batch_size: must be > 0"),
        (["--model", "var1024"], "unknown preset 'var1024'"),
        (["--checkpoint", "/nonexistent/vae.pth"], "model.random_weights: conflicts"),
    ],
)
def test_cli_rejects_bad_settings_with_the_key_named(tmp_path, caplog, extra, message):
    args = ["tokenize", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "tiny", "--random-weights"]
    assert main([*args, *extra]) == EXIT_USAGE
    assert message in caplog.text
    assert not (tmp_path / "o").exists()


def test_config_file_unknown_key_and_missing_inputs(tmp_path, caplog):
    cfg = tmp_path / "job.toml"
    cfg.write_text(
        'inputs = ["x.tar"]\noutput = "o"\n[model]\npreset = "tiny"\nrandom_weights = true\nprecison = "exact"\n'
    )
    assert main(["tokenize", "--config", str(cfg)]) == EXIT_USAGE
    assert "model.precison: unknown setting (did you mean 'precision'?)" in caplog.text
    yml = tmp_path / "job.yaml"
    yml.write_text(
        f"inputs: [{tmp_path}/nothing-*.tar]\noutput: {tmp_path}/o\nmodel: {{preset: tiny, random_weights: true}}\n"
    )
    assert main(["tokenize", "--config", str(yml)]) == EXIT_USAGE
    assert "nothing-*.tar" in caplog.text
    assert not (tmp_path / "o").exists()
