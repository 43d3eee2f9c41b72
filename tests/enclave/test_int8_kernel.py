"""Tests for enclave/_int8mm.c through `_KernelLinear`: the fast engine's AVX2 int8 product."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from enclave import fast_engine
from enclave.fast_engine import (
    PREPARED_FILE,
    BloomForward,
    Work,
    _Int8Linear,
    _KernelLinear,
    quantize_rows,
)


def cpu_has_avx2() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split()
    return "avx2" in flags and "fma" in flags


requires_kernel = pytest.mark.skipif(
    fast_engine._int8mm is None or not cpu_has_avx2(), reason="no AVX2 kernel on this machine"
)


def test_the_kernel_is_built_and_chosen_where_the_cpu_has_avx2() -> None:
    # `make venv` (pip install -e .) compiles it; a broken build must not pass silently as
    # "fbgemm", which is a third slower at batch 1.
    if not cpu_has_avx2():
        pytest.skip("this CPU has no AVX2: fbgemm is the right choice")
    assert fast_engine._int8mm is not None, "enclave/_int8mm.c was not built (make venv)"
    if os.environ.get("NITRO_INT8_KERNEL") != "fbgemm":
        assert fast_engine.INT8_KERNEL == "avx2"


def layer_and_weight(rows_out: int, columns: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn((rows_out, columns), generator=generator)
    bias = torch.randn(rows_out, generator=generator)
    qweight, scale = quantize_rows(weight)
    return qweight, scale, bias, weight, generator


@requires_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 2, 3, 9, 17])
def test_rows_do_not_depend_on_their_batch_mates_or_the_threads(rows: int, threads: int) -> None:
    # 263 outputs: blocks of four, the tail of three, and thread shares of unequal length.
    qweight, scale, bias, weight, generator = layer_and_weight(263, 192, rows)
    layer = _KernelLinear(qweight, scale, bias)
    x = torch.randn((rows, 192), generator=generator) * torch.linspace(0.1, 30, rows)[:, None]
    together = layer(x, threads)
    alone = torch.cat([layer(x[i : i + 1], 1) for i in range(rows)])
    assert torch.equal(together, alone)
    exact = x @ weight.T + bias
    assert float((together - exact).norm() / (exact - bias).norm()) < 0.02


@requires_kernel
@pytest.mark.parametrize("columns", [32, 1024, 4096])
def test_it_is_as_accurate_as_fbgemm(columns: int) -> None:
    # The same arithmetic (7-bit codes of each row mapped onto [0, 1], exact integer sums); the
    # two round a code differently now and then (x * 127 / span against x / (1 / 127)).
    qweight, scale, bias, weight, generator = layer_and_weight(520, columns, columns)
    ours = _KernelLinear(qweight, scale, bias)
    theirs = _Int8Linear.of(qweight, scale, bias)
    x = torch.randn((5, columns), generator=generator) * 4 + 1
    exact = x @ weight.T + bias

    def error(y: torch.Tensor) -> float:
        return float((y - exact).norm() / (exact - bias).norm())

    assert error(ours(x, 2)) < 0.02
    assert error(ours(x, 2)) < 1.05 * error(theirs(x, 2))
    assert float((ours(x, 2) - theirs(x, 2)).norm() / (exact - bias).norm()) < 0.005


@requires_kernel
def test_a_constant_row_is_its_value_times_the_row_sums() -> None:
    qweight, scale, bias, weight, _ = layer_and_weight(40, 64, 7)
    layer = _KernelLinear(qweight, scale, bias)
    x = torch.full((1, 64), 2.5)
    expected = bias + 2.5 * qweight.sum(dim=1).float() * scale
    assert torch.allclose(layer(x)[0], expected, rtol=1e-5, atol=1e-5)


@requires_kernel
def test_bad_shapes_are_refused() -> None:
    qweight, scale, bias, _, _ = layer_and_weight(8, 48, 1)  # 48 columns: not steps of 32
    layer = _KernelLinear(qweight, scale, bias)
    with pytest.raises(ValueError, match="multiple of 32"):
        layer(torch.ones((1, 48)))
    with pytest.raises(fast_engine.PreparedWeightsError, match="differ in rows"):
        _KernelLinear(qweight, scale[:4], bias)
    with pytest.raises(fast_engine.PreparedWeightsError, match="bias differ in rows"):
        _KernelLinear(qweight, scale, bias[:4])


@requires_kernel
@pytest.mark.parametrize("shape", [(1, 96), (1, 32), (2, 64, 1), (0, 64)])
def test_an_input_of_another_width_is_refused_not_read_past(shape) -> None:
    # The kernel reads rows x columns of the input and outputs x columns of the weights: a
    # mismatch would read past a buffer's end (a crash at best).
    qweight, scale, bias, _, _ = layer_and_weight(8, 64, 2)
    layer = _KernelLinear(qweight, scale, bias)
    with pytest.raises(ValueError, match="int8 linear: input"):
        layer(torch.ones(shape))


@requires_kernel
def test_a_row_with_nan_gives_nan_and_leaves_its_batch_mates_alone() -> None:
    qweight, scale, bias, _, generator = layer_and_weight(40, 64, 9)
    layer = _KernelLinear(qweight, scale, bias)
    x = torch.randn((3, 64), generator=generator)
    clean = layer(x, 2)
    x[1, 17] = float("nan")
    out = layer(x, 2)
    assert torch.isnan(out[1]).all()
    assert torch.equal(out[0], clean[0]) and torch.equal(out[2], clean[2])


@requires_kernel
def test_calls_from_several_threads_at_once_get_their_own_answers() -> None:
    import threading

    qweight, scale, bias, _, generator = layer_and_weight(200, 128, 11)
    layer = _KernelLinear(qweight, scale, bias)
    inputs = [torch.randn((1 + i % 5, 128), generator=generator) for i in range(6)]
    expected = [layer(x, 1) for x in inputs]
    wrong: list[int] = []

    def call(index: int) -> None:
        for _ in range(200):
            if not torch.equal(layer(inputs[index], 1 + index % 3), expected[index]):
                wrong.append(index)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert wrong == []


_FORKED: dict = {}  # what the forked child inherits: no torch operation runs in it but ours


def _in_child(queue) -> None:
    layer, x = _FORKED["layer"], _FORKED["x"]
    queue.put(layer(x, 2).sum().item())


@requires_kernel
def test_a_forked_child_gets_a_pool_of_its_own() -> None:
    # The parent's pool threads do not exist in a forked child; waiting for them would hang.
    qweight, scale, bias, _, generator = layer_and_weight(300, 128, 3)
    layer = _KernelLinear(qweight, scale, bias)
    x = torch.randn((3, 128), generator=generator)
    expected = layer(x, 2).sum().item()  # the pool runs here first
    _FORKED.update(layer=layer, x=x)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in the kernel")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == expected


def huge_page_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else ""
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else "never"


def thp_eligible(address: int) -> bool:
    """Whether /proc/self/smaps marks the mapping holding `address` as eligible for THP."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("THPeligible:"):
            return line.split()[1] == "1"
    return False


