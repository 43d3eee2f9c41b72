#!/bin/sh
# The enclave image's entrypoint (Dockerfile.enclave). Inside a Nitro Enclave there is no network:
# bring up lo, make the measured configuration's KMS host resolve to 127.0.0.1, relay that port to
# the parent's vsock-proxy (CID 3, port 8000; NITRO_KMS_FORWARD_TARGET overrides it for a local
# stand-in), then run the server on vsock port 5000 (NITRO_ENCLAVE_LISTEN overrides it).
set -eu
: "${NITRO_ENCLAVE_CONFIG:=/app/config/enclave.json}"
export NITRO_ENCLAVE_CONFIG
python3 -m enclave.forwarder setup
python3 -m enclave.forwarder serve &
exec python3 -m enclave.main
