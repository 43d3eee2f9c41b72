"""ProxyConfig from flags and PARENT_PROXY_* variables (named test_proxy_config.py because
tests/enclave/test_config.py already takes the module name test_config)."""

from pathlib import Path

import pytest

from parent_proxy.config import ProxyConfig, parse_bind
from parent_proxy.main import main
from protocol.transport import Address

TLS = ["--certfile", "c.pem", "--keyfile", "k.pem"]


def test_defaults_work_for_local_mode():
    config = ProxyConfig.from_args(TLS, environ={})
    assert config.bind == "127.0.0.1:5001"
    assert config.enclave == Address.parse("vsock://16:5000")
    assert config.imds_endpoint == "http://169.254.169.254"
    assert (config.max_body, config.read_timeout, config.relay_timeout) == (262144, 10.0, 120.0)
    assert (config.workers, config.threads, config.log_level) == (2, 8, "INFO")
    assert config.credentials_file is None and not config.local_mode


def test_environment_twins_fill_what_flags_do_not():
    environ = {
        "PARENT_PROXY_BIND": "0.0.0.0:5001",
        "PARENT_PROXY_ENCLAVE": "unix:///tmp/e.sock",
        "PARENT_PROXY_CERTFILE": "/tls/cert.pem",
        "PARENT_PROXY_KEYFILE": "/tls/key.pem",
        "PARENT_PROXY_CREDENTIALS_FILE": "/state/parent.json",
        "PARENT_PROXY_MAX_BODY": "1000",
        "PARENT_PROXY_READ_TIMEOUT": "2.5",
        "PARENT_PROXY_RELAY_TIMEOUT": "30",
        "PARENT_PROXY_WORKERS": "3",
        "PARENT_PROXY_THREADS": "4",
        "PARENT_PROXY_LOG_LEVEL": "debug",
    }
    config = ProxyConfig.from_args(["--max-body", "2000"], environ=environ)
    assert config.max_body == 2000  # the flag wins
    assert config.bind == "0.0.0.0:5001"
    assert config.enclave == Address.parse("unix:///tmp/e.sock")
    assert (config.certfile, config.keyfile) == (Path("/tls/cert.pem"), Path("/tls/key.pem"))
    assert config.credentials_file == Path("/state/parent.json") and config.local_mode
    assert (config.read_timeout, config.relay_timeout) == (2.5, 30.0)
    assert (config.workers, config.threads, config.log_level) == (3, 4, "DEBUG")


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no TLS files
        ["--certfile", "c.pem"],
        [*TLS, "--enclave", "http://x"],
        [*TLS, "--max-body", "lots"],
        [*TLS, "--max-body", "0"],
        [*TLS, "--max-body", str(2 << 20)],
        [*TLS, "--read-timeout", "0"],
        [*TLS, "--relay-timeout", "-1"],
        [*TLS, "--workers", "0"],
        [*TLS, "--bind", "nohost"],
        [*TLS, "--log-level", "loud"],
    ],
)
def test_bad_values_exit_with_usage_status(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ProxyConfig.from_args(argv, environ={})
    assert exit_info.value.code == 2
    assert "parent-proxy" in capsys.readouterr().err


def test_bad_environment_value_is_a_usage_error():
    with pytest.raises(SystemExit):
        ProxyConfig.from_args(TLS, environ={"PARENT_PROXY_READ_TIMEOUT": "soon"})


@pytest.mark.parametrize(
    ("bind", "expected"),
    [("127.0.0.1:5001", ("127.0.0.1", 5001)), ("[::1]:0", ("::1", 0))],
)
def test_bind_forms(bind, expected):
    assert parse_bind(bind) == expected


@pytest.mark.parametrize(
    "extra",
    [["--imds-endpoint", "not a url"], ["--credentials-file", "/nonexistent/parent.json"]],
)
def test_startup_refuses_what_would_fail_in_every_worker(tls_files, extra, capsys):
    argv = ["--certfile", str(tls_files.cert), "--keyfile", str(tls_files.key), *extra]
    assert main(argv) == 2
    assert "parent-proxy:" in capsys.readouterr().err
