"""Can a sparse policy (TEAL/CATS-style activation thresholds) read fewer bytes than the exact
mode under a memory budget? Measured on the trained stand-in (benchmarks/standin.py), before any
such policy is built:

    python benchmarks/bench_sparsity.py [--eval-windows 2] [--ctx 512] [--out results/sparsity]

Our files store a weight matrix in panels of 16 rows (q8_b32r16i etc., FORMAT.md) and the flash
layout stores neurons in bundles (256 by default: gate rows, up rows, down columns), read with
O_DIRECT in whole 4 KiB pages. So a policy skips I/O only for what is entirely inactive for a
token: an up-projection panel of 16 neurons (its rows are contiguous: 16 x D weights, several
pages), or a whole bundle (down columns are stored across every row panel in blocks of 32
neurons, a few hundred bytes each, so only a whole bundle's down part is contiguous).

For each policy and target sparsity s, per-layer thresholds are the s-quantile of the dense
model's activations on calibration text (TEAL's calibration, corpus tokens from
standin.CALIBRATION_START on); then on evaluation text (the corpus tokens before it) the model
runs with the threshold applied and this reports perplexity and KL divergence against the dense
model (the quality gate: dPPL <= 3 %, KL <= 0.05), and per token and layer the share of
  neurons            inactive (their up row and down column need not be read)
  16-neuron panels   entirely inactive (an up panel that could be skipped)
  256-neuron bundles entirely inactive (a bundle that could be skipped)
in the checkpoint's neuron order and in the flash layout's hottest-first order (ranked on the
calibration text with flash.py's rule), and the share of FFN bytes a perfect policy could skip
at page granularity in the flash layout (a bundle's bytes are a third gate rows, a third up rows,
a third down columns): inactive up panels, and the down part of inactive bundles.

Policies: "gate" (CATS: |silu(gate)| below the threshold zeroes the neuron; the gate rows are
always read), "act" (TEAL on the down projection's input |silu(gate) * up|: gate and up always
read, only down columns skippable), "input" (TEAL on the FFN's input, the normed hidden state:
inactive input dimensions are columns of gate/up, stored in 32-column blocks of 544 bytes inside
every row panel, so no page can be skipped unless 256 consecutive dimensions are inactive: that
share is reported).

The forward pass is tests/oracle.py's float64 reference (independent of the runtime; the
runtime's exact mode computes the same model), with its FFN replaced by the thresholded one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

import oracle  # noqa: E402
import standin  # noqa: E402
from openelm_rt.tokenizer_train import CORPUS_PATH  # noqa: E402

PANEL, BUNDLE, KBLOCK, PAGE_DIMS = 16, 256, 32, 256


def log(msg):
    print(f"[bench_sparsity] {msg}", file=sys.stderr, flush=True)


class Probe:
    """oracle.ffn replacement: records activations (calibration) or applies thresholds."""

    def __init__(self, weights, cfg):
        self.w, self.cfg = weights, cfg
        self.mode, self.thr = None, None      # policy and per-layer thresholds (None: dense)
        self.record = None                    # calibration: per layer, lists of |values|
        self.masks = None                     # evaluation: per layer, lists of [T, F] active masks
        self.in_masks = None                  # "input": per layer, lists of [T, D] active masks

    def __call__(self, h, weights, cfg, i):
        p = f"transformer.layers.{i}.ffn."
        W1 = self.w[p + "proj_1.weight"]
        F = W1.shape[0] // 2
        if self.mode == "input" and self.thr is not None:
            keep = np.abs(h) >= self.thr[i]
            h = h * keep
            self.in_masks[i].append(keep)
        y = h @ W1.T
        gate, up = y[:, :F], y[:, F:]
        sg = oracle.silu(gate)
        a = sg * up
        if self.record is not None:
            self.record["gate"][i].append(np.abs(sg).astype(np.float32))
            self.record["act"][i].append(np.abs(a).astype(np.float32))
            self.record["input"][i].append(np.abs(h).astype(np.float32))
        if self.mode in ("gate", "act") and self.thr is not None:
            keep = (np.abs(sg) if self.mode == "gate" else np.abs(a)) >= self.thr[i]
            a = a * keep
            self.masks[i].append(keep)
        elif self.masks is not None and self.mode is None:
            self.masks[i].append(np.abs(a) > 0)
        return a @ self.w[p + "proj_2.weight"].T


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def group_inactive(masks, order, size):
    """Share of groups of `size` consecutive neurons (in `order`) with no active neuron, over
    tokens: masks [T, F] booleans (True = active)."""
    m = masks[:, order]
    F = m.shape[1]
    n = F // size * size
    if n == 0:
        return 0.0
    g = m[:, :n].reshape(m.shape[0], -1, size).any(-1)
    return float(1.0 - g.mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--calib-windows", type=int, default=1)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.1, 0.25, 0.4, 0.5, 0.7])
    ap.add_argument("--policies", nargs="+", default=["gate", "act", "input"])
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)

    s = standin.ensure_standin(dtypes=())
    cfg, weights = oracle.read_checkpoint(s.checkpoint_dir)
    weights = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    ids = s.tokenizer().encode(CORPUS_PATH.read_text(encoding="utf-8")).ids
    W = args.ctx
    evals = [ids[i * W:(i + 1) * W] for i in range(args.eval_windows)]
    cs = standin.CALIBRATION_START
    calib = [ids[cs + i * W:cs + (i + 1) * W] for i in range(args.calib_windows)]
    n_layer = int(cfg["num_transformer_layers"])
    probe = Probe(weights, cfg)
    oracle.ffn = probe

    def run(windows):
        return [oracle.forward(weights, cfg, w) for w in windows]

    t0 = time.time()
    probe.record = {k: [[] for _ in range(n_layer)] for k in ("gate", "act", "input")}
    run(calib)
    rec = {k: [np.concatenate(v) for v in probe.record[k]] for k, v in probe.record.items()}
    probe.record = None
    # The flash layout's ranking (flash.py): tokens on which |act| exceeds the token's mean, ties
    # by summed magnitude; hottest first.
    hot = []
    for a in rec["act"]:
        act = (a > a.mean(1, keepdims=True)).sum(0)
        hot.append(np.lexsort((-a.sum(0), -act)))
    log(f"calibration: {sum(len(c) for c in calib)} tokens, {time.time() - t0:.0f} s")

    t0 = time.time()
    dense = [log_softmax(z) for z in run(evals)]
    tgt = [np.asarray(w[1:]) for w in evals]
    nll = lambda lps: float(np.mean(np.concatenate([-lp[np.arange(len(t)), t] for lp, t in zip(lps, tgt)])))  # noqa: E731
    dense_nll = nll([lp[:-1] for lp in dense])
    log(f"dense: ppl {np.exp(dense_nll):.3f} ({time.time() - t0:.0f} s)")

    rows = []
    for pol in args.policies:
        for sp in args.sparsity:
            t0 = time.time()
            probe.mode = pol
            probe.thr = [float(np.quantile(rec[pol][i], sp)) for i in range(n_layer)]
            probe.masks = [[] for _ in range(n_layer)]
            probe.in_masks = [[] for _ in range(n_layer)]
            lps = [log_softmax(z) for z in run(evals)]
            kl = float(np.mean(np.concatenate([(np.exp(d) * (d - q)).sum(-1) for d, q in zip(dense, lps)])))
            ppl = float(np.exp(nll([lp[:-1] for lp in lps])))
            r = {"policy": pol, "target_sparsity": sp, "ppl": ppl, "dppl_pct": 100 * (ppl / np.exp(dense_nll) - 1),
                 "kl": kl}
            if pol == "input":
                m = [np.concatenate(x) for x in probe.in_masks]
                D = m[0].shape[1]
                ident = np.arange(D)
                r["inactive_dims"] = float(np.mean([1 - x.mean() for x in m]))
                r["inactive_kblocks32"] = float(np.mean([group_inactive(x, ident, KBLOCK) for x in m]))
                r["inactive_runs256"] = float(np.mean([group_inactive(x, ident, PAGE_DIMS) for x in m]))
                r["skippable_ffn_bytes"] = r["inactive_runs256"] * 2 / 3  # gate and up columns only
            else:
                m = [np.concatenate(x) for x in probe.masks]
                ident = [np.arange(x.shape[1]) for x in m]
                r["inactive_neurons"] = float(np.mean([1 - x.mean() for x in m]))
                for name, order in (("ckpt", ident), ("hot", hot)):
                    r[f"inactive_panels16_{name}"] = float(np.mean([group_inactive(x, o, PANEL) for x, o in zip(m, order)]))
                    r[f"inactive_bundles256_{name}"] = float(np.mean([group_inactive(x, o, BUNDLE) for x, o in zip(m, order)]))
                # A perfect policy in the flash layout (hottest-first), each third of a bundle's
                # bytes being its gate rows, up rows, down columns: the gate policy reads every
                # gate row (it decides on them), skips the up panels that are inactive and the
                # down part of bundles that are; the act policy needs gate and up of every
                # neuron, so it skips only the down part of inactive bundles.
                b, pn = r["inactive_bundles256_hot"], r["inactive_panels16_hot"]
                r["skippable_ffn_bytes"] = (pn + b) / 3 if pol == "gate" else b / 3
            r["seconds"] = round(time.time() - t0, 1)
            rows.append(r)
            log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    probe.mode = None

    head = ("| policy | target sparsity | PPL (dense %.3f) | dPPL | KL | inactive neurons (dims) | "
            "16-panels inactive, ckpt / hot order | 256-bundles inactive, ckpt / hot | FFN bytes a perfect policy skips |"
            % np.exp(dense_nll))
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        gate = "**pass**" if r["dppl_pct"] <= 3 and r["kl"] <= 0.05 else "fail"
        if r["policy"] == "input":
            cells = [f"{100 * r['inactive_dims']:.0f} % dims", f"32-dim blocks {100 * r['inactive_kblocks32']:.2f} %",
                     f"256-dim runs {100 * r['inactive_runs256']:.2f} %"]
        else:
            cells = [f"{100 * r['inactive_neurons']:.0f} %",
                     f"{100 * r['inactive_panels16_ckpt']:.2f} / {100 * r['inactive_panels16_hot']:.2f} %",
                     f"{100 * r['inactive_bundles256_ckpt']:.2f} / {100 * r['inactive_bundles256_hot']:.2f} %"]
        lines.append(f"| {r['policy']} | {r['target_sparsity']:.0%} | {r['ppl']:.3f} | {r['dppl_pct']:+.1f} % ({gate}) | "
                     f"{r['kl']:.4f} | " + " | ".join(cells) + f" | {100 * r['skippable_ffn_bytes']:.2f} % |")
    md = "\n".join(lines)
    print(md)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"dense_ppl": float(np.exp(dense_nll)), "eval_tokens": sum(len(t) for t in tgt),
                       "calib_tokens": sum(len(c) for c in calib), "rows": rows}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
