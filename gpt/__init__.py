"""GPT-2 from scratch: config, the book's reference model, the fused model, tokenizer, data, weights,
generation. ``gpt.GPTModel`` is the model on the Triton kernels; ``gpt.reference.GPTModel`` the book's."""

import warnings

# `python -m gpt.generate` runs a submodule this package already imported (for `gpt.generate`, the
# function): harmless here, so silence runpy's warning about it.
warnings.filterwarnings("ignore", message=r".*'gpt\.generate' found in sys\.modules", category=RuntimeWarning)

from .batch_generate import generate_batch  # noqa: E402
from .config import GPT_CONFIG_124M, GPTConfig  # noqa: E402
from .generate import generate  # noqa: E402
from .model import GPTModel  # noqa: E402

__all__ = ["GPTConfig", "GPT_CONFIG_124M", "GPTModel", "generate", "generate_batch"]
