"""Tests of tests/oracle.py itself on hand-computed cases: RMSNorm, rotate-half RoPE, GQA mapping,
causality, fused splits, repetition penalty and the top-k/top-p/min-p/temperature order, plus a
second, token-at-a-time implementation. Needs no compiled module.
"""
import math

import numpy as np
import pytest

import oracle


def _tiny_cfg(nq=(4, 8), nkv=(1, 2), hd=8, D=16, V=32, tied=True):
    return {
        "num_transformer_layers": len(nq), "model_dim": D, "head_dim": hd,
        "num_query_heads": list(nq), "num_kv_heads": list(nkv), "vocab_size": V,
        "rope_freq_constant": 10000, "normalize_qk_projections": True,
        "share_input_output_layers": tied,
    }


def _random_weights(cfg, F=(24, 40), seed=0):
    rng = np.random.default_rng(seed)
    D, hd, V = cfg["model_dim"], cfg["head_dim"], cfg["vocab_size"]
    w = {"transformer.token_embeddings.weight": rng.normal(0, 1, (V, D)),
         "transformer.norm.weight": rng.uniform(0.5, 1.5, D)}
    for i in range(cfg["num_transformer_layers"]):
        nq, nkv = cfg["num_query_heads"][i], cfg["num_kv_heads"][i]
        p = f"transformer.layers.{i}."
        w[p + "attn_norm.weight"] = rng.uniform(0.5, 1.5, D)
        w[p + "ffn_norm.weight"] = rng.uniform(0.5, 1.5, D)
        w[p + "attn.qkv_proj.weight"] = rng.normal(0, D ** -0.5, ((nq + 2 * nkv) * hd, D))
        w[p + "attn.q_norm.weight"] = rng.uniform(0.5, 1.5, hd)
        w[p + "attn.k_norm.weight"] = rng.uniform(0.5, 1.5, hd)
        w[p + "attn.out_proj.weight"] = rng.normal(0, (nq * hd) ** -0.5, (D, nq * hd))
        w[p + "ffn.proj_1.weight"] = rng.normal(0, D ** -0.5, (2 * F[i], D))
        w[p + "ffn.proj_2.weight"] = rng.normal(0, F[i] ** -0.5, (D, F[i]))
    if not cfg["share_input_output_layers"]:
        w["lm_head.weight"] = rng.normal(0, 1, (V, D))
    return w


# ----------------------------------------------------------------------------- primitives

def test_rms_norm_hand_case():
    y = oracle.rms_norm(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    r = math.sqrt((9 + 16) / 2 + 1e-6)
    np.testing.assert_allclose(y, [3 / r, 8 / r], rtol=1e-14)
    np.testing.assert_allclose(y, [0.8485281, 2.2627417], rtol=1e-6)   # by hand: 3/3.5355339
    # per-row normalisation on a 2-D input
    y2 = oracle.rms_norm(np.array([[3.0, 4.0], [0.0, 2.0]]), np.ones(2))
    np.testing.assert_allclose(y2[1], [0.0, 2 / math.sqrt(2 + 1e-6)], rtol=1e-14)


def test_rope_rotate_half_hand_case():
    x = np.array([[1.0, 2.0, 3.0, 4.0]])          # one token, hd = 4: pairs (0,2) and (1,3)
    # position 0 is the identity
    np.testing.assert_allclose(oracle.rope(x, [0], 10000.0), x, atol=0)
    # position 1: inv_freq = [1, 1/100]
    c1, s1, c2, s2 = math.cos(1.0), math.sin(1.0), math.cos(0.01), math.sin(0.01)
    expected = [1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2]
    np.testing.assert_allclose(oracle.rope(x, [1], 10000.0)[0], expected, rtol=1e-14)
    # position 3, theta 100: inv_freq = [1, 1/10]
    c1, s1, c2, s2 = math.cos(3.0), math.sin(3.0), math.cos(0.3), math.sin(0.3)
    expected = [1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2]
    np.testing.assert_allclose(oracle.rope(x, [3], 100.0)[0], expected, rtol=1e-14)
    # numeric: cos(1) = 0.5403023, sin(1) = 0.8414710
    np.testing.assert_allclose(oracle.rope(x, [1], 1e4)[0, 0], 0.5403023 - 3 * 0.8414710,
                               atol=1e-6)


def test_rope_is_a_rotation_and_relative():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(1, 16)), rng.normal(size=(1, 16))
    # norm preserved
    assert np.isclose(np.linalg.norm(oracle.rope(q, [7], 1e4)), np.linalg.norm(q))
    # q.k depends only on the position difference
    d1 = (oracle.rope(q, [5], 1e4) @ oracle.rope(k, [2], 1e4).T).item()
    d2 = (oracle.rope(q, [13], 1e4) @ oracle.rope(k, [10], 1e4).T).item()
    assert d1 == pytest.approx(d2, rel=1e-10)


