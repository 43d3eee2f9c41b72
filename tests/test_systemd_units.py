"""deploy/systemd/: the units parse, start what this checkout provides, and keep their hardening.

The units name the production layout (the checkout at /opt/nitro-llm, its venv in .venv, AWS's
binaries in /usr/bin). Here that prefix maps to this checkout; where systemd-analyze exists, the
units are verified for real with the checkout's paths and stand-ins for AWS's two binaries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from parent_proxy.config import ENV_PREFIX, ProxyConfig, build_parser
from protocol.transport import Address

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "deploy" / "systemd"
INSTALL = "/opt/nitro-llm"
NAMES = (
    "nitro-llm-proxy.service",
    "nitro-vsock-proxy.service",
    "nitro-llm-enclave.service",
    "nitro-llm-model-feed.service",
)
# What every parent-side service of ours keeps, whatever else it needs.
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictSUIDSGID": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "SystemCallFilter": "@system-service",
}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of key -> values (a key may repeat, as systemd allows); comments skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}:{number}: not KEY=VALUE in a section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{key} is set {len(values)} times"
    return values[0]


def in_checkout(path: str) -> Path:
    assert path.startswith(INSTALL + "/"), path
    return ROOT / path.removeprefix(INSTALL + "/")


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _sep, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


@pytest.fixture(scope="module")
def units() -> dict[str, dict[str, dict[str, list[str]]]]:
    return {name: parse_unit(UNITS / name) for name in NAMES}


def assert_runs_console_script(unit: Any, entry_point: str, environment_file: str) -> None:
    """ExecStart is the checkout venv's console script for `entry_point` (installed when the
    venv exists), settings come from `environment_file`, and the service does not run as root."""
    script = in_checkout(one(unit, "Service", "ExecStart").split()[0])
    assert script.parent == ROOT / ".venv" / "bin"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[script.name] == entry_point
    if (ROOT / ".venv" / "bin").is_dir():  # `make test` runs from the venv
        assert os.access(script, os.X_OK), f"{script} is not installed"
    assert one(unit, "Service", "EnvironmentFile") == environment_file
    assert one(unit, "Service", "User") not in ("root", "0")


# ---- the proxy ---------------------------------------------------------------------------------


def test_the_proxy_unit_runs_the_console_script_as_its_own_user(units) -> None:
    proxy = units["nitro-llm-proxy.service"]
    exec_start = one(proxy, "Service", "ExecStart").split()
    assert len(exec_start) == 1  # every setting comes from the environment file
    assert_runs_console_script(proxy, "parent_proxy.main:main", "/etc/nitro-llm/proxy.env")


def test_the_proxy_unit_is_hardened(units) -> None:
    service = units["nitro-llm-proxy.service"]["Service"]
    # The common hardening: test_the_hardening_is_the_proxys_too. Its own: binding port 443.
    expected = {
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    }
    assert {key: service.get(key) for key in expected} == {k: [v] for k, v in expected.items()}
    families = set(
        one(units["nitro-llm-proxy.service"], "Service", "RestrictAddressFamilies").split()
    )
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_VSOCK"}


def test_the_example_environment_is_a_valid_proxy_configuration() -> None:
    env = read_env_file(UNITS / "proxy.env.example")
    flags = {action.dest.upper() for action in build_parser({})._actions}
    unknown = [name for name in env if name.removeprefix(ENV_PREFIX) not in flags]
    assert not unknown, f"not parent-proxy settings: {unknown}"
    config = ProxyConfig.from_args([], environ=env)
    assert config.bind == "0.0.0.0:443"  # the port the security group and load balancer open
    assert (str(config.certfile), str(config.keyfile)) == (
        "/etc/nitro-llm/tls/cert.pem",
        "/etc/nitro-llm/tls/key.pem",
    )
    assert config.enclaves == (Address.parse("vsock://16:5000"),)
    assert config.credentials_file is None  # production: the parent role from IMDSv2


# ---- the model feed ----------------------------------------------------------------------------


def expand(argv: list[str], env: dict[str, str]) -> list[str]:
    """systemd's ${NAME} substitution in ExecStart, from the environment file."""
    out = []
    for word in argv:
        if word.startswith("${") and word.endswith("}"):
            word = env.get(word[2:-1], "")
        out.append(word)
    return out


