#!/usr/bin/env bash
# Build the enclave image and its EIF, and write the measurements to pin in the key policy.
#
#   scripts/build_enclave.sh [--model-dir DIR] (--config enclave.json | --region R --key-id ARN...)
#       [--base-image IMAGE] [--tag nitro-llm:latest] [--wheelhouse DIR] [--app-root DIR]
#       [--eif nitro-llm.eif] [--measurements measurements.json]
#       [--signing-certificate CERT.pem --private-key KEY.pem] [--no-eif] [--no-cache]
#       [-- ARGS for scripts/render_key_policy.py]
#
# 1. downloads the wheelhouse on this machine (pip download --require-hashes, for CPython 3.11 on
#    manylinux x86_64) from enclave_base/requirements.lock;
# 2. docker build of enclave_base/Dockerfile (tag nitro-llm-enclave-base:latest) and of
#    Dockerfile.enclave (--tag), both with --network none: the build reaches nothing;
# 3. nitro-cli build-enclave (signed when a certificate and key are given, so PCR8 is set), its
#    JSON written to --measurements;
# 4. scripts/render_key_policy.py on those measurements, when arguments follow `--`.
# --model-dir is required unless the configuration names a sealed model (fed by the parent).
# SOURCE_DATE_EPOCH (default: the last commit's time) stamps every file the build adds, so that
# the same inputs give the same image content (docs/reproducibility.md).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
die() { echo "build_enclave: $*" >&2; exit 2; }
say() { echo "build_enclave: $*" >&2; }

MODEL_DIR="" CONFIG="" REGION="" KEY_IDS=() BASE_IMAGE="" TAG="nitro-llm:latest"
BASE_TAG="nitro-llm-enclave-base:latest" WHEELHOUSE="$ROOT/.cache/enclave-image/wheelhouse"
EIF="nitro-llm.eif" MEASUREMENTS="measurements.json" CERT="" KEY="" MAKE_EIF=yes
RENDER_ARGS=() NO_CACHE=() APP_ROOT="$ROOT"
while [ $# -gt 0 ]; do
    case "$1" in
        --model-dir) MODEL_DIR="${2:?}"; shift 2 ;;
        --config) CONFIG="${2:?}"; shift 2 ;;
        --region) REGION="${2:?}"; shift 2 ;;
        --key-id) KEY_IDS+=("${2:?}"); shift 2 ;;
        --base-image) BASE_IMAGE="${2:?}"; shift 2 ;;
        --app-root) APP_ROOT="${2:?}"; shift 2 ;;
        --tag) TAG="${2:?}"; shift 2 ;;
        --base-tag) BASE_TAG="${2:?}"; shift 2 ;;
        --wheelhouse) WHEELHOUSE="${2:?}"; shift 2 ;;
        --eif) EIF="${2:?}"; shift 2 ;;
        --measurements) MEASUREMENTS="${2:?}"; shift 2 ;;
        --signing-certificate) CERT="${2:?}"; shift 2 ;;
        --private-key) KEY="${2:?}"; shift 2 ;;
        --no-eif) MAKE_EIF=no; shift ;;
        --no-cache) NO_CACHE=(--no-cache); shift ;;
        -h|--help) usage 0 ;;
        --) shift; RENDER_ARGS=("$@"); break ;;
        *) echo "build_enclave: unknown argument $1" >&2; usage 2 ;;
    esac
done

if [ -n "$MODEL_DIR" ]; then
    [ -f "$MODEL_DIR/config.json" ] || die "$MODEL_DIR holds no model (no config.json)"
fi
if [ -n "$MODEL_DIR" ] && [ ! -f "$MODEL_DIR/model-int8.safetensors" ]; then
    say "warning: $MODEL_DIR has no int8 weights; the fast engine needs them" \
        "(python scripts/save_model.py --quantize $MODEL_DIR $MODEL_DIR)"
