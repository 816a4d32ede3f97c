"""OpenELM config.json logic: the layer-wise scaling rule, presets and validation.

Reproduces Hugging Face `OpenELMConfig` (configuration_openelm.py in the apple/OpenELM-*
repos) exactly, so per-layer head counts and FFN widths match the real checkpoints
(docs: shared/OPENELM.md sections 1-2). It does not read weights; see checkpoint.py and
export.py for that.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from numbers import Number
from typing import Any, NamedTuple

import numpy as np


class ExportError(ValueError):
    """A checkpoint, config or tokenizer that cannot be exported; the message says why and what to do."""


# Hard-coded in modeling_openelm.py (`OpenELMRMSNorm(..., eps=1e-6)` for every norm); config.json
# does not carry it, so the exporter records it in the .oelm metadata. A config.json may override
# it with `rms_norm_eps` (Hugging Face Llama's name; not an OpenELM field, which HF's OpenELM code
# ignores): checkpoints converted from other models of the same block type need their own eps,
# e.g. the SmolLM2 stand-in of benchmarks/standin.py (1e-5).
NORM_EPS = 1e-6
NORM_EPS_KEY = "rms_norm_eps"


def make_divisible(v: float, divisor: int) -> int:
    """MobileNet rounding used by OpenELM (CoreNet `make_divisible`, HF configuration_openelm.py).

    Rounds v half-up to a multiple of divisor (at least divisor), then adds one more divisor
    if that rounded down by more than 10%.
    """
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def _is_number(x: Any) -> bool:
    return isinstance(x, Number) and not isinstance(x, bool)


def _expand_multipliers(mult: Any, n_layer: int, field: str, allow_full_list: bool) -> list[float]:
    """Per-layer multipliers exactly as OpenELMConfig.__post_init__ computes them.

    A scalar applies to every layer; a pair [a, b] becomes round(linspace(a, b, L)[i], 2) with a
    float64 NumPy linspace (endpoints included) and Python's round; an L-long list (only for
    ffn_multipliers, as HF stores it after expansion) is used as it is.
    """
    if _is_number(mult):
        return [float(mult)] * n_layer
    if isinstance(mult, (list, tuple)) and all(_is_number(m) for m in mult):
        if len(mult) == 2:  # HF checks the pair case first, even when L == 2
            return [round(float(v), 2)
                    for v in np.linspace(mult[0], mult[1], num=n_layer, dtype=float)]
        if allow_full_list and len(mult) == n_layer:
            return [float(m) for m in mult]
    expected = "a number, a pair [first, last]" + (f" or a list of {n_layer} numbers"
                                                  if allow_full_list else "")
    raise ExportError(f"config.json {field} = {mult!r} is not supported: expected {expected} "
                      f"(num_transformer_layers = {n_layer}). Fix config.json or re-save the "
                      f"checkpoint with OpenELMConfig.")


def derive_layer_dims(cfg: dict) -> dict:
    """Per-layer query heads, kv heads, FFN widths and FFN multipliers, as HF OpenELMConfig does.

    Uses num_transformer_layers, model_dim, head_dim, num_gqa_groups, qkv_multipliers,
    ffn_multipliers and ffn_dim_divisor. num_gqa_groups is the q-heads-per-kv-head ratio
    (HF uses 2 when it is null).
    """
    n_layer = int(cfg["num_transformer_layers"])
    d_model = int(cfg["model_dim"])
    head_dim = int(cfg["head_dim"])
    groups = cfg.get("num_gqa_groups")
    head_multiple_of = 2 if groups is None else int(groups)

    qkv_mult = _expand_multipliers(cfg["qkv_multipliers"], n_layer, "qkv_multipliers",
                                   allow_full_list=False)
    # HF: query_dims = make_divisible(model_dim * m, divisor=head_dim * head_multiple_of)
    q_dims = [make_divisible(d_model * m, head_dim * head_multiple_of) for m in qkv_mult]
    n_head_q = []
    for i, q_dim in enumerate(q_dims):
        if q_dim % head_dim:  # HF compute_heads raises here; unreachable for valid configs
            raise ExportError(f"layer {i}: query width {q_dim} is not a multiple of head_dim "
                              f"{head_dim}; check model_dim, head_dim and qkv_multipliers")
        n_head_q.append(q_dim // head_dim)
    n_head_kv = [nq // head_multiple_of for nq in n_head_q]

    ffn_mult = _expand_multipliers(cfg["ffn_multipliers"], n_layer, "ffn_multipliers",
                                   allow_full_list=True)
    # HF modeling_openelm.OpenELMFeedForwardNetwork: make_divisible(ffn_multiplier * model_dim, ffn_dim_divisor)
    ffn_dim = [make_divisible(m * d_model, int(cfg["ffn_dim_divisor"])) for m in ffn_mult]
    return {"n_head_q": n_head_q, "n_head_kv": n_head_kv, "ffn_dim": ffn_dim,
            "ffn_multipliers": ffn_mult}


# ----------------------------------------------------------------------------- presets

_AUTO_MAP = {
    "AutoConfig": "configuration_openelm.OpenELMConfig",
    "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM",
}

# Values shared by every released size (OPENELM.md section 1 table).
_COMMON = {
    "activation_fn_name": "swish",
    "architectures": ["OpenELMForCausalLM"],
    "auto_map": _AUTO_MAP,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "ffn_dim_divisor": 256,
    "ffn_multipliers": [0.5, 4.0],
    "ffn_with_glu": True,
    "initializer_range": 0.02,
    "max_context_length": 2048,
    "model_type": "openelm",
    "normalization_layer_name": "rms_norm",
    "normalize_qk_projections": True,
    "num_gqa_groups": 4,
    "qkv_multipliers": [0.5, 1.0],
    "rope_freq_constant": 10000,
    "rope_max_length": 4096,
    "share_input_output_layers": True,
    "torch_dtype": "float32",
    "transformers_version": "4.39.3",
    "use_cache": True,
    "vocab_size": 32000,
}

# Size-specific values (OPENELM.md section 1 table: L, model_dim, head_dim).
_SIZES = {
    "270M": {"num_transformer_layers": 16, "model_dim": 1280, "head_dim": 64},
    "450M": {"num_transformer_layers": 20, "model_dim": 1536, "head_dim": 64},
    "1_1B": {"num_transformer_layers": 28, "model_dim": 2048, "head_dim": 64},
    "3B": {"num_transformer_layers": 36, "model_dim": 3072, "head_dim": 128},
    # For tests: small, but every per-layer quantity really differs between layers
    # (q heads 4,8,8,8; kv heads 1,2,2,2; FFN 64,224,352,512).
    "tiny": {"num_transformer_layers": 4, "model_dim": 128, "head_dim": 16,
             "ffn_dim_divisor": 32, "vocab_size": 1024, "max_context_length": 256},
}

# Keys whose stored value is computed from the others.
_DERIVED_KEYS = ("num_query_heads", "num_kv_heads")
# Keys that change the derived lists when overridden.
_DIM_KEYS = ("num_transformer_layers", "model_dim", "head_dim", "num_gqa_groups",
             "qkv_multipliers", "ffn_multipliers", "ffn_dim_divisor")


def make_config(preset: str, **overrides: Any) -> dict:
    """A full HF config.json dict for a preset ("270M", "450M", "1_1B", "3B", "tiny").

    Overrides replace keys before the per-layer lists are derived, so changing a dimension
    re-derives num_query_heads / num_kv_heads / ffn_multipliers. Overriding num_query_heads or
    num_kv_heads themselves stores the given list verbatim (to build inconsistent configs in
    tests). share_input_output_layers=False also sets tie_word_embeddings=False, as HF needs
    to really use lm_head (OPENELM.md 3.8).
    """
    if preset not in _SIZES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(_SIZES)}")
    cfg = copy.deepcopy({**_COMMON, **_SIZES[preset]})
    derived_overrides = {k: v for k, v in overrides.items() if k in _DERIVED_KEYS}
    cfg.update(copy.deepcopy({k: v for k, v in overrides.items() if k not in _DERIVED_KEYS}))
    dims = derive_layer_dims(cfg)
    cfg["num_query_heads"] = dims["n_head_q"]
    cfg["num_kv_heads"] = dims["n_head_kv"]
    cfg["ffn_multipliers"] = dims["ffn_multipliers"]
    cfg.update(copy.deepcopy(derived_overrides))
    if cfg.get("share_input_output_layers") is False and "tie_word_embeddings" not in overrides:
        cfg["tie_word_embeddings"] = False
    return dict(sorted(cfg.items()))  # save_pretrained writes keys sorted


PRESETS: dict[str, dict] = {name: make_config(name) for name in _SIZES}


# ----------------------------------------------------------------------------- validation

@dataclass(frozen=True)
class ModelSpec:
    """What the runtime needs from config.json; field names follow the .oelm `model` section."""

    n_layer: int
    d_model: int
    head_dim: int
    vocab_size: int
    n_head_q: list[int]
    n_head_kv: list[int]
    ffn_dim: list[int]
    rope_theta: float
    norm_eps: float
    max_context: int
    bos_token_id: int
    eos_token_id: int
    tied_embeddings: bool
    qk_norm: bool = True  # normalize_qk_projections: per-head RMSNorm on q and k

    def to_metadata(self) -> dict:
        """The `model` object of the .oelm metadata (docs/FORMAT.md)."""
        return {"architecture": "openelm", **asdict(self)}

    def n_params(self) -> int:
        """Parameters the runtime uses (tied: no separate head), = OPENELM.md's totals."""
        return sum(math.prod(t.shape) for t in tensor_layout(self))


