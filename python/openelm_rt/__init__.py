"""openelm_rt: a native inference runtime for Apple's OpenELM language models.

Public surface: `Session`, `GenerationResult`, `GenerationStream`, `BatchStream`,
`ScoreResult`, `NgramCache` (speculative generation's n-gram cache), `FormatError`, `KVBudgetError`, `cuda_info` (whether this build has the CUDA
backend and a device is usable), and `perplexity` (perplexity / KL against a
base model, `PerplexityResult`).
The exporter (`openelm_rt.export`) and checkpoint tools import without the compiled
core, so they are importable before the extension is built.
"""

__version__ = "0.4.0"
# NumPy only (the core is imported when it runs); binds the function over the submodule's name.
from .perplexity import PerplexityResult, perplexity  # noqa: E402

__all__ = ["Session", "GenerationResult", "GenerationStream", "BatchStream", "ScoreResult", "NgramCache",
           "FormatError", "KVBudgetError", "cuda_info", "perplexity", "PerplexityResult", "__version__"]


def __getattr__(name):
    # Lazy: importing the package must not require the compiled extension.
    if name in ("Session", "GenerationResult", "GenerationStream", "BatchStream", "ScoreResult"):
        from . import session

        return getattr(session, name)
    if name == "NgramCache":
        from .speculative import NgramCache

        return NgramCache
    if name in ("FormatError", "KVBudgetError", "cuda_info"):
        from . import _core

        return getattr(_core, name)
    raise AttributeError(f"module 'openelm_rt' has no attribute {name!r}")
