"""Hand-written Triton kernels for GPT-2, importable on their own (no import of ``gpt``).

Public API (docs/design.md): ``flash_attention``, ``flash_attention_varlen``, ``decode_attention``, ``layer_norm``, ``add_layer_norm``,
``gelu``, ``linear_cross_entropy``, ``rms_norm``, ``add_rms_norm``, ``swiglu``, ``geglu``, ``apply_rotary`` and the drop-in modules
``LayerNorm``, ``GELU``, ``CausalSelfAttention``, ``RMSNorm``, ``GatedMLP``;
``register_hf_attention`` and ``replace_modules`` put them into other models (transformers imported lazily).

``kernels`` is also the import name of Hugging Face's kernel-hub package (PyPI distribution ``kernels``,
which transformers probes for). With both installed one would silently shadow the other, so importing
this package fails with one clear ``ImportError`` naming the other distribution (and ``import gpt`` does
the same when the other one is found first on ``sys.path``).
"""

from importlib import metadata as _metadata
from pathlib import Path as _Path


def _check_no_other_kernels_distribution() -> None:
    """ImportError when a distribution named ``kernels`` (Hugging Face's kernel hub) provides another
    ``kernels`` package than this one."""
    try:
        other = _metadata.distribution("kernels")
    except _metadata.PackageNotFoundError:
        return
    here = _Path(__file__).resolve()
    files = other.files
    provided = [f for f in files or () if f.parts[:1] == ("kernels",) and f.name == "__init__.py"
                and len(f.parts) == 2]
    if files is not None and (not provided or _Path(other.locate_file(provided[0])).resolve() == here):
        return  # it does not provide a `kernels` package, or it is this one
    where = _Path(other.locate_file(provided[0])).parent if provided else "unknown"
    raise ImportError(
        f"two packages named `kernels` are installed: this project's Triton kernels ({here.parent}) and the "
        f"distribution `kernels` {other.version} ({where}), Hugging Face's kernel hub, which transformers "
        "also imports as `kernels`. Only one can be imported under that name: uninstall the other one "
        "(`pip uninstall kernels`) or use a separate environment for each.")


_check_no_other_kernels_distribution()

from .attention import flash_attention, flash_attention_varlen  # noqa: E402
from .cross_entropy import linear_cross_entropy  # noqa: E402
from .decode import decode_attention  # noqa: E402
from .gelu import GELU, gelu  # noqa: E402
from .glu import GatedMLP, geglu, swiglu  # noqa: E402
from .integrations import register_hf_attention, replace_modules  # noqa: E402
from .layernorm import LayerNorm, add_layer_norm, layer_norm  # noqa: E402
from .rmsnorm import RMSNorm, add_rms_norm, rms_norm  # noqa: E402
from .rotary import apply_rotary  # noqa: E402
from .self_attention import CausalSelfAttention  # noqa: E402

__all__ = [
    "flash_attention", "flash_attention_varlen", "decode_attention", "CausalSelfAttention",
    "layer_norm", "add_layer_norm", "LayerNorm", "gelu", "GELU", "linear_cross_entropy",
    "register_hf_attention", "replace_modules",
    "rms_norm", "add_rms_norm", "RMSNorm", "swiglu", "geglu", "GatedMLP", "apply_rotary",
]