class TensorSpec(NamedTuple):
    hf_name: str
    oelm_name: str
    shape: tuple[int, ...]
    is_norm: bool  # norms are stored f32 in .oelm whatever the weights dtype


def tensor_layout(spec: ModelSpec) -> list[TensorSpec]:
    """Every weight tensor, in .oelm file order (FORMAT.md table), with HF and .oelm names."""
    D, hd = spec.d_model, spec.head_dim
    out = [TensorSpec("transformer.token_embeddings.weight", "token_embd",
                      (spec.vocab_size, D), False)]
    for i in range(spec.n_layer):
        nq, nkv, F = spec.n_head_q[i], spec.n_head_kv[i], spec.ffn_dim[i]
        hf, ob = f"transformer.layers.{i}.", f"blk.{i}."
        out += [
            TensorSpec(hf + "attn_norm.weight", ob + "attn_norm", (D,), True),
            TensorSpec(hf + "attn.qkv_proj.weight", ob + "attn_qkv", ((nq + 2 * nkv) * hd, D), False),
        ]
        if spec.qk_norm:
            out += [TensorSpec(hf + "attn.q_norm.weight", ob + "attn_q_norm", (hd,), True),
                    TensorSpec(hf + "attn.k_norm.weight", ob + "attn_k_norm", (hd,), True)]
        out += [
            TensorSpec(hf + "attn.out_proj.weight", ob + "attn_output", (D, nq * hd), False),
            TensorSpec(hf + "ffn_norm.weight", ob + "ffn_norm", (D,), True),
            TensorSpec(hf + "ffn.proj_1.weight", ob + "ffn_gate_up", (2 * F, D), False),
            TensorSpec(hf + "ffn.proj_2.weight", ob + "ffn_down", (D, F), False),
        ]
    out.append(TensorSpec("transformer.norm.weight", "output_norm", (D,), True))
    if not spec.tied_embeddings:
        out.append(TensorSpec("lm_head.weight", "output", (spec.vocab_size, D), False))
    return out