fi
if [ -n "$CONFIG" ] && { [ -n "$REGION" ] || [ ${#KEY_IDS[@]} -gt 0 ]; }; then
    die "give --config, or --region and --key-id, not both"
fi
if [ -z "$CONFIG" ] && { [ -z "$REGION" ] || [ ${#KEY_IDS[@]} -eq 0 ]; }; then
    die "give --config FILE, or --region R and --key-id ARN (the enclave's measured configuration)"
fi
[ -f "$APP_ROOT/enclave/main.py" ] && [ -f "$APP_ROOT/protocol/__init__.py" ] \
    || die "$APP_ROOT holds no enclave/ and protocol/"
if { [ -n "$CERT" ] && [ -z "$KEY" ]; } || { [ -z "$CERT" ] && [ -n "$KEY" ]; }; then
    die "--signing-certificate and --private-key go together"
fi
command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no docker daemon answers (start it, or run as a docker user)"
if [ "$MAKE_EIF" = yes ]; then
    command -v nitro-cli >/dev/null \
        || die "nitro-cli is not installed (on the parent: dnf install aws-nitro-enclaves-cli" \
            "aws-nitro-enclaves-cli-devel), or pass --no-eif to build the images only"
fi
if [ -z "$BASE_IMAGE" ]; then
    BASE_IMAGE="nitro-llm-os:bookworm"
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
        || die "no --base-image given and $BASE_IMAGE does not exist: pass e.g." \
            "--base-image python:3.11-slim-bookworm@sha256:<digest>, or build it with" \
            "scripts/image_test.sh --base-only"
fi

SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}"
export SOURCE_DATE_EPOCH
# The base image (OS + venv) is stamped with the time of the last commit that changed its inputs
# (enclave_base/), not the checkout's. Docker's layer cache matches a COPY by content and ignores
# times, so a cached venv layer keeps the times of the build that made it: those must be the
# times a build from scratch gives today, or two builds of one commit differ (docs/reproducibility.md).
BASE_EPOCH="${SOURCE_DATE_EPOCH_BASE:-$(git -C "$ROOT" log -1 --format=%ct -- enclave_base 2>/dev/null)}"
BASE_EPOCH="${BASE_EPOCH:-$SOURCE_DATE_EPOCH}"
BUILD="$ROOT/build/enclave-image"
rm -rf "$BUILD"
mkdir -p "$BUILD/base" "$BUILD/app/app/config" "$WHEELHOUSE"

# ---- the measured configuration ---------------------------------------------------------------
if [ -n "$CONFIG" ]; then
    cp "$CONFIG" "$BUILD/app/app/config/enclave.json"
else
    "$PY" - "$REGION" "$BUILD/app/app/config/enclave.json" "${KEY_IDS[@]}" <<'PYEOF'
import json, sys
region, out, *keys = sys.argv[1:]
config = {"region": region, "key_ids": keys, "model_dir": "/app/model"}
open(out, "w").write(json.dumps(config, indent=2) + "\n")
PYEOF
fi
PYTHONPATH="$ROOT" "$PY" - "$BUILD/app/app/config/enclave.json" "$MODEL_DIR" <<'PYEOF' || exit 2
import sys
from enclave.config import ConfigError, EnclaveConfig
model_dir = sys.argv[2]
try:
    config = EnclaveConfig.load(sys.argv[1])
except ConfigError as exc:
    sys.exit(f"build_enclave: {exc}")
if config.model_manifest_sha256:  # a sealed model comes from the parent's feed at boot
    if model_dir:
        sys.exit("build_enclave: the configuration names a sealed model: give no --model-dir")
elif config.model_dir != "/app/model":
    sys.exit('build_enclave: the measured configuration must say "model_dir": "/app/model"')
elif not model_dir:
    sys.exit("build_enclave: --model-dir is required (a saved model; see scripts/save_model.py)")
if config.ca_bundle and not config.ca_bundle.startswith("/app/config/"):
    sys.exit("build_enclave: ca_bundle must be a file under /app/config/ (staged beside it)")
PYEOF
# A CA bundle the configuration names travels beside it (config dir of --config).
CA_NAME="$(PYTHONPATH="$ROOT" "$PY" -c 'import sys; from enclave.config import EnclaveConfig as C
c = C.load(sys.argv[1]); print((c.ca_bundle or "").removeprefix("/app/config/"))' \
    "$BUILD/app/app/config/enclave.json")"
if [ -n "$CA_NAME" ]; then
    [ -n "$CONFIG" ] && [ -f "$(dirname "$CONFIG")/$CA_NAME" ] \
        || die "the configuration names ca_bundle $CA_NAME: put it beside --config"
    cp "$(dirname "$CONFIG")/$CA_NAME" "$BUILD/app/app/config/$CA_NAME"
fi

# ---- the runtime layer ------------------------------------------------------------------------
mkdir -p "$BUILD/base/wheelhouse"
cp "$ROOT/enclave_base/requirements.lock" "$BUILD/base/"
# Only the locked wheels (the cache may hold others), each checked against its hash; hard links
# when the disk allows. Exit 3: some are missing, so download them.
stage_wheels() {
    "$PY" - "$ROOT/enclave_base/requirements.lock" "$WHEELHOUSE" "$BUILD/base/wheelhouse" <<'PYEOF'
import hashlib, os, re, shutil, sys
from pathlib import Path
lock, source, dest = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = {
    norm(m[1]): (m[2], m[3])
    for m in re.finditer(r"^(\S+)==(\S+) \\\n\s+--hash=sha256:([0-9a-f]{64})", lock.read_text(), re.M)
}
for wheel in sorted(source.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    pin = pins.get(norm(name))
    if pin is None or pin[0] != version:
        continue
    if hashlib.sha256(wheel.read_bytes()).hexdigest() != pin[1]:
        continue
    target = dest / wheel.name
    if not target.exists():
        try:
            os.link(wheel, target)
        except OSError:
            shutil.copyfile(wheel, target)
    del pins[norm(name)]
if pins:
    print(f"build_enclave: {len(pins)} locked wheel(s) not in the wheelhouse yet", file=sys.stderr)
    sys.exit(3)
PYEOF
}
set +e
stage_wheels
staged=$?
set -e
if [ "$staged" = 3 ]; then
    say "downloading the wheelhouse into $WHEELHOUSE (hash-checked)"
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
        --only-binary=:all: --python-version=3.11 --implementation=cp --abi=cp311 \
        --platform=manylinux_2_28_x86_64 --platform=manylinux_2_17_x86_64 \
        --platform=manylinux2014_x86_64 \
        --dest "$WHEELHOUSE" -r "$ROOT/enclave_base/requirements.lock" 2> >(grep -v "is ignored" >&2)
    stage_wheels || die "the wheelhouse still lacks locked wheels (see above)"
elif [ "$staged" != 0 ]; then
    die "staging the wheelhouse failed"
fi

# Same bytes, same times, same modes, whoever checked out the files and when.
normalize() {  # normalize DIR EPOCH
    find "$1" -exec chmod u=rwX,go=rX {} + -exec touch -h -d "@$2" {} +
}
normalize "$BUILD/base" "$BASE_EPOCH"

build_image() {  # build_image DOCKERFILE CONTEXT TAG EPOCH DOCKER-BUILD-ARGS...
    local dockerfile="$1" context="$2" tag="$3" epoch="$4" started
    shift 4
    started=$(date +%s)
    say "docker build $tag (no network)"
    # The legacy builder: Debian's docker.io has no BuildKit client; its builds are plain layers.
    DOCKER_BUILDKIT=0 docker build --network none --quiet --file "$dockerfile" --tag "$tag" \
        --build-arg "SOURCE_DATE_EPOCH=$epoch" "$@" "$context" >/dev/null
    say "built $tag in $(( $(date +%s) - started )) s"
}
build_image "$ROOT/enclave_base/Dockerfile" "$BUILD/base" "$BASE_TAG" "$BASE_EPOCH" \
    "${NO_CACHE[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE"

# ---- the enclave image ------------------------------------------------------------------------
tar -C "$APP_ROOT" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.so' -cf - enclave protocol \
    | tar -C "$BUILD/app/app" -xf -
# The fast engine's AVX2 kernel, compiled here with fixed flags and no debug information or
# paths, so that two hosts with the same gcc put the same bytes in the image (and the same PCRs).
# Without a compiler the image runs fbgemm's kernels, about a sixth slower at one request.
KERNEL_SO="$BUILD/app/app/enclave/_int8mm$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
# The image runs Python 3.11: a kernel built against other headers would not load there.
[ "$("$PY" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" = True ] \
    || die "$PY is not Python 3.11, the image's: build with a 3.11 venv (PY=.venv/bin/python)"
if command -v gcc >/dev/null; then
    gcc -O3 -std=c11 -fPIC -shared -pthread -g0 -fno-ident -Wl,--build-id=none \
        -I "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
        -o "$KERNEL_SO" "$APP_ROOT/enclave/_int8mm.c" || die "the int8 kernel did not compile"
    touch -h -d "@$SOURCE_DATE_EPOCH" "$KERNEL_SO"
    say "compiled the int8 kernel with $(gcc --version | head -n 1)"
else
    say "warning: no gcc: the image runs fbgemm's int8 kernels (apt install gcc python3-dev)"
fi
# The fast engine reads model-int8.safetensors only: the fp32 weights stay out of the image then.
# A sealed model's image has an empty model directory.
if [ -z "$MODEL_DIR" ]; then
    mkdir -p "$BUILD/app/app/model"
else
PYTHONPATH="$ROOT" "$PY" - "$MODEL_DIR" "$BUILD/app/app/model" \
    "$BUILD/app/app/config/enclave.json" <<'PYEOF'
import shutil, sys
from pathlib import Path
from enclave.config import EnclaveConfig
source, dest = Path(sys.argv[1]), Path(sys.argv[2])
fast = EnclaveConfig.load(sys.argv[3]).engine == "fast"
prepared = (source / "model-int8.safetensors").is_file()
def fp32(name: str) -> bool:
    weights = name.startswith("model") and name.endswith(".safetensors")
    return (weights and name != "model-int8.safetensors") or name.startswith("pytorch_model")
skip = (lambda _d, names: [n for n in names if fp32(n)]) if fast and prepared else None
shutil.copytree(source, dest, symlinks=False, ignore=skip)
kept = sorted(p.name for p in dest.iterdir())
print(f"build_enclave: model files in the image: {', '.join(kept)}", file=sys.stderr)
PYEOF
fi
normalize "$BUILD/app" "$SOURCE_DATE_EPOCH"
# Always from scratch (a few seconds): a cached `COPY app/...` layer would keep the times of an
# earlier commit whose files had the same content.
build_image "$ROOT/Dockerfile.enclave" "$BUILD/app" "$TAG" "$SOURCE_DATE_EPOCH" --no-cache \
    --build-arg "BASE=$BASE_TAG"
docker image inspect --format '{{.Size}}' "$TAG" \
    | awk -v t="$TAG" '{printf "build_enclave: %s is %.0f MiB\n", t, $1 / 1048576}' >&2

[ "$MAKE_EIF" = yes ] || exit 0

# ---- the EIF and its measurements -------------------------------------------------------------
SIGN=()
[ -n "$CERT" ] && SIGN=(--signing-certificate "$CERT" --private-key "$KEY")
say "nitro-cli build-enclave -> $EIF, measurements -> $MEASUREMENTS"
nitro-cli build-enclave --docker-uri "$TAG" --output-file "$EIF" "${SIGN[@]}" > "$MEASUREMENTS"
cat "$MEASUREMENTS"
say "publish $MEASUREMENTS with this release: clients pin it with chatbot --expected-pcrs"
if [ ${#RENDER_ARGS[@]} -gt 0 ]; then
    "$PY" "$ROOT/scripts/render_key_policy.py" "$MEASUREMENTS" "${RENDER_ARGS[@]}"
fi
