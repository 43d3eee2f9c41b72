"""`enclave-server`: boots the enclave application and serves the parent.

Configuration: flags, or environment variables of the same names (NITRO_ENCLAVE_CONFIG,
NITRO_ENCLAVE_LISTEN, NITRO_NSM, NITRO_LOG_LEVEL).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from protocol import logs


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="enclave-server", description=__doc__)
    parser.add_argument(
        "--config",
        default=os.environ.get("NITRO_ENCLAVE_CONFIG", "/app/config/enclave.json"),
        help="the measured configuration file (env NITRO_ENCLAVE_CONFIG)",
    )
    parser.add_argument(
        "--listen",
        default=os.environ.get("NITRO_ENCLAVE_LISTEN", "vsock://4294967295:5000"),
        help="where to accept the parent: vsock://CID:PORT, unix:///path, tcp://host:port",
    )
    parser.add_argument(
        "--nsm",
        default=os.environ.get("NITRO_NSM", "/dev/nsm"),
        help="the NSM: /dev/nsm, or unix:///path of the NSM emulator (env NITRO_NSM)",
    )
    parser.add_argument("--log-level", default=os.environ.get("NITRO_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    log = logs.configure("enclave", args.log_level)

    # Imported here so that `--help` is fast and importing this module loads no model.
    from enclave.boot import Identity, is_debug_mode, seed_entropy
    from enclave.config import ConfigError, EnclaveConfig
    from enclave.engine import load_engine
    from enclave.kms import AttestedKms
    from enclave.nsm import open_nsm
    from enclave.server import EnclaveServer
    from protocol.nsm import NsmError
    from protocol.transport import Address

    try:
        config = EnclaveConfig.load(args.config)
        address = Address.parse(args.listen)
    except (ConfigError, ValueError) as exc:
        print(f"enclave-server: {exc}", file=sys.stderr)
        return 2
    try:
        nsm = open_nsm(args.nsm)
        mixed = seed_entropy(nsm)
        debug = is_debug_mode(nsm)
    except (NsmError, OSError, ValueError) as exc:
        # No NSM, no attestation, no keys: refusing to start is the only safe answer.
        print(f"enclave-server: cannot use the NSM at {args.nsm}: {exc}", file=sys.stderr)
        return 2
    identity = Identity.generate()  # after the pool was seeded
    plaintext_log = config.debug_plaintext_log and debug
    logs.event(
        log,
        "boot",
        entropy_bytes=mixed,
        debug_mode=debug,
        plaintext_log=plaintext_log,
        key_ids=len(config.key_ids),
        kms_endpoint=config.endpoint_url,
    )
    if config.debug_plaintext_log and not debug:
        logs.event(log, "plaintext_log_refused", reason="not a debug-mode enclave")

    kms = AttestedKms(config, nsm, identity)

    def load_model() -> Any:
        if config.model_manifest_sha256:  # sealed: pulled from the parent, opened in memory
            from enclave.model_loader import load_sealed_engine

            return load_sealed_engine(config, kms)
        return load_engine(
            Path(config.model_dir),
            config.engine,
            max_prompt_tokens=config.max_prompt_tokens,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
        )

    server = EnclaveServer(
        config,
        nsm,
        identity,
        kms,
        load_model,
        plaintext_log=plaintext_log,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.shutdown())
    serving = threading.Event()
    server.serve(address, serving)
    logs.event(log, "stopped", requests=server.stats.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
