"""Tests for openelm_rt.hf_config: OpenELM's layer-wise scaling, presets and config validation.

The expected per-layer tables and parameter totals are copied from shared/OPENELM.md section 2
(which checked them against published config.json files and hub file sizes), not recomputed
with the code under test.
"""

import copy
import math

import numpy as np
import pytest

from openelm_rt.hf_config import (PRESETS, ExportError, ModelSpec, derive_layer_dims,
                                  make_config, make_divisible, parse_config, tensor_layout)

# size: (q heads per layer, kv heads per layer, FFN width per layer), OPENELM.md section 2 tables.
TABLES = {
    "270M": ([12, 12, 12, 12, 12, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20],
             [3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5],
             [768, 1024, 1280, 1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 3840, 4352, 4608,
              4864, 5120]),
    "450M": ([12, 12, 12, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20, 20, 20, 24, 24, 24, 24],
             [3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6],
             [768, 1024, 1280, 1536, 1792, 2304, 2560, 2816, 3072, 3328, 3584, 3840, 4096, 4352,
              4608, 5120, 5376, 5632, 5888, 6144]),
    "1_1B": ([16, 16, 16, 20, 20, 20, 20, 20, 20, 20, 24, 24, 24, 24, 24, 24, 24, 24, 28, 28, 28,
              28, 28, 28, 32, 32, 32, 32],
             [4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 8, 8, 8, 8],
             [1024, 1280, 1536, 1792, 2048, 2304, 2560, 2816, 3072, 3328, 3584, 3840, 4096, 4608,
              4608, 5120, 5376, 5632, 5888, 6144, 6400, 6656, 6912, 7168, 7424, 7680, 7936, 8192]),
    "3B": ([12, 12, 12, 12, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20,
            20, 20, 20, 20, 20, 20, 20, 20, 20, 24, 24, 24, 24, 24, 24],
           [3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5,
            5, 6, 6, 6, 6, 6, 6],
           [1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 4096, 4352, 4608, 4864, 5120, 5632,
            5888, 6144, 6400, 6656, 7168, 7424, 7680, 7936, 8192, 8704, 8960, 9216, 9472, 9728,
            10240, 10496, 10752, 11008, 11264, 11776, 12032, 12288]),
}
TOTAL_PARAMS = {"270M": 271_527_168, "450M": 457_179_136, "1_1B": 1_079_891_456,
                "3B": 3_036_647_424}
# Stored config.json ffn_multipliers of the 270M (OPENELM.md table, "ffn mult" column).
FFN_MULT_270M = [0.5, 0.73, 0.97, 1.2, 1.43, 1.67, 1.9, 2.13, 2.37, 2.6, 2.83, 3.07, 3.3, 3.53,
                 3.77, 4.0]
# OPENELM.md section 1: the exact key set of a real config.json.
REAL_KEYS = set(
    "activation_fn_name, architectures, auto_map, bos_token_id, eos_token_id, ffn_dim_divisor, "
    "ffn_multipliers, ffn_with_glu, head_dim, initializer_range, max_context_length, model_dim, "
    "model_type, normalization_layer_name, normalize_qk_projections, num_gqa_groups, "
    "num_kv_heads, num_query_heads, num_transformer_layers, qkv_multipliers, rope_freq_constant, "
    "rope_max_length, share_input_output_layers, torch_dtype, transformers_version, use_cache, "
    "vocab_size".split(", "))


def test_make_divisible_rule():
    assert make_divisible(640, 256) == 768        # 640+128=768 -> 768 (half-up)
    assert make_divisible(560, 256) == 512        # 688 -> 512: 8.6% down is allowed
    assert make_divisible(570, 256) == 768        # 698 -> 512 would be 10.2% down -> +256
    assert make_divisible(85.76, 64) == 128       # rounds to 64, < 90% of 85.76 -> +64
    assert make_divisible(10, 8) == 16            # 8 < 9 -> +8
    assert make_divisible(3, 8) == 8              # never below the divisor
    assert make_divisible(1280 * 0.73, 256) == 1024
    assert isinstance(make_divisible(100.0, 8), int)


@pytest.mark.parametrize("size", sorted(TABLES))
def test_derived_dims_match_openelm_tables(size):
    q, kv, ffn = TABLES[size]
    dims = derive_layer_dims(PRESETS[size])
    assert dims["n_head_q"] == q
    assert dims["n_head_kv"] == kv
    assert dims["ffn_dim"] == ffn
    cfg = PRESETS[size]
    assert cfg["num_query_heads"] == q and cfg["num_kv_heads"] == kv
    assert len(cfg["ffn_multipliers"]) == cfg["num_transformer_layers"]


