"""Test setup: without a GPU, kernels run through the Triton interpreter on CPU; the tokenizer works offline."""

import os
from pathlib import Path

import torch  # (does not import triton)


def _triton_version() -> tuple[int, ...] | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(x) for x in version("triton").split("+")[0].split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return None


# The Triton interpreter runs these kernels from triton 3.7 (the runtime floor, for compiled kernels on
# CUDA, is 3.6). With an older triton on CPU the interpreter cases skip, saying so, and the kernels are
# tested on their PyTorch fallback only.
INTERPRETER_TRITON = (3, 7)
TRITON_VERSION = _triton_version()
INTERPRETER_OK = TRITON_VERSION is not None and TRITON_VERSION >= INTERPRETER_TRITON

# Must happen before anything imports triton (the interpreter is chosen at decoration time). On a CUDA
# machine the kernels must run compiled: the gpu tests are about the real kernels.
if not torch.cuda.is_available() and INTERPRETER_OK:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # the sample data that ships in the repository (data/README.md); nothing outside the clone
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _offline_tiktoken_cache() -> None:
    """``tiktoken.get_encoding("gpt2")`` is the tests' independent reference for our tokenizer: without a
    cache it would download. Give it GPT-2's two files (the copies the package ships) under the names its
    cache looks for; tiktoken checks their sha256 itself and parses them with its own code."""
    import atexit
    import hashlib
    import shutil
    import tempfile

    from gpt.tokenizer import _URL, ASSETS, _tiktoken_has_cache

    if _tiktoken_has_cache():
        return
    cache = tempfile.mkdtemp(prefix="tiktoken-cache-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(ASSETS / name, os.path.join(cache, hashlib.sha1((_URL + name).encode()).hexdigest()))
    os.environ["TIKTOKEN_CACHE_DIR"] = cache


_offline_tiktoken_cache()

import pytest  # noqa: E402

_DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def pytest_make_parametrize_id(config, val, argname):
    """torch dtypes get readable test ids (``[bf16]`` instead of ``[dtype0]``), so ``-k "not fp32"`` selects
    by dtype (bench/gpu_session.sh leaves the fp32 GPU variants out that way)."""
    if isinstance(val, torch.dtype):
        return _DTYPE_IDS.get(val, str(val).removeprefix("torch."))
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _kernel_path_setting_is_left_as_found():
    """A test that changes TRITON_INTERPRET for good (e.g. by importing a module that sets it) would
    silently move every later test to the other kernel path: fail it, and restore the setting."""
    before = os.environ.get("TRITON_INTERPRET")
    yield
    after = os.environ.get("TRITON_INTERPRET")
    if after != before:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
        pytest.fail(f"the test left TRITON_INTERPRET={after!r} (it was {before!r}); later tests would run "
                    "on the wrong kernel path")


@pytest.fixture(scope="session")
def data_dir():
    """The repository's sample data folder, ``data/`` (it ships with the clone: a test never skips for it)."""
    assert (DATA / "the-verdict.txt").is_file(), f"{DATA} is missing: the sample data ships in the repository"
    return DATA


@pytest.fixture(params=["interpreter", "fallback"])
def kernel_path(request, monkeypatch):
    """Run a test both ways a kernel op executes without a GPU: the Triton kernel through the interpreter
    and the pure-PyTorch fallback (``TRITON_INTERPRET=0``). On a CUDA machine the kernels run compiled,
    once (as the "interpreter" case; CPU tensors there take the fallback)."""
    from kernels._utils import interpret_mode

    if torch.cuda.is_available():
        if request.param == "fallback":
            pytest.skip("on CUDA the kernels run compiled, once (the 'interpreter' case)")
    elif request.param == "fallback":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif not INTERPRETER_OK:
        pytest.skip(f"the Triton interpreter needs triton >= 3.7 (found {TRITON_VERSION}): "
                    "pip install -U 'triton>=3.7' for the CPU kernel tests")
    elif not interpret_mode():
        pytest.skip("TRITON_INTERPRET is off in this session")
    return request.param


@pytest.fixture
def device(kernel_path):
    """Where a ``kernel_path`` test builds its tensors: CUDA on a CUDA machine (so the "interpreter" case
    runs the compiled kernels, not the CPU fallback), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and kernel_path == "interpreter" else "cpu")


@pytest.fixture
def fallback_path(monkeypatch):
    """Run kernel ops on their pure-PyTorch fallback instead of the Triton interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