def test_silu_softmax():
    np.testing.assert_allclose(oracle.silu(np.array([0.0, 1.0, -2.0])),
                               [0.0, 1 / (1 + math.exp(-1)), -2 / (1 + math.exp(2))])
    np.testing.assert_allclose(oracle.softmax(np.array([0.0, math.log(3.0), -np.inf])),
                               [0.25, 0.75, 0.0])


def test_gqa_mapping_hand_case():
    # nq = 4 query heads, nkv = 2 kv heads: query heads 0,1 -> kv 0; 2,3 -> kv 1.
    hd = 2
    q = np.zeros((4, 1, hd))
    k = np.zeros((2, 1, hd))
    v = np.array([[[10.0, 11.0]], [[20.0, 21.0]]])
    out = oracle.attention_core(q, k, v)
    np.testing.assert_allclose(out[:, 0], [[10, 11], [10, 11], [20, 21], [20, 21]])
    # two tokens: token 1 attends to both keys with weights given by its own kv head
    q = np.zeros((4, 2, hd)); q[:, 1] = [1.0, 0.0]
    k = np.array([[[0.0, 0.0], [2.0, 0.0]],            # kv 0: scores (0, 2/sqrt2)
                  [[0.0, 0.0], [-2.0, 0.0]]])          # kv 1: scores (0, -2/sqrt2)
    v = np.array([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 3.0]]])
    out = oracle.attention_core(q, k, v)
    a = math.exp(2 / math.sqrt(2)); b = math.exp(-2 / math.sqrt(2))
    np.testing.assert_allclose(out[0, 1], [1 / (1 + a), a / (1 + a)])
    np.testing.assert_allclose(out[1, 1], [1 / (1 + a), a / (1 + a)])
    np.testing.assert_allclose(out[2, 1], [3 / (1 + b), 3 * b / (1 + b)])
    np.testing.assert_allclose(out[3, 1], [3 / (1 + b), 3 * b / (1 + b)])
    # token 0 sees only key 0
    np.testing.assert_allclose(out[:, 0], [[1, 0], [1, 0], [3, 0], [3, 0]])


def test_attention_scale_is_inv_sqrt_hd():
    hd = 4
    q = np.array([[[0.0] * hd, [1.0, 0, 0, 0]]])
    k = np.array([[[0.0] * hd, [3.0, 0, 0, 0]]])
    v = np.array([[[1.0, 0, 0, 0], [0.0, 1, 0, 0]]])
    w1 = math.exp(3 / 2) / (1 + math.exp(3 / 2))
    np.testing.assert_allclose(oracle.attention_core(q, k, v)[0, 1], [1 - w1, w1, 0, 0])


# ----------------------------------------------------------------------------- whole model

def test_causal_prefix_logits_unchanged():
    cfg = _tiny_cfg()
    w = _random_weights(cfg)
    ids = [1, 5, 9, 3, 30, 7, 7, 2]
    full = oracle.forward(w, cfg, ids)
    for n in (1, 3, 6):
        np.testing.assert_allclose(oracle.forward(w, cfg, ids[:n]), full[:n], rtol=1e-12,
                                   atol=1e-12)
    # and the last position does depend on earlier tokens
    other = oracle.forward(w, cfg, [4] + ids[1:])
    assert np.abs(other[-1] - full[-1]).max() > 1e-3