def test_the_model_feed_unit_runs_the_console_script_on_the_example_settings(
    units, monkeypatch: pytest.MonkeyPatch
) -> None:
    from parent_proxy import model_feed

    unit = units["nitro-llm-model-feed.service"]
    argv = one(unit, "Service", "ExecStart").split()
    assert_runs_console_script(
        unit, "parent_proxy.model_feed:main", "/etc/nitro-llm/model-feed.env"
    )
    assert "nitro-llm-enclave.service" in one(unit, "Unit", "Before").split()
    # The example environment, as systemd hands it over, parsed by the feed's own parser.
    env = read_env_file(UNITS / "model-feed.env.example")
    parser_env = {name for name in env if name.startswith("NITRO_")}
    assert parser_env == set(env), f"not model-feed settings: {set(env) - parser_env}"
    for name in ("NITRO_MODEL_FEED_DIR", "NITRO_MODEL_FEED_LISTEN", "NITRO_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = model_feed._parse_args(expand(argv[1:], env))
    assert args.sealed_dir == env["NITRO_MODEL_FEED_DIR"] == "/var/lib/nitro-llm/sealed-model"
    assert args.credentials_file is None  # production: the parent role from IMDSv2
    listen = Address.parse(args.listen)
    assert (listen.scheme, listen.port) == ("vsock", 5100)
    assert listen.host == "4294967295"  # VMADDR_CID_ANY: the enclave dials the parent, CID 3
    assert args.listen == model_feed.DEFAULT_LISTEN


def test_the_model_feed_unit_is_hardened(units) -> None:
    service = units["nitro-llm-model-feed.service"]["Service"]
    assert {key: service.get(key) for key in HARDENING} == {k: [v] for k, v in HARDENING.items()}
    assert service["CapabilityBoundingSet"] == [""]  # no capability at all
    assert "AmbientCapabilities" not in service
    families = service["RestrictAddressFamilies"][0].split()
    assert sorted(families) == ["AF_INET", "AF_UNIX", "AF_VSOCK"]


def test_the_hardening_is_the_proxys_too(units) -> None:
    service = units["nitro-llm-proxy.service"]["Service"]
    assert {key: service.get(key) for key in HARDENING} == {k: [v] for k, v in HARDENING.items()}


# ---- vsock-proxy and the enclave ---------------------------------------------------------------


def test_vsock_proxy_forwards_only_to_an_allowlisted_kms_endpoint(units) -> None:
    unit = units["nitro-vsock-proxy.service"]
    argv = one(unit, "Service", "ExecStart").split()
    assert argv[:2] == ["/usr/bin/vsock-proxy", "8000"]  # the enclave's forwarder dials port 8000
    assert argv[2:] == [
        "${KMS_ENDPOINT}",
        "443",
        "--config",
        "/etc/nitro_enclaves/vsock-proxy.yaml",
    ]
    [default] = [v for v in unit["Service"]["Environment"] if v.startswith("KMS_ENDPOINT=")]
    endpoint = default.removeprefix("KMS_ENDPOINT=")
    allowlist = yaml.safe_load((ROOT / "deploy" / "vsock-proxy.yaml").read_text())["allowlist"]
    assert {"address": endpoint, "port": 443} in allowlist
    assert "deploy/vsock-proxy.yaml" in (UNITS / "nitro-vsock-proxy.service").read_text()
    assert one(unit, "Service", "DynamicUser") == "yes"
    assert one(unit, "Service", "NoNewPrivileges") == "yes"


def test_the_enclave_unit_runs_the_checkouts_script_in_production_mode(units) -> None:
    unit = units["nitro-llm-enclave.service"]
    argv = one(unit, "Service", "ExecStart").split()
    script = in_checkout(argv[0])
    assert script == ROOT / "scripts" / "run_enclave.sh"
    assert script.is_file() and os.access(script, os.X_OK)
    assert "--debug" not in argv
    # The CID the proxy's example configuration dials.
    cid = argv[argv.index("--cid") + 1]
    env = read_env_file(UNITS / "proxy.env.example")
    assert env["PARENT_PROXY_ENCLAVE"] == f"vsock://{cid}:5000"
    assert "nitro-enclaves-allocator.service" in unit["Unit"]["Requires"]
    assert one(unit, "Service", "ExecStop") == "/usr/bin/nitro-cli terminate-enclave --all"


# ---- systemd's own verdict ---------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    for binary in ("vsock-proxy", "nitro-cli"):  # AWS's, installed on a parent instance only
        path = stand_ins / binary
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    (tmp_path / "nitro-enclaves-allocator.service").write_text(
        "[Unit]\nDescription=stand-in for AWS's allocator\n[Service]\nExecStart=/bin/true\n"
    )
    for name in NAMES:
        text = (UNITS / name).read_text()
        text = text.replace(INSTALL, str(ROOT)).replace("/usr/bin/", f"{stand_ins}/")
        (tmp_path / name).write_text(text)
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{tmp_path}:", SYSTEMD_LOG_COLOR="0")
    done = subprocess.run(  # noqa: S603 - a fixed system tool on our own files
        ["systemd-analyze", "verify", *NAMES],  # noqa: S607
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # An unknown key is only a warning to systemd (exit 0): any message fails here.
    assert (done.returncode, done.stdout + done.stderr) == (0, ""), done.stdout + done.stderr