@pytest.mark.parametrize("size", sorted(TABLES))
def test_parameter_totals(size):
    cfg = PRESETS[size]
    q, kv, ffn = TABLES[size]
    V, D, hd = cfg["vocab_size"], cfg["model_dim"], cfg["head_dim"]
    # OPENELM.md section 2 formula (shared embedding, no lm_head).
    total = V * D + D + sum(D * (q[i] + 2 * kv[i]) * hd + q[i] * hd * D + 2 * hd + 2 * D
                            + 3 * D * ffn[i] for i in range(len(q)))
    assert total == TOTAL_PARAMS[size]
    spec = parse_config(cfg)
    assert spec.n_params() == TOTAL_PARAMS[size]
    assert len(tensor_layout(spec)) == 2 + 8 * cfg["num_transformer_layers"]


def test_stored_ffn_multipliers_are_rounded_linspace():
    assert PRESETS["270M"]["ffn_multipliers"] == FFN_MULT_270M
    # float64 linspace endpoints are exact: first layer 0.5, last 4.0 for every size
    for size in TABLES:
        assert PRESETS[size]["ffn_multipliers"][0] == 0.5
        assert PRESETS[size]["ffn_multipliers"][-1] == 4.0


@pytest.mark.parametrize("size", sorted(TABLES))
def test_presets_have_exactly_the_real_keys(size):
    cfg = PRESETS[size]
    assert set(cfg) == REAL_KEYS
    assert list(cfg) == sorted(cfg)
    assert cfg["transformers_version"] == "4.39.3" and cfg["torch_dtype"] == "float32"
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_openelm.OpenELMForCausalLM"


def test_tiny_preset_layers_really_differ():
    spec = parse_config(make_config("tiny"))
    assert spec.n_layer == 4 and spec.d_model == 128 and spec.head_dim == 16
    assert spec.n_head_q == [4, 8, 8, 8]
    assert spec.n_head_kv == [1, 2, 2, 2]
    assert spec.ffn_dim == [64, 224, 352, 512]
    assert spec.vocab_size == 1024 and spec.max_context == 256
    assert make_config("tiny", vocab_size=300)["vocab_size"] == 300


def test_make_config_rederives_and_copies():
    cfg = make_config("tiny", model_dim=256)
    assert cfg["num_query_heads"] == derive_layer_dims(cfg)["n_head_q"] == [8, 12, 12, 16]
    cfg["num_query_heads"][0] = 99  # a deep copy: the preset must not change
    assert PRESETS["tiny"]["num_query_heads"][0] == 4
    # derived keys given explicitly are stored verbatim (to build inconsistent configs)
    assert make_config("tiny", num_query_heads=[4, 4, 4, 4])["num_query_heads"] == [4, 4, 4, 4]
    untied = make_config("tiny", share_input_output_layers=False)
    assert untied["tie_word_embeddings"] is False
    assert parse_config(untied).tied_embeddings is False
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("7B")


def test_parse_config_spec_fields():
    spec = parse_config(PRESETS["270M"])
    assert isinstance(spec, ModelSpec)
    meta = spec.to_metadata()
    assert meta["architecture"] == "openelm"
    assert list(meta)[1:] == ["n_layer", "d_model", "head_dim", "vocab_size", "n_head_q",
                              "n_head_kv", "ffn_dim", "rope_theta", "norm_eps", "max_context",
                              "bos_token_id", "eos_token_id", "tied_embeddings", "qk_norm"]
    assert meta["rope_theta"] == 10000.0 and isinstance(meta["rope_theta"], float)
    assert meta["norm_eps"] == 1e-6 and meta["max_context"] == 2048
    assert meta["tied_embeddings"] is True and meta["qk_norm"] is True


def test_qk_norm_off_and_norm_eps_override():
    """normalize_qk_projections=false drops q_norm/k_norm from the layout; rms_norm_eps (not an
    OpenELM field) overrides the hard-coded 1e-6."""
    spec = parse_config(make_config("tiny", normalize_qk_projections=False, rms_norm_eps=1e-5))
    assert spec.qk_norm is False and spec.norm_eps == 1e-5
    names = [t.oelm_name for t in tensor_layout(spec)]
    assert not [n for n in names if n.endswith(("q_norm", "k_norm"))]
    assert len(names) == 2 + 6 * 4


def test_multiplier_forms():
    cfg = make_config("tiny")
    # scalar multipliers: every layer the same
    cfg_s = {**cfg, "qkv_multipliers": 1.0, "ffn_multipliers": 2.0}
    dims = derive_layer_dims(cfg_s)
    assert dims["n_head_q"] == [8] * 4 and dims["ffn_dim"] == [256] * 4
    # an L-long ffn list is used as it is, not re-spaced
    custom = [4.0, 0.5, 4.0, 0.5]
    assert derive_layer_dims({**cfg, "ffn_multipliers": custom})["ffn_dim"] == [512, 64, 512, 64]
    # a pair is a linspace even when L == 2 (HF checks the pair case first)
    two = {**cfg, "num_transformer_layers": 2, "ffn_multipliers": [1.0, 2.0]}
    assert derive_layer_dims(two)["ffn_multipliers"] == [1.0, 2.0]
    with pytest.raises(ExportError, match="ffn_multipliers"):
        derive_layer_dims({**cfg, "ffn_multipliers": [1.0, 2.0, 3.0]})
    with pytest.raises(ExportError, match="qkv_multipliers"):
        derive_layer_dims({**cfg, "qkv_multipliers": [0.5, 0.6, 0.7, 1.0]})


