#!/usr/bin/env bash
# `make image-test`: build the enclave image for real and make it answer a question, no AWS.
#
# Installs docker.io and debootstrap if missing (Debian, as root), starts dockerd if no daemon
# answers (and stops it at the end), makes a minimal bookworm base image with debootstrap (cached
# in .cache/enclave-image/), then scripts/image_test.py: the KMS emulator with a key, the enclave
# image built twice from the same inputs with no network (content digests compared), the image
# run with --network none talking to the NSM emulator, a stand-in for vsock-proxy and the parent
# proxy through unix sockets in a shared directory, and one question from `chatbot`.
#
# Expected duration on 2 cores: about 25 minutes on a fresh machine (packages, debootstrap, a
# 260 MB wheelhouse, four image builds; 16 min measured with only the OS and wheels cached),
# about 8-10 minutes when docker and .cache/enclave-image are warm (8 min 18 s measured).
# Every step prints its elapsed time; every wait is bounded.
#   scripts/image_test.sh [--base-only]   (--base-only: make the base OS image and stop)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
CACHE="$ROOT/.cache/enclave-image"
OS_IMAGE="nitro-llm-os:bookworm"
OS_TAR="$CACHE/os-bookworm.tar"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
STARTED=$(date +%s)
DOCKERD_PID=""

step() { echo "image-test [$(( $(date +%s) - STARTED )) s] $*"; }
die() { echo "image-test: error: $*" >&2; exit 1; }

cleanup() {
    local rc=$?
    if [ -n "$DOCKERD_PID" ]; then
        step "stopping the docker daemon this run started (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 1 30); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 1
        done
        kill -9 "$DOCKERD_PID" 2>/dev/null || true
    fi
    step "done (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT

BASE_ONLY=no
[ "${1:-}" = "--base-only" ] && BASE_ONLY=yes
[ -x "$PY" ] || die "$PY not found: run make venv first"
mkdir -p "$CACHE"

# ---- tools ------------------------------------------------------------------------------------
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    [ "$(id -u)" = 0 ] || die "docker.io and debootstrap are missing and this is not root"
    step "installing docker.io and debootstrap (apt-get, about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq
    timeout 900 apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi

# ---- the daemon -------------------------------------------------------------------------------
if ! timeout 20 docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "no docker daemon answers and this is not root to start one"
    step "starting dockerd (no bridge, no iptables: containers run with --network none)"
    dockerd --iptables=false --ip6tables=false --bridge=none >"$CACHE/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 60); do
        timeout 5 docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || die "dockerd exited: see $CACHE/dockerd.log"
        sleep 1
    done
    timeout 5 docker info >/dev/null 2>&1 || die "dockerd not answering after 60 s"
fi

# ---- the base OS image ------------------------------------------------------------------------
if ! docker image inspect "$OS_IMAGE" >/dev/null 2>&1; then
    if [ ! -f "$OS_TAR" ]; then
        step "debootstrap --variant=minbase bookworm with python3 (a few minutes, once)"
        rm -rf "$CACHE/rootfs.partial"
        timeout 1800 debootstrap --variant=minbase --include=python3,python3-venv \
            bookworm "$CACHE/rootfs.partial" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || die "debootstrap failed: see $CACHE/debootstrap.log"
        # What only the machine that ran debootstrap had: its package cache, lists and resolver.
        rm -rf "$CACHE"/rootfs.partial/var/cache/apt/archives/*.deb \
            "$CACHE"/rootfs.partial/var/lib/apt/lists/* "$CACHE/rootfs.partial/etc/resolv.conf"
        tar --numeric-owner -C "$CACHE/rootfs.partial" -cf "$OS_TAR.partial" .
        mv "$OS_TAR.partial" "$OS_TAR"
        rm -rf "$CACHE/rootfs.partial"
    fi
    step "docker import $OS_TAR as $OS_IMAGE"
    docker import --change 'CMD ["/bin/sh"]' "$OS_TAR" "$OS_IMAGE" >/dev/null
fi
[ "$BASE_ONLY" = yes ] && exit 0

# ---- the rest: KMS, build twice, run, ask -----------------------------------------------------
step "scripts/image_test.py (builds, runs and asks; progress below)"
"$PY" scripts/image_test.py --os-image "$OS_IMAGE" --started "$STARTED"
