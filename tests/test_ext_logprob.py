"""token_logprobs / token_logprobs_from_logits against the fp32 naive computation.

The accuracy rule, elementwise: |reference - ours| <= |reference - naive in the same
dtype| + tol, with tol 1e-5 for fp32 and 1e-2 for bf16. The reference is
``log_softmax(h @ W.T + b).gather(y)`` in fp32 at "highest" matmul precision on the
same input values; "naive" is the same expression in the inputs' dtype.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gristmill.ext import backend, build, token_logprobs, token_logprobs_from_logits
from gristmill.ext.reference import token_logprobs_torch

IGNORE = -100
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.fixture(autouse=True)
def highest_matmul_precision():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def make_inputs(
    n, vocab, dim, dtype, device, *, with_bias=False, ignore_every=0, scale=1.0, seed=0
):
    """LM-like inputs: logits of standard deviation ~``scale``, targets uniform."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * (scale / dim**0.5)
    bias = torch.randn(vocab, generator=gen) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = IGNORE
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), targets.to(device), cast(bias)


def naive(hidden, weight, targets, bias=None):
    """``log_softmax(h @ W.T + b).gather(y)`` computed in the inputs' dtype."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    out = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    return torch.where(targets == IGNORE, torch.zeros_like(out), out).float()


def reference(hidden, weight, targets, bias=None):
    """The naive expression in fp32 on the same input values."""
    f = lambda t: None if t is None else t.float()  # noqa: E731
    return naive(f(hidden), f(weight), targets, f(bias))


def assert_within_rule(ours, hidden, weight, targets, bias=None):
    ref = reference(hidden, weight, targets, bias)
    same_dtype = naive(hidden, weight, targets, bias)
    allowed = (ref - same_dtype).abs() + TOL[hidden.dtype]
    excess = (ref - ours).abs() - allowed
    assert ours.dtype == torch.float32 and ours.shape == targets.shape
    assert bool((excess <= 0).all()), f"worst excess {float(excess.max()):.3g} over the rule"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_token_logprobs_matches_naive_on_shapes_not_multiple_of_tiles(device, dtype, with_bias):
    hidden, weight, targets, bias = make_inputs(252, 507, 123, dtype, device, with_bias=with_bias)
    assert_within_rule(token_logprobs(hidden, weight, targets, bias), hidden, weight, targets, bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_matches_naive_on_a_realistic_lm_head(device, dtype):
    # GPT-2-like vocabulary, several vocabulary and token tiles, a partial last tile.
    hidden, weight, targets, _ = make_inputs(600, 50257, 64, dtype, device, ignore_every=9)
    assert_within_rule(token_logprobs(hidden, weight, targets), hidden, weight, targets)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_inputs_are_accumulated_in_fp32(device):
    # Ours upcasts products to fp32, so it sits far closer to the fp32 reference on the
    # same bf16 values than the bf16 naive path (which rounds logits to bf16).
    hidden, weight, targets, bias = make_inputs(
        300, 2000, 96, torch.bfloat16, device, with_bias=True
    )
    ref = reference(hidden, weight, targets, bias)
    ours = token_logprobs(hidden, weight, targets, bias)
    assert float((ours - ref).abs().max()) < 1e-3
    assert float((naive(hidden, weight, targets, bias) - ref).abs().max()) > 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_ignored_targets_give_zero_and_leave_others_unchanged(device):
    hidden, weight, targets, bias = make_inputs(200, 700, 32, torch.float32, device, with_bias=True)
    full = token_logprobs(hidden, weight, targets, bias)
    masked_targets = targets.clone()
    masked_targets[::3] = IGNORE
    masked = token_logprobs(hidden, weight, masked_targets, bias)
    keep = masked_targets != IGNORE
    assert bool((masked[~keep] == 0).all())
    assert torch.equal(masked[keep], full[keep])
    assert bool((full < 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ignore_index_is_honoured(device):
    hidden, weight, targets, _ = make_inputs(50, 100, 16, torch.float32, device)
    targets[:5] = 7
    out = token_logprobs(hidden, weight, targets, ignore_index=7)
    assert bool((out[:5] == 0).all()) and bool((out[5:] != 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_peaked_distribution_with_maximum_in_the_last_tile(device):
    # Large logits (std 30) and one dominant column at the end of the vocabulary: the
    # running maximum must rescale the sums of all earlier tiles correctly.
    hidden, weight, targets, _ = make_inputs(64, 3000, 48, torch.float32, device, scale=30.0)
    weight[-1] = hidden.float().mean(0) * 3
    targets[:32] = 2999
    ours = token_logprobs(hidden, weight, targets)
    h64, w64 = hidden.double(), weight.double()
    exact = torch.log_softmax(h64 @ w64.T, -1).gather(1, targets[:, None])[:, 0]
    assert torch.allclose(ours.double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_from_logits_matches_naive(device, dtype):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(97, 4099, generator=gen) * 3).to(device=device, dtype=dtype)
    targets = torch.randint(0, 4099, (97,), generator=gen).to(device)
    targets[::10] = IGNORE
    ours = token_logprobs_from_logits(logits, targets)
    ref = torch.log_softmax(logits.float(), -1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    ref = torch.where(targets == IGNORE, torch.zeros_like(ref), ref)
    same_dtype = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    same_dtype = torch.where(targets == IGNORE, torch.zeros_like(ref), same_dtype.float())
    tol = TOL.get(dtype, 1e-2)
    assert bool(((ref - ours).abs() <= (ref - same_dtype).abs() + tol).all())
    assert float((ref - ours).abs().max()) < 1e-4


def test_cpp_backend_is_active_on_cpu():
    assert backend("cpu") == "cpp", f"C++ build failed: {build.build_error('cpu')}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backend_is_active_on_gpu():
    assert backend("cuda") == "cuda", f"CUDA build failed: {build.build_error('cuda')}"


def test_forcing_torch_backend_by_environment_gives_same_numbers(monkeypatch):
    hidden, weight, targets, bias = make_inputs(252, 507, 123, torch.float32, "cpu", with_bias=True)
    compiled = token_logprobs(hidden, weight, targets, bias)
    monkeypatch.setenv("GRISTMILL_EXT", "torch")
    assert backend("cpu") == "torch"
    fallback = token_logprobs(hidden, weight, targets, bias)
    assert_within_rule(fallback, hidden, weight, targets, bias)
    assert torch.allclose(fallback, compiled, atol=1e-5, rtol=0)


def test_torch_implementation_tiles_do_not_change_the_result():
    hidden, weight, targets, bias = make_inputs(130, 333, 20, torch.float32, "cpu", with_bias=True)
    one_tile = token_logprobs_torch(hidden, weight, targets, bias, token_tile=1000, vocab_tile=1000)
    many = token_logprobs_torch(hidden, weight, targets, bias, token_tile=50, vocab_tile=40)
    assert torch.allclose(one_tile, many, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_kernel_tiles_do_not_change_the_result(device):
    # Several token tiles and vocabulary tiles, both with a partial last tile.
    module = build.extension(device, required=True)
    hidden, weight, targets, bias = make_inputs(130, 333, 20, torch.float32, device, with_bias=True)
    one_tile = module.token_logprobs(hidden, weight, targets, bias, IGNORE, 1000, 1000)
    many = module.token_logprobs(hidden, weight, targets, bias, IGNORE, 50, 40)
    assert torch.allclose(one_tile, many, atol=1e-5, rtol=0)


def test_unknown_backend_request_names_the_variable(monkeypatch):
    monkeypatch.setenv("GRISTMILL_EXT", "fortran")
    with pytest.raises(ValueError, match="GRISTMILL_EXT must be one of auto, torch, native"):
        backend("cpu")


def test_failed_build_warns_once_and_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("GRISTMILL_EXT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(build, "_modules", {})
    monkeypatch.setattr(build, "_errors", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend("cpu") == "torch"
        assert backend("cpu") == "torch"
        hidden, weight, targets, _ = make_inputs(20, 50, 8, torch.float32, "cpu")
        out = token_logprobs(hidden, weight, targets)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "pure-PyTorch" in messages[0]
    assert_within_rule(out, hidden, weight, targets)
    with pytest.raises(RuntimeError, match="required"):
        backend("cpu", impl="native")


def test_bad_arguments_name_the_field():
    hidden, weight, targets, _ = make_inputs(10, 20, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="targets must lie in"):
        token_logprobs(hidden, weight, torch.full((10,), 20))
    with pytest.raises(ValueError, match="same d"):
        token_logprobs(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="share one dtype"):
        token_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match=r"bias must be \[20\]"):
        token_logprobs(hidden, weight, targets, torch.zeros(19))
    with pytest.raises(ValueError, match=r"targets must have shape \[10\]"):
        token_logprobs(hidden, weight, targets[:5])


def test_empty_batch_gives_empty_result():
    hidden, weight, _, _ = make_inputs(0, 20, 4, torch.float32, "cpu")
    out = token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.dtype == torch.float32


MEMORY_PROBE = """
import pathlib, sys, torch
from gristmill.ext import backend, token_logprobs
n, vocab = 512, 65536
hidden, weight = torch.randn(n, 32), torch.randn(vocab, 32)
targets = torch.randint(0, vocab, (n,))
assert backend("cpu") == "cpp"
# A tiny call first: starting the thread pool is a one-time cost, not the op's memory.
token_logprobs(hidden[:4], weight[:10], targets[:4] % 10)
pathlib.Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM)
status = lambda key: int(next(line.split()[1] for line in pathlib.Path("/proc/self/status")
                          .read_text().splitlines() if line.startswith(key + ":"))) * 1024
before = status("VmRSS")
token_logprobs(hidden, weight, targets)
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpp_backend_extra_peak_memory_is_a_small_fraction_of_the_logits():
    # A fresh process, so no earlier call's freed buffers hide the peak.
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=False,
        cwd=Path(__file__).resolve().parents[1], timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    logits_bytes = 512 * 65536 * 4
    assert int(done.stdout.split()[-1]) < 0.05 * logits_bytes


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_kernel_source_compiles_with_nvcc(tmp_path):
    # The kernels are kept free of torch headers so this runs with a CPU-only torch.
    csrc = Path(build.CSRC)
    done = subprocess.run(
        ["nvcc", "-c", "-O3", "--use_fast_math", "-arch=sm_90", f"-I{csrc}",
         str(csrc / "logprob_kernels.cu"), "-o", str(tmp_path / "kernels.o")],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "kernels.o").stat().st_size > 0
