"""Routing defaults are defined once: the exit threshold and off-ramps a run uses come from the flag, else
the model folder's saved value, else the one default."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import make_config

from transformers_ext.inference import DEFAULT_EXIT_THRESHOLD, default_off_ramps
from transformers_ext.routing import (
    TRAINED_DEPTHS,
    TRAINED_DEPTHS_KEY,
    RoutingSetting,
    record_trained_depths,
    routing_defaults,
    trained_depths,
)

REPO = Path(__file__).resolve().parent.parent


def test_flag_then_saved_then_default():
    config = make_config(num_hidden_layers=4)
    assert routing_defaults(config) == (DEFAULT_EXIT_THRESHOLD, default_off_ramps(4, TRAINED_DEPTHS)) == (0.57, [1, 2])
    config.exit_threshold, config.off_ramps = 0.0, [0]  # a saved 0 is a threshold, not "unset"
    assert routing_defaults(config) == (0.0, [0])
    assert routing_defaults(config, 0.3, [2, 3]) == (0.3, [2, 3])


def test_recorded_trained_depths_place_the_default_off_ramps():
    """run_glue.py's depth stages record their depths in the config; a full-depth stage drops an inherited
    list; without one (older folders) the depths are TRAINED_DEPTHS."""
    config = make_config(num_hidden_layers=4)
    record_trained_depths(config, [1.0, 0.25])
    assert config.to_dict()[TRAINED_DEPTHS_KEY] == trained_depths(config) == [1.0, 0.25]
    assert routing_defaults(config)[1] == [0]
    record_trained_depths(config, None)
    assert TRAINED_DEPTHS_KEY not in config.to_dict() and trained_depths(config) == list(TRAINED_DEPTHS)
    assert routing_defaults(config)[1] == [1, 2]


def test_a_setting_is_the_keyword_arguments_of_dynamic_forward():
    import inspect

    from transformers_ext.inference import dynamic_forward

    setting = RoutingSetting(None, 0.5, 0.75, True, 0.2, [1])
    kwargs = setting.forward_kwargs()
    assert kwargs == {"class_to_width": None, "fixed_width": 0.5, "depth_mult": 0.75, "early_exit": True,
                      "exit_threshold": 0.2, "off_ramps": [1]}
    parameters = inspect.signature(dynamic_forward).parameters
    assert set(kwargs) <= set(parameters)
    assert RoutingSetting().exit_threshold == parameters["exit_threshold"].default == DEFAULT_EXIT_THRESHOLD


def test_the_default_exit_threshold_is_written_once():
    sources = [p for p in REPO.rglob("*") if p.suffix in (".py", ".sh") or p.name == "Makefile"]
    places = [f"{p.relative_to(REPO)}:{n}" for p in sources if ".venv" not in p.parts and "tests" not in p.parts
              for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
              if re.search(r"(?<![\d.])0\.57(?!\d)", line)]
    assert len(places) == 1 and places[0].startswith("transformers_ext/inference.py:"), places
