"""The `fast` backend: BLOOM in plain torch with int8 weights, batching many sequences per step.

Weights are prepared ahead (`scripts/save_model.py --quantize`): per-output-channel symmetric
int8 for every linear layer and for the tied embedding / output layer. The matrix products run in
our AVX2 kernel (`enclave/_int8mm.c`, see `_KernelLinear`) or, where it is not built or the CPU
lacks AVX2, in fbgemm's (`_Int8Linear`); either way each row of activations is quantized on its
own, so a sequence's numbers never depend on what it is batched with. docs/performance.md says why.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    from enclave import _int8mm
except ImportError:  # not built (no compiler where it was installed): fbgemm instead
    _int8mm = None

PREPARED_FILE = "model-int8.safetensors"
PREPARED_FORMAT = "nitro-llm-bloom-int8"
PREPARED_VERSION = "1"
# Copied alongside the prepared weights: what the tokenizer and the model shape need.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
MODEL_FILES_OPTIONAL = ("special_tokens_map.json",)
PACK_SLICE_ROWS = 16384
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
PREPARE_COMMAND = "python scripts/save_model.py --quantize SRC_DIR DST_DIR"
_LINEARS = (
    "self_attention.query_key_value",
    "self_attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)


# The int8 kernel in use: "avx2" (ours) or "fbgemm" (torch's). NITRO_INT8_KERNEL=fbgemm chooses
# torch's even where ours is built (to compare them).
INT8_KERNEL = (
    "avx2"
    if _int8mm is not None
    and _int8mm.supported()
    and os.environ.get("NITRO_INT8_KERNEL", "avx2") != "fbgemm"
    else "fbgemm"
)


class PreparedWeightsError(Exception):
    """A model directory has no (or unusable) prepared weights; the message says what to run."""


@dataclass(frozen=True)
class BloomShape:
    vocab_size: int
    hidden_size: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float
    eos_token_id: int

    @classmethod
    def from_config(cls, path: Path) -> BloomShape:
        return cls.from_config_bytes(Path(path).read_bytes(), path)

    @classmethod
    def from_config_bytes(cls, data: bytes, path: Path | str = "config.json") -> BloomShape:
        """The shape from config.json's bytes (`path` only names it in errors)."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PreparedWeightsError(f"{path} is not JSON") from exc
        if raw.get("model_type") != "bloom":
            raise PreparedWeightsError(f"{path} is not a BLOOM configuration")
        if raw.get("apply_residual_connection_post_layernorm", False):
            raise PreparedWeightsError("apply_residual_connection_post_layernorm is not supported")
        if raw.get("pretraining_tp", 1) > 1 and raw.get("slow_but_exact", False):
            raise PreparedWeightsError("slow_but_exact tensor parallelism is not supported")
        try:
            return cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw.get("hidden_size", raw.get("n_embed"))),
                n_layer=int(raw.get("n_layer", raw.get("num_hidden_layers"))),
                n_head=int(raw.get("n_head", raw.get("num_attention_heads"))),
                layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
                eos_token_id=int(raw["eos_token_id"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PreparedWeightsError(f"{path} lacks a usable BLOOM field: {exc}") from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head


# ---- preparing the weights (ahead of the enclave: at image build) -----------------------------


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (output channel): weight ~= q * scale[:, None]."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def prepare_model(src_dir: Path, dst_dir: Path) -> Path:
    """Write DST_DIR: SRC_DIR's tokenizer and config plus its weights as int8 (safetensors).

    SRC_DIR is a transformers `save_pretrained` BLOOM directory (fp32, fp16 or bf16 weights).
    Returns the prepared file's path. DST_DIR may equal SRC_DIR (the file is added beside).
    """
    from safetensors.torch import load_file, save_file

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    BloomShape.from_config(src_dir / "config.json")  # refuses what the forward cannot run
    state = _load_hf_state(src_dir, load_file)
    tensors: dict[str, torch.Tensor] = {}
    embedding = state["word_embeddings.weight"]
    tensors["word_embeddings.qweight"], tensors["word_embeddings.scale"] = quantize_rows(embedding)
    for name, value in state.items():
        if name.endswith(".weight") and name.removesuffix(".weight").split(".", 2)[-1] in _LINEARS:
            base = name.removesuffix(".weight")
            tensors[f"{base}.qweight"], tensors[f"{base}.scale"] = quantize_rows(value)
        elif name != "word_embeddings.weight":
            tensors[name] = value.detach().float().contiguous()
    dst_dir.mkdir(parents=True, exist_ok=True)
    if dst_dir.resolve() != src_dir.resolve():
        for name in MODEL_FILES + MODEL_FILES_OPTIONAL:
            if (src_dir / name).is_file():
                shutil.copyfile(src_dir / name, dst_dir / name)
            elif name in MODEL_FILES:
                raise PreparedWeightsError(f"{src_dir} has no {name}")
    out = dst_dir / PREPARED_FILE
    staging = out.with_name(f".{PREPARED_FILE}.partial")
    save_file(tensors, staging, metadata={"format": PREPARED_FORMAT, "version": PREPARED_VERSION})
    staging.replace(out)
    for path in dst_dir.iterdir():
        if path.is_file():
            path.chmod(0o644)
    return out


def _load_hf_state(src_dir: Path, load_file: Any) -> dict[str, torch.Tensor]:
    """The BLOOM weights of a save_pretrained directory, named without the `transformer.` prefix."""
    files = sorted(src_dir.glob("model*.safetensors"))
    files = [f for f in files if f.name != PREPARED_FILE]
    if not files:
        raise PreparedWeightsError(f"{src_dir} has no model*.safetensors weights to prepare")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        for name, value in load_file(path).items():
            state[name.removeprefix("transformer.")] = value
    if "word_embeddings.weight" not in state:
        raise PreparedWeightsError(f"{src_dir} holds no BLOOM word embeddings")
    if "lm_head.weight" in state and not torch.equal(
        state.pop("lm_head.weight"), state["word_embeddings.weight"]
    ):
        raise PreparedWeightsError("only BLOOM with a tied output layer is supported")
    return state


# ---- the linear layers -------------------------------------------------------------------------


class _Fp32Linear:
    """x @ W.T + b in fp32: the exact path, used to check the forward against transformers."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight.float().contiguous(), bias

    def __call__(self, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
        with _Threads(threads):
            return torch.nn.functional.linear(x, self.weight, self.bias)


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


def _resident_int8(blocks: Iterable[torch.Tensor], rows: int) -> torch.Tensor:
    """An int8 matrix of `rows` rows copied from `blocks` into memory of its own on 2 MiB pages.

    Our kernel reads every weight once a step: on 4 KiB pages that is a TLB miss every 4 KiB, on
    2 MiB pages (transparent huge pages, where the kernel allows them) almost none. Measured 4 %
    faster at batch 1 and 11 % at batch 8 (docs/performance.md). The blocks are consumed one at a
    time, each from a mapping of its own, so the file's pages never all count at once.
    """
    matrix = None
    start = 0
    for block in blocks:
        if matrix is None:
            count = rows * block.shape[1]
            buffer = torch.empty(count + _HUGE_PAGE, dtype=torch.int8)  # untouched: not resident
            offset = (-buffer.data_ptr()) % _HUGE_PAGE
            matrix = buffer[offset : offset + count].view(rows, block.shape[1])
            _advise_huge_pages(matrix.data_ptr(), count)  # before its pages are first written
        if start + block.shape[0] > rows or block.shape[1] != matrix.shape[1]:
            raise PreparedWeightsError("an int8 matrix and its scales differ in rows")
        matrix[start : start + block.shape[0]].copy_(block)
        start += block.shape[0]
    if matrix is None or start != rows:
        raise PreparedWeightsError("an int8 matrix and its scales differ in rows")
    return matrix


def _advise_huge_pages(address: int, length: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass  # not glibc, or no madvise: 4 KiB pages, a few percent slower


def _kernel_fits(columns: int) -> bool:
    """Whether our kernel takes a matrix of this many columns (multiples of its 32-byte steps)."""
    return INT8_KERNEL == "avx2" and columns % 32 == 0


class _KernelLinear:
    """x @ W.T + b with W int8 per output channel, in our AVX2 kernel (enclave/_int8mm.c).

    The same arithmetic as `_Int8Linear` (each row mapped onto [0, 1] by its own minimum and
    range, 7-bit codes, exact integer sums), done in one call: the row quantization, the product
    and the undoing of the map. The kernel reads W as it lies, row after row (prefetching the rows
    ahead): no packed copy, and the output layer's W is also the embedding's. At one or two rows
    it streams the weights about a fifth faster than fbgemm (docs/performance.md).
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.shape[0] != scale.shape[0]:
            raise PreparedWeightsError("an int8 matrix and its scales differ in rows")
        self.weight = qweight.contiguous()  # a view of the mapping when it already is
        self.scale = (scale.float() / 127).contiguous()  # 7-bit codes: x' = code / 127
        # In blocks: a sum in int32 converts its input first (1 GiB for the output layer at once).
        sums = [
            self.weight[start : start + PACK_SLICE_ROWS].sum(dim=1, dtype=torch.int32)
            for start in range(0, self.weight.shape[0], PACK_SLICE_ROWS)
        ]
        self.rowsum = (torch.cat(sums).float() * scale).contiguous()
        self.bias = (bias if bias is not None else torch.zeros_like(self.rowsum)).float()
        self.bias = self.bias.contiguous()
        if self.bias.shape != self.rowsum.shape:
            raise PreparedWeightsError("an int8 matrix and its bias differ in rows")

    def __call__(self, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
        """x @ W.T + b; the product runs on `threads` threads (the caller's and the kernel's)."""
        # The kernel trusts these sizes: a wrong one would read past the ends of the buffers.
        if x.dim() != 2 or x.shape[1] != self.weight.shape[1] or x.shape[0] < 1:
            raise ValueError(f"int8 linear: input {tuple(x.shape)} for {tuple(self.weight.shape)}")
        x = x.to(torch.float32).contiguous()
        rows, columns = x.shape
        out = torch.empty((rows, self.weight.shape[0]), dtype=torch.float32)
        _int8mm.linear(
            x.data_ptr(),
            rows,
            columns,
            self.weight.data_ptr(),
            self.weight.shape[0],
            self.scale.data_ptr(),
            self.rowsum.data_ptr(),
            self.bias.data_ptr(),
            out.data_ptr(),
            threads,
        )
        return out


class _Int8Linear:
    """x @ W.T + b with W int8 per output channel, in fbgemm's int8 x int8 kernels.

    fbgemm quantizes its whole input with one scale, so rows batched together would change each
    other's rounding. Each row is first mapped affinely onto exactly [0, 1] (its minimum to 0, its
    maximum to 1), which makes the batch's range [0, 1] whatever the batch holds: every row is
    quantized as it would be alone (per-token quantization). The affine map is undone on the
    output: W x = span * (W x') + low * rowsum(W).

    Large matrices are packed in slices of output rows: packing makes transient copies, and
    slices keep that peak small (the output layer alone has 250880 rows).
    """

    def __init__(
        self, slices: Iterable[torch.Tensor], scale: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """`slices`: the int8 matrix as consecutive blocks of rows, each read only once."""
        self.packed, sums = [], []
        self.bounds: list[tuple[int, int]] = []  # each packed slice's output columns
        start = 0
        for block in slices:
            self.packed.append(_pack(block, scale[start : start + block.shape[0]]))
            sums.append(block.sum(dim=1, dtype=torch.int32))  # converts only this block
            self.bounds.append((start, start + block.shape[0]))
            start += block.shape[0]
        if start != scale.shape[0]:
            raise PreparedWeightsError("an int8 matrix and its scales differ in rows")
        self.rowsum = torch.cat(sums).float() * scale
        self.bias = (bias if bias is not None else torch.zeros_like(self.rowsum)).float()

    @classmethod
    def of(
        cls,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        slice_rows: int = PACK_SLICE_ROWS,
    ) -> _Int8Linear:
        rows = qweight.shape[0]
        blocks = (qweight[start : start + slice_rows] for start in range(0, rows, slice_rows))
        return cls(blocks, scale, bias)

    def __call__(self, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
        """x @ W.T + b; the matrix products run on `threads` threads (the rest on the caller's)."""
        if x.shape[0] == 1:
            # One row (batch-1 decode): one pass for both ends, the same numbers as below.
            low, high = torch.aminmax(x)
        else:
            # amin and amax are vectorized; aminmax along a dimension is several times slower.
            low = x.amin(dim=1, keepdim=True)
            high = x.amax(dim=1, keepdim=True)
        span = high.sub_(low).clamp_min_(1e-30)  # a constant row: zeros
        unit = (x - low).div_(span)
        # reduce_range (7-bit activations) keeps AVX2's 16-bit pair sums from saturating.
        # The rest is elementwise (no matrix product), so that a row's result never depends on M.
        if len(self.packed) == 1:
            with _Threads(threads):
                y = torch.ops.quantized.linear_dynamic(unit, self.packed[0], True)
            if low.dim() == 0:  # one row: the scalars broadcast into [N], the same products
                return torch.addcmul(self.bias, low, self.rowsum).addcmul_(y[0], span)[None]
            return torch.addcmul(self.bias, low, self.rowsum).addcmul_(y, span)
        # The output layer (250880 columns): each slice finished while its product is in cache.
        out = torch.empty((x.shape[0], self.rowsum.shape[0]))
        rows = out[0] if low.dim() == 0 else out  # one row: [N] for the scalars, as above
        with _Threads(threads):
            for (start, end), packed in zip(self.bounds, self.packed, strict=True):
                y = torch.ops.quantized.linear_dynamic(unit, packed, True)
                part = rows[..., start:end]
                torch.addcmul(self.bias[start:end], low, self.rowsum[start:end], out=part)
                part.addcmul_(y[0] if low.dim() == 0 else y, span)
        return out


class _Threads:
    """torch's intra-op thread count set to `count` inside a `with` block, restored after.

    A step is over a thousand small operations (attention per sequence, layer norms, each row's
    scaling) around 97 matrix products. Run on two OpenMP threads, every small operation is a
    parallel region that waits for both threads: microseconds of work, and a whole time slice
    whenever the second thread is descheduled (a shared machine, or the server's other threads).
    So a step runs on its calling thread alone and hands the threads to the matrix products.
    """

    __slots__ = ("before", "count")

    def __init__(self, count: int) -> None:
        self.count = count
        self.before = count

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        if self.before != self.count:
            torch.set_num_threads(self.count)

    def __exit__(self, *exc: object) -> None:
        if self.before != self.count:
            torch.set_num_threads(self.before)


def _pack(qweight: torch.Tensor, scale: torch.Tensor) -> Any:
    with warnings.catch_warnings():
        # Quantized tensors are deprecated in torch; docs/performance.md weighs that.
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(
            qweight.contiguous(), scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
        )
    return torch.ops.quantized.linear_prepack(qw, None)


# ---- the model ---------------------------------------------------------------------------------


@dataclass
class _Layer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv: Any
    dense: Any
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    up: Any
    down: Any


class KvCache:
    """One sequence's keys and values, sized for its prompt and its largest answer."""

    def __init__(self, shape: BloomShape, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        # [layer, key|value, head, position, head_dim]
        self.kv = torch.empty((shape.n_layer, 2, shape.n_head, capacity, shape.head_dim))

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


@dataclass
class Work:
    """One sequence's share of a step: its new tokens, and whether it needs the last logits."""

    cache: KvCache
    tokens: Sequence[int]
    want_logits: bool


class BloomForward:
    """BLOOM's forward pass over many sequences at once, each with its own KV cache.

    The linear layers see every new token of every sequence as one matrix; attention runs per
    sequence, on that sequence's cache alone. `step` returns the last position's logits for each
    sequence that asked for them.
    """

    def __init__(
        self,
        shape: BloomShape,
        embedding: torch.Tensor,
        embedding_scale: torch.Tensor | None,
        lm_head: Any,
        tensors: dict[str, torch.Tensor],
        layers: list[_Layer],
    ) -> None:
        self.shape = shape
        self.embedding = embedding  # int8 rows (with embedding_scale) or fp32 rows
        self.embedding_scale = embedding_scale
        self.lm_head = lm_head
        self.emb_ln = (
            tensors["word_embeddings_layernorm.weight"],
            tensors["word_embeddings_layernorm.bias"],
        )
        self.ln_f = (tensors["ln_f.weight"], tensors["ln_f.bias"])
        self.layers = layers
        self.slopes = _alibi_slopes(shape.n_head)  # [H]
        self.inv_norm = 1.0 / math.sqrt(shape.head_dim)
        self._alibi_table = torch.zeros((shape.n_head, 1, 0))

    # -- construction --

    @classmethod
    def from_prepared(cls, model_dir: Path) -> BloomForward:
        """The int8 model from DIR/model-int8.safetensors (written by `prepare_model`)."""
        from safetensors import safe_open

        model_dir = Path(model_dir)
        path = model_dir / PREPARED_FILE
        if not path.is_file():
            raise PreparedWeightsError(
                f"{model_dir} has no prepared int8 weights ({PREPARED_FILE}); "
                f"prepare them ahead with: {PREPARE_COMMAND}"
            )
        shape = BloomShape.from_config(model_dir / "config.json")
        _return_freed_memory()
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != PREPARED_FORMAT or meta.get("version") != PREPARED_VERSION:
                raise PreparedWeightsError(
                    f"{path} is not in format {PREPARED_FORMAT} v{PREPARED_VERSION}; "
                    f"prepare it again with: {PREPARE_COMMAND}"
                )
            names = set(f.keys())
            if "word_embeddings.qweight" not in names or tuple(
                f.get_slice("word_embeddings.qweight").get_shape()
            ) != (shape.vocab_size, shape.hidden_size):
                raise PreparedWeightsError(f"{path} does not match {model_dir / 'config.json'}")
            # Everything but the int8 matrices, copied out of the mapping.
            small = {n: f.get_tensor(n).clone() for n in names if not n.endswith(".qweight")}

        def take(name: str) -> torch.Tensor:
            if name not in small:
                raise PreparedWeightsError(f"{path} lacks {name}")
            return small[name]

        def blocks(name: str, rows: int) -> Iterator[torch.Tensor]:
            # Each block from a mapping of its own, closed once fbgemm packed its copy: the
            # file's pages never all count at once, so the peak stays near the packed size.
            if name not in names:
                raise PreparedWeightsError(f"{path} lacks {name}")
            for start in range(0, rows, PACK_SLICE_ROWS):
                with safe_open(path, framework="pt") as f:
                    yield f.get_slice(name)[start : start + PACK_SLICE_ROWS]

        def linear(base: str, bias: bool = True) -> _Int8Linear | _KernelLinear:
            scale = take(f"{base}.scale")
            bias_ = take(f"{base}.bias") if bias else None
            matrix = blocks(f"{base}.qweight", scale.shape[0])
            if _kernel_fits(shape.hidden_size):
                return _KernelLinear(_resident_int8(matrix, scale.shape[0]), scale, bias_)
            return _Int8Linear(matrix, scale, bias_)

        layers = [cls._layer(take, linear, f"h.{i}") for i in range(shape.n_layer)]
        lm_head = linear("word_embeddings", bias=False)
        if isinstance(lm_head, _KernelLinear):
            embedding = lm_head.weight  # the tied matrix, resident once for both uses
        else:
            # The embedding's rows are read in place from a mapping of their own: only the rows
            # of tokens actually seen become resident.
            with safe_open(path, framework="pt") as f:
                embedding = f.get_tensor("word_embeddings.qweight")
        tensors = {
            name: take(name)
            for name in (
                "word_embeddings_layernorm.weight",
                "word_embeddings_layernorm.bias",
                "ln_f.weight",
                "ln_f.bias",
            )
        }
        model = cls(shape, embedding, take("word_embeddings.scale"), lm_head, tensors, layers)
        _return_freed_memory()
        return model

    @classmethod
    def from_prepared_bytes(cls, config: bytes, weights: bytes) -> BloomForward:
        """The int8 model from the bytes of config.json and model-int8.safetensors, in memory.

        For a sealed model decrypted inside the enclave: nothing is read from or written to a
        disk. The weights are parsed by safetensors (one copy); each int8 matrix is dropped as
        soon as it is copied onto huge pages for our kernel (or packed for fbgemm), so the peak
        is about twice the file (the bytes and the parsed copy) plus the output layer's copy.
        """
        from safetensors.torch import load

        shape = BloomShape.from_config_bytes(config)
        header_len = int.from_bytes(weights[:8], "little")
        try:
            header = json.loads(weights[8 : 8 + min(header_len, 1 << 24)])
            meta = header.get("__metadata__") or {}
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise PreparedWeightsError(f"{PREPARED_FILE} has no safetensors header") from exc
        if meta.get("format") != PREPARED_FORMAT or meta.get("version") != PREPARED_VERSION:
            raise PreparedWeightsError(
                f"{PREPARED_FILE} is not in format {PREPARED_FORMAT} v{PREPARED_VERSION}"
            )
        state = load(weights)
        embedding = state.get("word_embeddings.qweight")
        if embedding is None or tuple(embedding.shape) != (shape.vocab_size, shape.hidden_size):
            raise PreparedWeightsError(f"{PREPARED_FILE} does not match config.json")

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise PreparedWeightsError(f"{PREPARED_FILE} lacks {name}")
            return state[name]

        def linear(base: str, bias: bool = True) -> _Int8Linear | _KernelLinear:
            scale = take(f"{base}.scale")
            qweight = take(f"{base}.qweight")
            bias_ = take(f"{base}.bias") if bias else None
            if base != "word_embeddings":
                del state[f"{base}.qweight"]  # copied or packed below; the dict's is not needed
            if _kernel_fits(shape.hidden_size):
                rows = scale.shape[0]
                return _KernelLinear(_resident_int8([qweight], rows), scale, bias_)
            return _Int8Linear.of(qweight, scale, bias_)

        layers = [cls._layer(take, linear, f"h.{i}") for i in range(shape.n_layer)]
        lm_head = linear("word_embeddings", bias=False)
        if isinstance(lm_head, _KernelLinear):
            embedding = lm_head.weight  # the tied matrix, resident once for both uses
            del state["word_embeddings.qweight"]
        model = cls(shape, embedding, take("word_embeddings.scale"), lm_head, state, layers)
        _return_freed_memory()
        return model

    @classmethod
    def from_hf_state(cls, shape: BloomShape, state: dict[str, torch.Tensor]) -> BloomForward:
        """The fp32 model from a transformers state dict (names without `transformer.`)."""

        def take(name: str) -> torch.Tensor:
            return state[name].float()

        def linear(base: str, bias: bool = True) -> _Fp32Linear:
            return _Fp32Linear(take(f"{base}.weight"), take(f"{base}.bias") if bias else None)

        layers = [cls._layer(take, linear, f"h.{i}") for i in range(shape.n_layer)]
        embedding = take("word_embeddings.weight")
        return cls(shape, embedding, None, _Fp32Linear(embedding, None), state, layers)

    @staticmethod
    def _layer(take: Any, linear: Any, prefix: str) -> _Layer:
        return _Layer(
            ln1_w=take(f"{prefix}.input_layernorm.weight"),
            ln1_b=take(f"{prefix}.input_layernorm.bias"),
            qkv=linear(f"{prefix}.self_attention.query_key_value"),
            dense=linear(f"{prefix}.self_attention.dense"),
            ln2_w=take(f"{prefix}.post_attention_layernorm.weight"),
            ln2_b=take(f"{prefix}.post_attention_layernorm.bias"),
            up=linear(f"{prefix}.mlp.dense_h_to_4h"),
            down=linear(f"{prefix}.mlp.dense_4h_to_h"),
        )

    def new_cache(self, capacity: int) -> KvCache:
        return KvCache(self.shape, capacity)

    # -- the forward --

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.embedding[ids]
        if self.embedding_scale is not None:
            rows = rows.float() * self.embedding_scale[ids][:, None]
        return rows

    def step(self, work: Sequence[Work]) -> list[torch.Tensor | None]:
        """Feed each sequence its new tokens; return [vocab] logits where asked, else None.

        The matrix products use torch's intra-op threads (torch.set_num_threads); everything
        else runs on the calling thread alone (see `_Threads`).
        """
        threads = torch.get_num_threads()
        with _Threads(1):
            return self._step(work, threads)

    def _step(self, work: Sequence[Work], threads: int) -> list[torch.Tensor | None]:
        shape = self.shape
        eps = shape.layer_norm_epsilon
        hidden = shape.hidden_size
        n_head, head_dim = shape.n_head, shape.head_dim
        spans: list[tuple[int, int, int]] = []  # (row start, row count, cache position)
        ids: list[int] = []
        for item in work:
            if item.cache.length + len(item.tokens) > item.cache.capacity:
                raise ValueError("sequence longer than its cache")
            spans.append((len(ids), len(item.tokens), item.cache.length))
            ids.extend(item.tokens)
        rows = len(ids)
        x = self._embed(torch.tensor(ids, dtype=torch.long))
        x = torch.nn.functional.layer_norm(x, (hidden,), *self.emb_ln, eps)
        for index, layer in enumerate(self.layers):
            h = torch.nn.functional.layer_norm(x, (hidden,), layer.ln1_w, layer.ln1_b, eps)
            qkv = layer.qkv(h, threads).view(rows, n_head, 3, head_dim)
            if len(work) == 1:  # one sequence (batch-1 decode): no split, no concatenation
                context = self._attend(work[0].cache, index, spans[0][2], qkv)
            else:
                context = torch.cat(
                    [
                        self._attend(item.cache, index, position, qkv[start : start + count])
                        for item, (start, count, position) in zip(work, spans, strict=True)
                    ]
                )
            context = context.reshape(rows, hidden)
            x = layer.dense(context, threads).add_(x)
            h = torch.nn.functional.layer_norm(x, (hidden,), layer.ln2_w, layer.ln2_b, eps)
            # BLOOM's GELU is the tanh approximation.
            up = torch.nn.functional.gelu(layer.up(h, threads), approximate="tanh")
            x = layer.down(up, threads).add_(x)
        for item, (_, count, _) in zip(work, spans, strict=True):
            item.cache.length += count
        wanted = [i for i, item in enumerate(work) if item.want_logits]
        out: list[torch.Tensor | None] = [None] * len(work)
        if wanted:
            if len(work) == 1:
                h = x[rows - 1 :]
            else:
                h = x[torch.tensor([spans[i][0] + spans[i][1] - 1 for i in wanted])]
            h = torch.nn.functional.layer_norm(h, (hidden,), *self.ln_f, eps)
            logits = self.lm_head(h, threads)
            for row, i in enumerate(wanted):
                out[i] = logits[row]
        return out

    def _attend(self, cache: KvCache, layer: int, position: int, qkv: torch.Tensor) -> torch.Tensor:
        """Attention of `qkv`'s rows ([n, H, 3, D]) over the cache, after adding their keys."""
        count = qkv.shape[0]
        end = position + count
        kv = cache.kv[layer]
        kv[:, :, position:end] = qkv[:, :, 1:].permute(2, 1, 0, 3)
        bias = self._alibi(end)  # [H, 1, end]
        if count > 1:
            # Causal: query i (at position + i) sees keys up to position + i.
            mask = torch.ones((count, end), dtype=torch.bool).triu_(position + 1)
            bias = bias.masked_fill(mask, -math.inf)
        scores = torch.baddbmm(
            bias, qkv[:, :, 0].transpose(0, 1), kv[0, :, :end].transpose(1, 2), alpha=self.inv_norm
        )
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, kv[1, :, :end]).transpose(0, 1)  # [n, H, D]

    def _alibi(self, length: int) -> torch.Tensor:
        """ALiBi's bias, slope * key position (softmax ignores the per-query offset)."""
        if self._alibi_table.shape[-1] < length:
            positions = torch.arange(
                max(length, 2 * self._alibi_table.shape[-1]), dtype=torch.float32
            )
            self._alibi_table = self.slopes[:, None, None] * positions[None, None, :]
        return self._alibi_table[:, :, :length]


def _return_freed_memory() -> None:
    """glibc: serve blocks of 1 MiB and more by mmap, so freeing them returns them at once.

    By default glibc raises that threshold as big blocks are freed, and the blocks that packing
    reads and frees then stay in the heap: hundreds of MiB of resident memory for nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes, as BLOOM defines them (also for head counts not a power of 2)."""
    closest = 2 ** math.floor(math.log2(n_head))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base**p for p in range(1, closest + 1)]
    if closest != n_head:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, n_head - closest)
        slopes += [extra_base**p for p in range(1, 1 + 2 * remaining, 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def teacher_forced_logits(model: BloomForward, ids: Iterable[int]) -> torch.Tensor:
    """Logits at every position of `ids`, fed token by token: for agreement measurements."""
    ids = list(ids)
    cache = model.new_cache(len(ids))
    rows = []
    with torch.inference_mode():
        for token in ids:
            (logits,) = model.step([Work(cache, [token], True)])
            rows.append(logits)
    return torch.stack(rows)
