"""The deployment files an operator copies to AWS, checked as far as this machine allows.

hadolint on the Dockerfiles, bash -n and shellcheck on every script, every JSON and YAML file
parses, and the scripts' own argument handling (run_enclave.sh's production and debug commands).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCKERFILES = [ROOT / "enclave_base" / "Dockerfile", ROOT / "Dockerfile.enclave"]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh")) + [ROOT / "enclave" / "entrypoint.sh"]
SKIP_DIRS = {
    ".git",
    ".venv",
    ".cache",
    ".bench-cache",
    ".nitro-local",
    ".hypothesis",
    ".pytest_cache",
    ".ruff_cache",
    "build",
    "node_modules",
    "__pycache__",
}


def _tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is not in the venv (pyproject's test extra installs it)"
    return str(path)


def _files(*suffixes: str) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found += [Path(dirpath, f) for f in filenames if f.endswith(suffixes)]
    return sorted(found)


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_hadolint_passes(dockerfile: Path) -> None:
    done = _run(_tool("hadolint"), str(dockerfile))
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && apt-get install curl\n")
    assert _run(_tool("hadolint"), str(bad)).returncode != 0


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_scripts_parse_and_pass_shellcheck(script: Path) -> None:
    shell = "bash" if "bash" in script.read_text().splitlines()[0] else "sh"
    syntax = _run(shell, "-n", str(script))
    assert syntax.returncode == 0, syntax.stderr
    lint = _run(_tool("shellcheck"), str(script))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert os.access(script, os.X_OK) or script.name == "entrypoint.sh", f"{script} not executable"


class _AnyTagLoader(yaml.SafeLoader):
    """SafeLoader that reads CloudFormation's short forms (!Ref, !Sub ...) as plain values."""


def _any_tag(loader: yaml.SafeLoader, _suffix: str, node: yaml.Node) -> object:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_mapping(node)  # type: ignore[arg-type]


_AnyTagLoader.add_multi_constructor("!", _any_tag)


def test_every_json_and_yaml_file_parses() -> None:
    checked = []
    for path in _files(".json"):
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            pytest.fail(f"{path.relative_to(ROOT)} is not valid JSON: {exc}")
        checked.append(path)
    for path in _files(".yaml", ".yml"):
        try:
            list(yaml.load_all(path.read_text(), Loader=_AnyTagLoader))  # noqa: S506
        except yaml.YAMLError as exc:
            pytest.fail(f"{path.relative_to(ROOT)} is not valid YAML: {exc}")
        checked.append(path)
    names = {p.relative_to(ROOT).as_posix() for p in checked}
    assert {"allocator.yaml", "deploy/vsock-proxy.yaml", "key_policy.json"} <= names


def test_vsock_proxy_allows_only_the_regions_kms_endpoint() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "vsock-proxy.yaml").read_text())
    assert config == {"allowlist": [{"address": "kms.us-east-1.amazonaws.com", "port": 443}]}


def test_allocator_reserves_whole_numbers() -> None:
    config = yaml.safe_load((ROOT / "allocator.yaml").read_text())
    assert set(config) == {"memory_mib", "cpu_count"}
    assert isinstance(config["memory_mib"], int) and config["memory_mib"] >= 1024
    assert isinstance(config["cpu_count"], int) and config["cpu_count"] >= 2  # whole cores


def test_run_enclave_is_production_unless_debug() -> None:
    allocator = yaml.safe_load((ROOT / "allocator.yaml").read_text())
    script = str(ROOT / "scripts" / "run_enclave.sh")
    prod = _run("bash", script, "--dry-run")
    assert prod.returncode == 0, prod.stderr
    assert prod.stdout.split() == [
        "nitro-cli",
        "run-enclave",
        "--eif-path",
        "nitro-llm.eif",
        "--cpu-count",
        str(allocator["cpu_count"]),
        "--memory",
        str(allocator["memory_mib"]),
        "--enclave-cid",
        "16",
    ]
    assert "WARNING" not in prod.stderr
    debug = _run("bash", script, "--debug", "--dry-run", "--memory", "4096")
    assert debug.returncode == 0, debug.stderr
    assert debug.stdout.split()[-2:] == ["--debug-mode", "--attach-console"]
    assert "--memory 4096" in debug.stdout
    assert "PCR0, PCR1 and PCR2 as all zeros" in debug.stderr
    assert "strict key policy refuses it" in debug.stderr
    bad = _run("bash", script, "--memory", "lots", "--dry-run")
    assert bad.returncode == 2 and "must be numbers" in bad.stderr


def test_build_enclave_refuses_bad_arguments_before_building(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "build_enclave.sh")
    no_model = _run("bash", script, "--model-dir", str(tmp_path), "--region", "us-east-1")
    assert no_model.returncode == 2 and "holds no model" in no_model.stderr
    (tmp_path / "config.json").write_text("{}")
    no_config = _run("bash", script, "--model-dir", str(tmp_path))
    assert no_config.returncode == 2 and "measured configuration" in no_config.stderr
    no_config = _run("bash", script)
    assert no_config.returncode == 2 and "measured configuration" in no_config.stderr
    half_signed = _run(
        "bash",
        script,
        "--model-dir",
        str(tmp_path),
        "--region",
        "us-east-1",
        "--key-id",
        "k",
        "--signing-certificate",
        "c.pem",
    )
    assert half_signed.returncode == 2 and "go together" in half_signed.stderr


def _lock() -> dict[str, tuple[str, list[str]]]:
    text = (ROOT / "enclave_base" / "requirements.lock").read_text()
    entries = {}
    for match in re.finditer(
        r"^(\S+)==(\S+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M
    ):
        hashes = re.findall(r"sha256:([0-9a-f]{64})", match.group(3))
        entries[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = (match.group(2), hashes)
    pinned_lines = [line for line in text.splitlines() if "==" in line]
    assert len(entries) == len(pinned_lines), "a pin without a sha256 hash"
    return entries


def test_lock_pins_every_enclave_requirement_with_a_hash_and_cpu_torch() -> None:
    import tomllib

    lock = _lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["enclave"]
    for line in wanted:
        req = Requirement(line)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in lock, f"{req.name} is not in enclave_base/requirements.lock"
        version = lock[name][0]
        assert req.specifier.contains(version, prereleases=True), f"{name}=={version} vs {req}"
    assert lock["torch"][0].endswith("+cpu"), "the image must carry the CPU-only torch"
    assert not any(name.startswith("nvidia-") for name in lock)


def test_lock_covers_every_third_party_import_of_the_image() -> None:
    import ast
    import importlib.metadata

    modules: set[str] = set()
    for path in sorted((ROOT / "enclave").glob("*.py")) + sorted((ROOT / "protocol").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"enclave", "protocol", "__future__"}
    assert {"torch", "cbor2", "boto3"} <= third_party
    provided = importlib.metadata.packages_distributions()
    lock = _lock()
    for module in sorted(third_party):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in provided.get(module, [])}
        assert dists & lock.keys(), f"the image lacks {module}: add it to enclave_base/lock.py"