def _incremental_logits(w, cfg, ids):
    """A second, token-at-a-time implementation with an explicit KV cache (rotated keys)."""
    hd, L = cfg["head_dim"], cfg["num_transformer_layers"]
    theta = cfg["rope_freq_constant"]
    cache = [([], []) for _ in range(L)]
    E = w["transformer.token_embeddings.weight"]
    rows = []
    for pos, t in enumerate(ids):
        x = E[t].astype(np.float64)
        for i in range(L):
            p = f"transformer.layers.{i}."
            nq, nkv = cfg["num_query_heads"][i], cfg["num_kv_heads"][i]
            h = oracle.rms_norm(x, w[p + "attn_norm.weight"])
            qkv = w[p + "attn.qkv_proj.weight"] @ h
            heads = [qkv[j * hd:(j + 1) * hd] for j in range(nq + 2 * nkv)]
            qs = [oracle.rope(oracle.rms_norm(hq, w[p + "attn.q_norm.weight"])[None], [pos],
                              theta)[0] for hq in heads[:nq]]
            ks = [oracle.rope(oracle.rms_norm(hk, w[p + "attn.k_norm.weight"])[None], [pos],
                              theta)[0] for hk in heads[nq:nq + nkv]]
            vs = heads[nq + nkv:]
            cache[i][0].append(ks)
            cache[i][1].append(vs)
            outs = []
            for j in range(nq):
                g = j // (nq // nkv)
                sc = np.array([qs[j] @ cache[i][0][s][g] for s in range(pos + 1)]) / math.sqrt(hd)
                pr = np.exp(sc - sc.max()); pr /= pr.sum()
                outs.append(sum(pr[s] * cache[i][1][s][g] for s in range(pos + 1)))
            x = x + w[p + "attn.out_proj.weight"] @ np.concatenate(outs)
            h = oracle.rms_norm(x, w[p + "ffn_norm.weight"])
            F = w[p + "ffn.proj_1.weight"].shape[0] // 2
            y = w[p + "ffn.proj_1.weight"] @ h
            x = x + w[p + "ffn.proj_2.weight"] @ (oracle.silu(y[:F]) * y[F:])
        head = E if cfg["share_input_output_layers"] else w["lm_head.weight"]
        rows.append(head @ oracle.rms_norm(x, w["transformer.norm.weight"]))
    return np.array(rows)


@pytest.mark.parametrize("tied", [True, False])
def test_forward_matches_incremental_implementation(tied):
    cfg = _tiny_cfg(tied=tied)
    w = _random_weights(cfg, seed=3)
    ids = [1, 17, 4, 4, 29, 0, 11]
    np.testing.assert_allclose(oracle.forward(w, cfg, ids), _incremental_logits(w, cfg, ids),
                               rtol=1e-10, atol=1e-10)


def test_untied_head_is_used():
    cfg = _tiny_cfg(tied=False)
    w = _random_weights(cfg, seed=4)
    a = oracle.forward(w, cfg, [1, 2, 3])
    w2 = dict(w); w2["lm_head.weight"] = w["lm_head.weight"] * 2
    np.testing.assert_allclose(oracle.forward(w2, cfg, [1, 2, 3]), 2 * a, rtol=1e-12)


