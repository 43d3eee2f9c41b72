#!/usr/bin/env bash
# Start the enclave on the parent instance (production mode unless --debug).
#
#   scripts/run_enclave.sh [--eif nitro-llm.eif] [--cpu-count N] [--memory MIB] [--cid 16]
#                          [--debug] [--dry-run]
#
# --cpu-count and --memory default to allocator.yaml's cpu_count and memory_mib (the allocator
# must have reserved them: copy allocator.yaml to /etc/nitro_enclaves/ and restart
# nitro-enclaves-allocator). The enclave listens on vsock port 5000 at --cid; the parent proxy
# reaches it as vsock://CID:5000. --debug adds --debug-mode --attach-console: the console shows
# the enclave's logs, but PCR0-2 are then all zeros, and the strict key policy (and the chatbot)
# refuse such an enclave. --dry-run prints the nitro-cli command instead of running it.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
die() { echo "run_enclave: $*" >&2; exit 2; }
allocator() {  # allocator KEY: the value of KEY in allocator.yaml
    sed -n "s/^$1:[[:space:]]*\([0-9][0-9]*\).*/\1/p" "$ROOT/allocator.yaml" | head -n 1
}

EIF="nitro-llm.eif" CPUS="$(allocator cpu_count)" MEMORY="$(allocator memory_mib)" CID=16
DEBUG=no DRY_RUN=no
while [ $# -gt 0 ]; do
    case "$1" in
        --eif) EIF="${2:?}"; shift 2 ;;
        --cpu-count) CPUS="${2:?}"; shift 2 ;;
        --memory) MEMORY="${2:?}"; shift 2 ;;
        --cid) CID="${2:?}"; shift 2 ;;
        --debug) DEBUG=yes; shift ;;
        --dry-run) DRY_RUN=yes; shift ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
for value in "$CPUS" "$MEMORY" "$CID"; do
    case "$value" in ''|*[!0-9]*) die "--cpu-count, --memory and --cid must be numbers" ;; esac
done
[ "$CID" -ge 4 ] || die "--cid must be 4 or more (0-3 are reserved)"

CMD=(nitro-cli run-enclave --eif-path "$EIF" --cpu-count "$CPUS" --memory "$MEMORY"
     --enclave-cid "$CID")
if [ "$DEBUG" = yes ]; then
    CMD+=(--debug-mode --attach-console)
    cat >&2 <<'WARN'
run_enclave: WARNING: debug mode. The enclave's memory and console are readable from this
run_enclave: instance, and its attestation documents carry PCR0, PCR1 and PCR2 as all zeros.
run_enclave: The strict key policy refuses it (KMS answers AccessDenied: no data key, no answer)
run_enclave: and chatbot refuses it unless --allow-debug. Never use debug mode with real data.
WARN
fi
if [ "$DRY_RUN" = yes ]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
command -v nitro-cli >/dev/null || die "nitro-cli is not installed (aws-nitro-enclaves-cli)"
[ -f "$EIF" ] || die "$EIF not found: build it with scripts/build_enclave.sh"
exec "${CMD[@]}"
