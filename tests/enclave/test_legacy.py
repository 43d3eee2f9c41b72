"""Protocol v1 in the enclave: its key is its own, its frames carry only a ciphertext, and its
answers fit KMS's 4096-byte limit or fail with legacy_too_large."""

import base64
import json

import pytest

from enclave import legacy
from enclave.config import ConfigError, EnclaveConfig
from protocol.errors import ErrorCode, NitroError

BASE = {"region": "us-east-1", "key_ids": ["arn:aws:kms:us-east-1:111122223333:key/v2"]}


def test_v1_is_off_unless_the_measured_config_names_a_compat_key():
    assert EnclaveConfig.from_json({**BASE, "model_dir": "/m"}).compat_key_id is None
    compat = "arn:aws:kms:us-east-1:111122223333:key/v1"
    config = EnclaveConfig.from_json({**BASE, "model_dir": "/m", "compat_key_id": compat})
    assert config.compat_key_id == compat


@pytest.mark.parametrize("bad", ["", 7, BASE["key_ids"][0]])
def test_the_compat_key_is_a_key_and_never_the_v2_key(bad):
    with pytest.raises(ConfigError, match="compat_key_id"):
        EnclaveConfig.from_json({**BASE, "model_dir": "/m", "compat_key_id": bad})


def test_a_legacy_frame_carries_only_base64_ciphertext():
    assert legacy.parse_body({"ciphertext": base64.b64encode(b"blob").decode()}) == b"blob"
    for body in (
        None,
        {},
        {"ciphertext": "AAAA", "access_key_id": "AKIA"},
        {"ciphertext": "not base64!"},
        {"ciphertext": 5},
        {"ciphertext": "A" * (legacy.MAX_CIPHERTEXT_B64 + 4)},
    ):
        with pytest.raises(NitroError) as refused:
            legacy.parse_body(body)
        assert refused.value.code is ErrorCode.BAD_REQUEST


def test_an_answer_over_kms_limit_is_refused_by_name():
    fits = legacy.results_plaintext("a" * 4000)
    assert json.loads(fits) == {"Results": "a" * 4000}
    with pytest.raises(NitroError) as refused:
        legacy.results_plaintext("é" * 700)  # 4,200 bytes once JSON escapes each as \u00e9
    assert refused.value.code is ErrorCode.LEGACY_TOO_LARGE