def test_fused_splits_order():
    """Zeroing the up half (rows F..2F) of proj_1 kills the FFN; zeroing the v heads kills
    attention; a wrong split order in the oracle would not give exactly these results."""
    cfg = _tiny_cfg(nq=(4,), nkv=(2,))
    w = _random_weights(cfg, F=(24,), seed=5)
    h = np.random.default_rng(0).normal(size=(3, cfg["model_dim"]))
    w_up0 = dict(w); p1 = w["transformer.layers.0.ffn.proj_1.weight"].copy(); p1[24:] = 0
    w_up0["transformer.layers.0.ffn.proj_1.weight"] = p1
    assert np.abs(oracle.ffn(h, w_up0, cfg, 0)).max() == 0
    w_gate0 = dict(w); p1 = w["transformer.layers.0.ffn.proj_1.weight"].copy(); p1[:24] = 0
    w_gate0["transformer.layers.0.ffn.proj_1.weight"] = p1
    assert np.abs(oracle.ffn(h, w_gate0, cfg, 0)).max() == 0       # silu(0) = 0
    hd = cfg["head_dim"]
    w_v0 = dict(w); qkv = w["transformer.layers.0.attn.qkv_proj.weight"].copy()
    qkv[(4 + 2) * hd:] = 0
    w_v0["transformer.layers.0.attn.qkv_proj.weight"] = qkv
    assert np.abs(oracle.attention(h, w_v0, cfg, 0)).max() == 0
    w_k0 = dict(w); qkv = w["transformer.layers.0.attn.qkv_proj.weight"].copy()
    qkv[4 * hd:(4 + 2) * hd] = 0
    w_k0["transformer.layers.0.attn.qkv_proj.weight"] = qkv
    assert np.abs(oracle.attention(h, w_k0, cfg, 0)).max() > 0      # uniform attention


def test_greedy_stops_after_eos_and_matches_forward():
    cfg = _tiny_cfg()
    w = _random_weights(cfg, seed=6)
    prompt = [1, 8, 3]
    toks = oracle.greedy(w, cfg, prompt, 6, eos_id=-1)
    assert len(toks) == 6
    seq = prompt + toks
    logits = oracle.forward(w, cfg, seq)
    assert toks == [int(np.argmax(logits[len(prompt) - 1 + i])) for i in range(6)]
    # declare the 3rd generated token to be EOS: greedy stops right after it
    eos = toks[2]
    if eos not in toks[:2]:
        assert oracle.greedy(w, cfg, prompt, 6, eos_id=eos) == toks[:3]
    assert oracle.greedy(w, cfg, prompt, 0) == []


def test_greedy_repetition_penalty_changes_choice():
    cfg = _tiny_cfg()
    w = _random_weights(cfg, seed=7)
    toks = oracle.greedy(w, cfg, [1, 3], 12, eos_id=-1, repetition_penalty=1e6)
    # with a huge penalty no token of the sequence can repeat while unseen tokens remain
    seq = [1, 3] + toks
    assert len(set(seq)) == len(seq)


# ----------------------------------------------------------------------------- sampling

P4 = np.array([0.5, 0.3, 0.15, 0.05])


def test_repetition_penalty_hand_case():
    out = oracle.apply_repetition_penalty([2.0, -1.0, 0.5, 3.0], [0, 1, 1], 2.0)
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 3.0])          # duplicates count once
    out = oracle.apply_repetition_penalty([2.0, -1.0, 0.0], [0, 1, 2], 0.5)
    np.testing.assert_allclose(out, [4.0, -0.5, 0.0])


def test_top_k_hand_case():
    p = oracle.sampling_probs([1.0, 3.0, 2.0, 0.0], [], 1.0, top_k=2)
    e = math.exp(1.0)
    np.testing.assert_allclose(p, [0, e / (1 + e), 1 / (1 + e), 0], rtol=1e-12)
    # ties at the k-th value are kept (HF compares with '<' the k-th largest)
    p = oracle.sampling_probs([1.0, 2.0, 2.0, 0.0], [], 1.0, top_k=1)
    np.testing.assert_allclose(p, [0, 0.5, 0.5, 0])
    # k larger than the vocabulary keeps everything
    np.testing.assert_allclose(oracle.sampling_probs(np.log(P4), [], 1.0, top_k=10), P4)


@pytest.mark.parametrize("top_p,expected", [
    (0.75, [0.625, 0.375, 0, 0]),           # ascending cum 0.05, 0.20 <= 0.25 dropped
    (0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),   # cum 0.05 <= 0.1 dropped, 0.2 kept
    (0.45, [1, 0, 0, 0]),                   # cum 0.5 <= 0.55: only the top token survives
    (1e-9, [1, 0, 0, 0]),                   # at least one token is always kept
])
def test_top_p_hand_case(top_p, expected):
    p = oracle.sampling_probs(np.log(P4)[[2, 0, 3, 1]], [], 1.0, top_p=top_p)
    np.testing.assert_allclose(p, np.array(expected)[[2, 0, 3, 1]], atol=1e-12)


