"""The measured configuration: refused when missing or malformed, defaults when silent."""

import json

import pytest

from enclave.config import ConfigError, EnclaveConfig

GOOD = {"region": "us-east-1", "key_ids": ["arn:aws:kms:us-east-1:1:key/a"], "model_dir": "/m"}


def test_loads_with_defaults(tmp_path):
    path = tmp_path / "enclave.json"
    path.write_text(json.dumps(GOOD))
    config = EnclaveConfig.load(path)
    assert config.key_ids == ("arn:aws:kms:us-east-1:1:key/a",)
    assert config.endpoint_url == "https://kms.us-east-1.amazonaws.com"
    assert config.debug_plaintext_log is False
    assert (config.engine, config.max_batch, config.max_queue) == ("fast", 8, 32)
    assert EnclaveConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "change",
    [
        {"region": "US EAST"},
        {"key_ids": []},
        {"key_ids": "arn"},
        {"model_dir": 3},
        {"kms_endpoint": 5},
        {"debug_plaintext_log": "yes"},
        {"max_prompt_tokens": 0},
        {"replay_window_s": True},
        {"surprise": 1},
        {"engine": "turbo"},
        {"engine": None},
        {"max_batch": 0},
        {"max_batch": 2.5},
        {"max_queue": -1},
        {"max_queue": True},
    ],
)
def test_malformed_fields_are_refused(change):
    with pytest.raises(ConfigError):
        EnclaveConfig.from_json({**GOOD, **change})


def test_missing_or_broken_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        EnclaveConfig.load(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        EnclaveConfig.load(broken)
    with pytest.raises(ConfigError, match="lacks key_ids"):
        EnclaveConfig.from_json({"region": "us-east-1", "model_dir": "/m"})


def test_engine_choices_are_accepted():
    for engine in ("fast", "reference"):
        config = EnclaveConfig.from_json({**GOOD, "engine": engine, "max_batch": 1, "max_queue": 0})
        assert config.engine == engine