def _broken(**changes):
    cfg = copy.deepcopy(PRESETS["tiny"])
    for k, v in changes.items():
        if v is ...:
            del cfg[k]
        else:
            cfg[k] = v
    return cfg


@pytest.mark.parametrize("changes, pattern", [
    ({"model_type": "llama"}, r"model_type is 'llama', expected 'openelm'"),
    ({"model_dim": ...}, r"config.json has no 'model_dim'"),
    ({"head_dim": 0}, r"head_dim = 0 is not a positive integer"),
    ({"num_gqa_groups": True}, r"num_gqa_groups = True is not a positive integer"),
    ({"ffn_with_glu": False}, r"ffn_with_glu = False is not supported"),
    ({"ffn_with_glu": "yes"}, r"ffn_with_glu = 'yes' is not true or false"),
    ({"normalize_qk_projections": "no"}, r"normalize_qk_projections = 'no' is not true or false"),
    ({"rms_norm_eps": 0}, r"rms_norm_eps = 0 is not a number in \(0, 1\]"),
    ({"activation_fn_name": "gelu"}, r"activation_fn_name = 'gelu' is not supported.*'swish' or 'silu'"),
    ({"normalization_layer_name": "layer_norm"}, r"normalization_layer_name = 'layer_norm'"),
    ({"rope_freq_constant": -1}, r"rope_freq_constant = -1 is not a positive number"),
    ({"eos_token_id": 5000}, r"eos_token_id = 5000 is not a valid token id for vocab_size = 1024"),
    ({"num_kv_heads": [1, 2, 2]}, r"num_kv_heads = \[1, 2, 2\] should be a list of 4"),
    ({"ffn_multipliers": [1.0, 2.0, 3.0]}, r"ffn_multipliers = \[1.0, 2.0, 3.0\] is not supported"),
    ({"tie_word_embeddings": "no"}, r"tie_word_embeddings = 'no'"),
])
def test_parse_config_errors(changes, pattern):
    with pytest.raises(ExportError, match=pattern):
        parse_config(_broken(**changes))


def test_parse_config_cross_checks_stored_heads():
    with pytest.raises(ExportError) as err:
        parse_config(_broken(num_query_heads=[4, 8, 12, 8]))
    msg = str(err.value)
    assert "num_query_heads[2] = 12" in msg and "gives 8 for layer 2" in msg
    with pytest.raises(ExportError, match=r"num_kv_heads\[0\] = 2.*gives 1 for layer 0"):
        parse_config(_broken(num_kv_heads=[2, 2, 2, 2]))
    # old configs without the stored lists are fine: HF recomputes them
    assert parse_config(_broken(num_query_heads=..., num_kv_heads=...)).n_head_q == [4, 8, 8, 8]


def test_tied_embeddings_follow_hf_quirk():
    # share_input_output_layers=false alone: HF still ties lm_head (tie_word_embeddings default true)
    assert parse_config(_broken(share_input_output_layers=False)).tied_embeddings is True
    spec = parse_config(_broken(share_input_output_layers=False, tie_word_embeddings=False))
    assert spec.tied_embeddings is False
    names = [t.oelm_name for t in tensor_layout(spec)]
    assert names[-1] == "output" and names[0] == "token_embd"


def test_layout_order_and_shapes_follow_format_md():
    spec = parse_config(PRESETS["tiny"])
    layout = tensor_layout(spec)
    per_layer = ["attn_norm", "attn_qkv", "attn_q_norm", "attn_k_norm", "attn_output",
                 "ffn_norm", "ffn_gate_up", "ffn_down"]
    expected = ["token_embd"] + [f"blk.{i}.{n}" for i in range(4) for n in per_layer] + ["output_norm"]
    assert [t.oelm_name for t in layout] == expected
    shapes = {t.hf_name: t.shape for t in layout}
    assert shapes["transformer.layers.1.attn.qkv_proj.weight"] == ((8 + 2 * 2) * 16, 128)
    assert shapes["transformer.layers.1.attn.out_proj.weight"] == (128, 8 * 16)
    assert shapes["transformer.layers.3.ffn.proj_1.weight"] == (2 * 512, 128)
    assert shapes["transformer.layers.3.ffn.proj_2.weight"] == (128, 512)
    assert [t.hf_name for t in layout if t.is_norm][-1] == "transformer.norm.weight"
    assert sum(t.is_norm for t in layout) == 4 * 4 + 1
    assert math.prod(shapes["transformer.token_embeddings.weight"]) == 1024 * 128


def test_linspace_is_float64_with_python_round():
    # 28 layers: linspace(0.5, 1.0) hits values whose 2-decimal rounding depends on float64
    # representation; the stored multipliers must equal Python round() of NumPy's values.
    cfg = PRESETS["1_1B"]
    ref = [round(float(v), 2) for v in np.linspace(0.5, 4.0, 28)]
    assert cfg["ffn_multipliers"] == ref