@pytest.mark.parametrize("min_p,expected", [
    (0.4, [0.625, 0.375, 0, 0]),            # threshold 0.2
    (0.12, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),  # threshold 0.06
    (1.0, [1, 0, 0, 0]),
])
def test_min_p_hand_case(min_p, expected):
    p = oracle.sampling_probs(np.log(P4), [], 1.0, min_p=min_p)
    np.testing.assert_allclose(p, expected, atol=1e-12)


def test_temperature_applies_before_top_p_and_min_p():
    s = np.sqrt(P4)                         # temperature 2 -> probs proportional to sqrt(p)
    # top_p 0.75 after temperature 2: tempered probs 0.379, 0.294, 0.208, 0.120 -> only the
    # smallest (cum 0.120 <= 0.25) goes; without tempering two would go (see above).
    p = oracle.sampling_probs(np.log(P4), [], 2.0, top_p=0.75)
    np.testing.assert_allclose(p, np.r_[s[:3] / s[:3].sum(), 0], atol=1e-12)
    # min_p 0.5 after temperature 2: ratios to max are sqrt(p/0.5) = 1, .775, .548, .316
    p = oracle.sampling_probs(np.log(P4), [], 2.0, min_p=0.5)
    np.testing.assert_allclose(p, np.r_[s[:3] / s[:3].sum(), 0], atol=1e-12)
    # plain temperature
    np.testing.assert_allclose(oracle.sampling_probs(np.log(P4), [], 2.0), s / s.sum())


def test_top_k_applies_before_top_p():
    P = np.array([0.4, 0.3, 0.2, 0.1])
    # top_k 3 -> 4/9, 3/9, 2/9; top_p 0.7 drops cum 2/9 <= 0.3 -> keep 4/7, 3/7
    p = oracle.sampling_probs(np.log(P), [], 1.0, top_k=3, top_p=0.7)
    np.testing.assert_allclose(p, [4 / 7, 3 / 7, 0, 0], atol=1e-12)


def test_penalty_before_everything_and_greedy_temperature_zero():
    logits = np.array([2.0, 1.9, -1.0, 0.0])
    # greedy: argmax after penalty (2.0/2 = 1.0 < 1.9)
    np.testing.assert_allclose(oracle.sampling_probs(logits, [0], 0.0, repetition_penalty=2.0),
                               [0, 1, 0, 0])
    np.testing.assert_allclose(oracle.sampling_probs(logits, [], 0.0), [1, 0, 0, 0])
    # top_k 1 on penalized logits picks index 1 as well
    np.testing.assert_allclose(
        oracle.sampling_probs(logits, [0, 0], 1.0, top_k=1, repetition_penalty=2.0),
        [0, 1, 0, 0])


def test_disabled_settings_are_plain_softmax():
    rng = np.random.default_rng(2)
    x = rng.normal(size=50)
    np.testing.assert_allclose(oracle.sampling_probs(x, [1, 2, 3], 1.0, 0, 1.0, 0.0, 1.0),
                               oracle.softmax(x), rtol=1e-13)


# ----------------------------------------------------------------------------- rounding

def test_bf16_rounding_ties_to_even():
    def f(bits):
        return np.array([bits], np.uint32).view(np.float32)
    # 1.0 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties to even -> 1.0
    assert oracle.round_to_bf16(f(0x3F808000))[0] == 1.0
    # 0x3F818000 halfway between 0x3F81 (odd) and 0x3F82 (even) -> 0x3F82
    assert oracle.round_to_bf16(f(0x3F818000)).view(np.uint32)[0] == 0x3F820000
    assert oracle.round_to_bf16(f(0x3F808001)).view(np.uint32)[0] == 0x3F810000
    assert oracle.round_to_bf16(np.float32(-2.5)) == -2.5
