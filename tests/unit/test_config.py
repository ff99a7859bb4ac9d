import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from prefsculpt.config import compose, parse_overrides


def test_parse_overrides_splits_one_string_like_a_shell():
    assert parse_overrides("a=1 b='x y'") == ["a=1", "b=x y"]
    assert parse_overrides(["a=1 b=2", "c=3"]) == ["a=1", "b=2", "c=3"]
    assert parse_overrides("") == [] and parse_overrides(None) == []


def test_tiny_experiment_shrinks_every_stage():
    default, tiny = compose(), compose("experiment=tiny")
    assert tiny.data.planted.n_pairs < default.data.planted.n_pairs
    assert tiny.data.tokenize.max_response_tokens <= default.data.tokenize.max_response_tokens


def test_types_and_unknown_keys_are_checked():
    # hydra wraps the schema's type error; either way the message names the field
    with pytest.raises((ValidationError, ConfigCompositionException), match="n_pairs"):
        compose("data.planted.n_pairs=lots")
    with pytest.raises((ConfigAttributeError, ConfigKeyError, ConfigCompositionException), match="not_a_field"):
        compose("data.not_a_field=1")
    # fields a group's YAML leaves at their default can still be overridden (schema comes first)
    assert compose("sae.layer=3").sae.layer == 3


def test_data_path_override_switches_source():
    cfg = compose("data.path=/x.jsonl data.format=hh_rlhf data.columns.prompt=question")
    assert cfg.data.path == "/x.jsonl" and cfg.data.columns.prompt == "question"
