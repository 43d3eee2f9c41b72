"""Save the enclave's model into a directory: bloom-560m from the hub, or the tiny local BLOOM.

`python scripts/save_model.py DIR` downloads bigscience/bloom-560m (where a hub is reachable);
`python scripts/save_model.py --tiny DIR` trains the small BLOOM on the bundled FAQ text.
`python scripts/save_model.py --quantize SRC_DIR DST_DIR` prepares the fast backend's int8
weights from a saved model (SRC_DIR may equal DST_DIR), so the enclave converts nothing at boot.
Downloads and --tiny builds are prepared as well, unless --no-quantize.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ID = "bigscience/bloom-560m"
HUB_TIMEOUT_SECONDS = 10

# Runnable from a checkout without installing: the packages live at the repository root.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the model into")
    parser.add_argument(
        "--tiny", action="store_true", help="build the small local BLOOM instead of downloading"
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps (--tiny)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (--tiny)")
    parser.add_argument("--revision", default="main", help=f"revision of {REPO_ID} to download")
    parser.add_argument(
        "--quantize",
        type=Path,
        metavar="SRC_DIR",
        help="write OUT_DIR with SRC_DIR's tokenizer and the int8 weights of the fast backend",
    )
    parser.add_argument(
        "--no-quantize",
        action="store_true",
        help="skip the int8 weights (the reference backend alone can then serve the model)",
    )
    args = parser.parse_args(argv)
    if args.quantize is not None and (args.tiny or args.no_quantize):
        parser.error("--quantize goes alone: it reads a model saved before")
    return args


def quantize(src_dir: Path, out_dir: Path) -> Path:
    """The fast backend's prepared weights (enclave/fast_engine.py defines the format)."""
    from enclave.fast_engine import prepare_model

    return prepare_model(src_dir, out_dir)


def save_tiny(out_dir: Path, steps: int, seed: int) -> None:
    from emulator.tiny_model import build_tiny_model

    build_tiny_model(
        out_dir, steps=steps, seed=seed, progress=lambda line: print(line, file=sys.stderr)
    )


def save_bloom(out_dir: Path, revision: str) -> None:
    """Download the tokenizer and weights and save them (safetensors, with tokenizer.json)."""
    # Read by huggingface_hub when it is imported.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(HUB_TIMEOUT_SECONDS))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(HUB_TIMEOUT_SECONDS))
    check_hub_reachable()
    from transformers import AutoTokenizer, BloomForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(REPO_ID, revision=revision)
    model = BloomForCausalLM.from_pretrained(REPO_ID, revision=revision, dtype="auto")
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    if not (out_dir / "tokenizer.json").is_file():
        raise RuntimeError("the saved tokenizer has no tokenizer.json")


def check_hub_reachable() -> None:
    """One request with a short timeout: offline, huggingface_hub retries for about a minute."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if not endpoint.startswith("https://"):
        raise ValueError("HF_ENDPOINT must be an https:// URL")
    url = f"{endpoint}/api/models/{REPO_ID}"  # https only, checked above
    request = urllib.request.Request(url, method="HEAD")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=HUB_TIMEOUT_SECONDS):  # noqa: S310
            pass
    except urllib.error.HTTPError:
        pass  # the hub answered: let huggingface_hub report what it refused
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"{endpoint} is unreachable: {reason}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    started = time.monotonic()
    if args.quantize is not None:
        from enclave.fast_engine import PreparedWeightsError

        try:
            path = quantize(args.quantize, args.out_dir)
        except (PreparedWeightsError, ValueError, OSError, KeyError) as exc:
            print(f"save_model: could not prepare {args.quantize}: {exc}", file=sys.stderr)
            return 1
        print(f"prepared {path} in {time.monotonic() - started:.1f} s", file=sys.stderr)
        return 0
    if args.tiny:
        try:  # the build's own last progress line gives the time taken
            save_tiny(args.out_dir, args.steps, args.seed)
            if not args.no_quantize:
                quantize(args.out_dir, args.out_dir)
        except (ValueError, OSError) as exc:
            print(f"save_model: could not build the tiny model: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        save_bloom(args.out_dir, args.revision)
        if not args.no_quantize:
            quantize(args.out_dir, args.out_dir)
    except Exception as exc:  # any hub failure gets one line, not a traceback
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        print(
            f"save_model: could not download {REPO_ID} ({type(exc).__name__}: {reason}). "
            "Is the Hugging Face hub reachable from here? Use --tiny for the local model.",
            file=sys.stderr,
        )
        return 1
    print(f"saved to {args.out_dir} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
