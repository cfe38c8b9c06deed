"""GPT-2 from scratch: config, the book's reference model, the fused model, tokenizer, data, weights,
generation. ``gpt.GPTModel`` is the model on the Triton kernels; ``gpt.reference.GPTModel`` the book's."""

import importlib.util
import warnings
from importlib import metadata
from pathlib import Path


def _check_kernels_is_ours() -> None:
    """One clear ImportError when ``import kernels`` would give another package than this project's
    ``kernels/`` (shipped beside ``gpt/``): Hugging Face's kernel hub (distribution ``kernels``) is also
    imported as ``kernels``, and the first one on sys.path wins."""
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None:
        return  # not installed at all: `from kernels import ...` below says so
    ours = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if Path(spec.origin).resolve() == ours:
        return
    try:
        other = f"the distribution `kernels` {metadata.version('kernels')} (Hugging Face's kernel hub)"
    except metadata.PackageNotFoundError:
        other = "another package"
    raise ImportError(
        f"`import kernels` finds {other} at {Path(spec.origin).parent}, not this project's Triton kernels "
        f"({ours.parent}) that gpt needs. Both use the import name `kernels`: uninstall the other one "
        "(`pip uninstall kernels`) or use a separate environment for each.")


_check_kernels_is_ours()

# `python -m gpt.generate` / `gpt.export` / `gpt.data` run a submodule this package already imported (the
# script's `__main__` shim only hands over to gpt/cli/): harmless here, so silence runpy's warning about it.
warnings.filterwarnings("ignore", message=r".*'gpt\.(generate|export|data)' found in sys\.modules",
                        category=RuntimeWarning)

from .batch_generate import generate_batch  # noqa: E402
from .config import GPT_CONFIG_124M, GPTConfig  # noqa: E402
from .generate import generate  # noqa: E402
from .model import GPTModel  # noqa: E402

__all__ = ["GPTConfig", "GPT_CONFIG_124M", "GPTModel", "generate", "generate_batch"]
