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
        ConfigError, match=r"model.preset: unknown preset 'var1024'; known: var256, var512, tiny, small256"
    ):
        config.build_config(data)