_FIX = "Fix config.json (it should be the one saved with the checkpoint)."


def _require(cfg: dict, key: str, kind: str) -> Any:
    if key not in cfg:
        raise ExportError(f"config.json has no {key!r}; an OpenELM config.json always has it. {_FIX}")
    v = cfg[key]
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "int>=0": isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
        "number": _is_number(v) and math.isfinite(v) and v > 0,
        "multipliers": _is_number(v) or (isinstance(v, list) and len(v) > 0
                                         and all(_is_number(m) for m in v)),
    }[kind]
    if not ok:
        want = {"int": "a positive integer", "int>=0": "a non-negative integer",
                "bool": "true or false", "str": "a string", "number": "a positive number",
                "multipliers": "a number or a list of numbers"}[kind]
        raise ExportError(f"config.json {key} = {v!r} is not {want}. {_FIX}")
    return v


def _require_value(cfg: dict, key: str, allowed: tuple, why: str) -> None:
    if cfg[key] not in allowed:
        shown = " or ".join(repr(a) for a in allowed)
        raise ExportError(f"config.json {key} = {cfg[key]!r} is not supported: openelm_rt "
                          f"implements {key} = {shown} only ({why}). Every released OpenELM "
                          f"model uses that value; this checkpoint is a variant the runtime "
                          f"cannot run.")