def test_a_resident_matrix_is_its_blocks_on_huge_page_boundaries() -> None:
    rows = 2048  # 2048 x 2048 bytes: two huge pages
    generator = torch.Generator().manual_seed(5)
    qweight = torch.randint(-127, 128, (rows, 2048), dtype=torch.int8, generator=generator)
    blocks = [qweight[:1000], qweight[1000:2000], qweight[2000:]]
    matrix = fast_engine._resident_int8(iter(blocks), rows)
    assert torch.equal(matrix, qweight)
    assert matrix.data_ptr() % (2 << 20) == 0  # so the kernel may back it with 2 MiB pages
    if huge_page_mode() in ("madvise", "always"):
        assert thp_eligible(matrix.data_ptr())  # the madvise took effect
    with pytest.raises(fast_engine.PreparedWeightsError, match="differ in rows"):
        fast_engine._resident_int8(iter(blocks), rows - 1)
    with pytest.raises(fast_engine.PreparedWeightsError, match="differ in rows"):
        fast_engine._resident_int8(iter(blocks[:2]), rows)


@requires_kernel
def test_the_output_layer_and_the_embedding_share_one_matrix(tiny_model_dir: Path) -> None:
    baked = BloomForward.from_prepared(tiny_model_dir)
    sealed = BloomForward.from_prepared_bytes(  # the sealed model's path: from bytes in memory
        (tiny_model_dir / "config.json").read_bytes(), (tiny_model_dir / PREPARED_FILE).read_bytes()
    )
    for model in (baked, sealed):
        assert isinstance(model.lm_head, _KernelLinear)
        assert model.embedding.data_ptr() == model.lm_head.weight.data_ptr()
        assert all(isinstance(layer.down, _KernelLinear) for layer in model.layers)
    with torch.inference_mode():
        logits = [
            model.step([Work(model.new_cache(8), [5, 17, 42], True)])[0]
            for model in (baked, sealed)
        ]
    assert torch.equal(logits[0], logits[1])