def parse_config(cfg: dict) -> ModelSpec:
    """Validate an OpenELM config.json dict and return the runtime's view of it.

    Raises ExportError naming the field, the value and the fix. Stored per-layer lists
    (num_query_heads, num_kv_heads) are cross-checked against the ones derived here.
    """
    if not isinstance(cfg, dict):
        raise ExportError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("model_type") != "openelm":
        raise ExportError(f"config.json model_type is {cfg.get('model_type')!r}, expected "
                          f"'openelm': openelm_rt only converts Apple OpenELM checkpoints "
                          f"(apple/OpenELM-270M ... apple/OpenELM-3B and their -Instruct).")
    n_layer = _require(cfg, "num_transformer_layers", "int")
    d_model = _require(cfg, "model_dim", "int")
    head_dim = _require(cfg, "head_dim", "int")
    _require(cfg, "num_gqa_groups", "int")
    _require(cfg, "qkv_multipliers", "multipliers")
    _require(cfg, "ffn_multipliers", "multipliers")
    _require(cfg, "ffn_dim_divisor", "int")
    vocab = _require(cfg, "vocab_size", "int")
    for key in ("ffn_with_glu", "normalize_qk_projections", "share_input_output_layers"):
        _require(cfg, key, "bool")
    for key in ("activation_fn_name", "normalization_layer_name"):
        _require(cfg, key, "str")
    rope_theta = _require(cfg, "rope_freq_constant", "number")
    max_ctx = _require(cfg, "max_context_length", "int")
    bos = _require(cfg, "bos_token_id", "int>=0")
    eos = _require(cfg, "eos_token_id", "int>=0")

    _require_value(cfg, "ffn_with_glu", (True,), "the gated SwiGLU FFN with fused gate+up projection")
    _require_value(cfg, "activation_fn_name", ("swish", "silu"), "SiLU in the FFN gate")
    _require_value(cfg, "normalization_layer_name", ("rms_norm",), "RMSNorm everywhere")
    for key, v in (("bos_token_id", bos), ("eos_token_id", eos)):
        if v >= vocab:
            raise ExportError(f"config.json {key} = {v} is not a valid token id for "
                              f"vocab_size = {vocab}. {_FIX}")

    dims = derive_layer_dims(cfg)
    for key, derived in (("num_query_heads", dims["n_head_q"]),
                         ("num_kv_heads", dims["n_head_kv"])):
        if key not in cfg:
            continue  # HF recomputes them anyway; old configs may lack them
        stored = cfg[key]
        if not isinstance(stored, list) or len(stored) != n_layer:
            raise ExportError(f"config.json {key} = {stored!r} should be a list of "
                              f"{n_layer} integers (one per layer). {_FIX}")
        for i, (s, d) in enumerate(zip(stored, derived)):
            if s != d:
                raise ExportError(
                    f"config.json {key}[{i}] = {s!r}, but OpenELM's layer-wise scaling gives "
                    f"{d} for layer {i} (model_dim={d_model}, head_dim={head_dim}, "
                    f"num_gqa_groups={cfg['num_gqa_groups']}, qkv_multipliers="
                    f"{cfg['qkv_multipliers']}). The config is inconsistent: HF would build "
                    f"different shapes than the weights were saved with. {_FIX}")
    for i, (nq, nkv, f) in enumerate(zip(dims["n_head_q"], dims["n_head_kv"], dims["ffn_dim"])):
        if nkv < 1 or nq % nkv or f < 1:
            raise ExportError(f"layer {i}: derived n_head_q={nq}, n_head_kv={nkv}, ffn_dim={f} "
                              f"do not describe a valid layer (need n_head_kv >= 1 dividing "
                              f"n_head_q). {_FIX}")

    eps = cfg.get(NORM_EPS_KEY, NORM_EPS)
    if not (_is_number(eps) and 0 < eps <= 1):
        raise ExportError(f"config.json {NORM_EPS_KEY} = {eps!r} is not a number in (0, 1]. {_FIX}")

    share = cfg["share_input_output_layers"]
    tie = cfg.get("tie_word_embeddings", True)
    if not isinstance(tie, bool):
        raise ExportError(f"config.json tie_word_embeddings = {tie!r} is not true or false. {_FIX}")
    # HF quirk (OPENELM.md 3.8): with share_input_output_layers=false, tie_weights() still ties
    # lm_head to the embedding unless tie_word_embeddings is false (PretrainedConfig default true).
    tied = share or tie

    return ModelSpec(
        n_layer=n_layer, d_model=d_model, head_dim=head_dim, vocab_size=vocab,
        n_head_q=dims["n_head_q"], n_head_kv=dims["n_head_kv"], ffn_dim=dims["ffn_dim"],
        rope_theta=float(rope_theta), norm_eps=float(eps), max_context=max_ctx,
        bos_token_id=bos, eos_token_id=eos, tied_embeddings=tied,
        qk_norm=cfg["normalize_qk_projections"])
