"""The `openelm-rt` command: generate text, run the demo, inspect a model file.

    openelm-rt generate --model M.oelm --prompt TEXT [--max-new-tokens N]
                        [--generate_kwargs repetition_penalty=1.2 top_k=40 ...]
                        [--generate_kwargs prompt_lookup_num_tokens=10] [--assistant_model SMALL.oelm]
                        [--generate_kwargs ngram_cache=true] [--ngram_corpus TEXT_FILE]
    openelm-rt generate --model M.oelm --chat [--system TEXT]   (Instruct models; stdin)
    openelm-rt demo     (random OpenELM-270M weights when you have no checkpoint)
    openelm-rt info M.oelm [--verify]
    openelm-rt perplexity M.oelm --text FILE | --ids FILE [--ctx 512] [--kl-base BASE.oelm]
    openelm-rt serve M.oelm [--host 127.0.0.1] [--port 8080] [--api-key KEY]   (extra [serve])
    openelm-rt eval --model_args pretrained=M.oelm --tasks arc_easy ...   (lm-eval's flags)

--model takes an .oelm file or a Hugging Face OpenELM checkpoint directory (exported once
into ~/.cache/openelm_rt).

Flags mirror the OpenELM model card's generate_openelm.py where they overlap
(--model, --prompt, --max_length, --generate_kwargs).
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USAGE = 2

# generate_kwargs keys we implement, with Hugging Face meanings.
_SUPPORTED_KWARGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                     "repetition_penalty", "do_sample", "seed", "prompt_lookup_num_tokens",
                     "max_matching_ngram_size", "num_assistant_tokens", "num_assistant_tokens_schedule",
                     "assistant_confidence_threshold", "ngram_cache", "ngram_num_tokens")
# Keys of Hugging Face generate() that exist upstream but are not implemented here yet.
_NOT_YET = ("num_beams", "num_return_sequences")


class UsageError(Exception):
    pass


def _parse_value(v: str):
    """generate_openelm.py's rule: int if it parses, else float, else the string."""
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def parse_generate_kwargs(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--generate_kwargs entry {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        if k == "assistant_model":
            raise UsageError("the assistant model is a flag of its own, as in generate_openelm.py: "
                             "--assistant_model SMALLER.oelm")
        if k in _NOT_YET:
            raise UsageError(f"generate_kwargs key {k!r} is not supported by openelm-rt yet; "
                             f"supported keys: {', '.join(_SUPPORTED_KWARGS)}")
        if k not in _SUPPORTED_KWARGS:
            raise UsageError(f"unknown generate_kwargs key {k!r}; supported keys: {', '.join(_SUPPORTED_KWARGS)}")
        out[k] = _parse_value(v)
    return out


def _sampling_from_kwargs(kw: dict) -> dict:
    """Map HF-style kwargs onto Session.generate arguments.

    HF samples only with do_sample=True; here giving a temperature also turns sampling
    on, and do_sample=True without a temperature means temperature 1.0 (HF's default).
    do_sample=False forces greedy decoding.
    """
    kw = dict(kw)
    do_sample = kw.pop("do_sample", None)
    if do_sample is not None and not isinstance(do_sample, (bool, int)):
        raise UsageError(f"do_sample must be true/false, got {do_sample!r}")
    if do_sample is False or do_sample == 0:
        kw["temperature"] = 0.0
    elif do_sample and "temperature" not in kw:
        kw["temperature"] = 1.0
    return kw


def _speed_line(r) -> str:
    spec = ""
    if r.speculation is not None:
        sp = r.speculation
        rate = sp["accepted"] / sp["proposed"] if sp["proposed"] else 0.0
        spec = (f" (speculation {sp['mode']}: {sp['accepted']}/{sp['proposed']} proposed tokens accepted, "
                f"{rate:.0%}; {sp['steps']} steps)")
    return (f"[openelm-rt] prompt {len(r.prompt_token_ids)} tokens, prefill {r.prefill_tokens_per_s:.1f} tok/s; "
            f"generated {len(r.token_ids)} tokens, decode {r.decode_tokens_per_s:.1f} tok/s{spec}; "
            f"finish: {r.finish_reason}")


def _print_stream(it, stream=True):
    """Print a generation stream's text (as it comes, or at the end), a newline, and the
    speed line on stderr; returns the result."""
    out = sys.stdout
    for piece in it:
        if stream:
            out.write(piece)
            out.flush()
    r = it.result
    if not stream:
        out.write(r.text)
    out.write("\n")
    out.flush()
    print(_speed_line(r), file=sys.stderr)
    return r


def _run_generation(session, prompt, max_new_tokens, kwargs, echo_prompt=True, stream=True):
    it = session.generate(prompt, max_new_tokens=max_new_tokens, stream=True, **kwargs)  # validates everything
    if echo_prompt:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    return _print_stream(it, stream)


def _user_lines(first):
    """The user's messages: `first` (from --prompt) if given, then each line of stdin until EOF."""
    if first is not None:
        yield first
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\r\n")


def _run_chat(session, args, max_new_tokens, kwargs) -> int:
    """Multi-turn chat: each user message gets a reply, printed (streamed unless --no-stream)
    and ended by a newline; the whole history is the prompt of the next turn."""
    history = [{"role": "system", "content": args.system}] if args.system is not None else []
    for user in _user_lines(args.prompt):
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        r = _print_stream(session.chat(history, max_new_tokens=max_new_tokens, stream=True, **kwargs),
                          stream=not args.no_stream)
        history.append({"role": "assistant", "content": r.text})
    return 0


def cmd_generate(args) -> int:
    from .session import Session

    if args.prompt is None and not args.chat:
        raise UsageError("--prompt is required (or --chat, to read the conversation from stdin)")
    if args.chat and args.max_length is not None:
        raise UsageError("--max_length does not apply to --chat; use --max-new-tokens")
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    kw = _sampling_from_kwargs(parse_generate_kwargs(args.generate_kwargs))
    if args.seed is not None:
        kw["seed"] = args.seed
    if args.assistant_model is not None:
        if not os.path.exists(args.assistant_model):
            raise UsageError(f"assistant model file {args.assistant_model!r} does not exist; export the smaller "
                             f"model with `openelm-rt-export CHECKPOINT_DIR -o {args.assistant_model}`")
        kw["assistant_model"] = args.assistant_model
    if args.ngram_corpus is not None:
        try:
            with open(args.ngram_corpus, encoding="utf-8") as f:
                kw["ngram_corpus"] = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--ngram_corpus {args.ngram_corpus!r}: cannot read it as UTF-8 text ({e})") from None
    if "ngram_cache" in kw and not isinstance(kw["ngram_cache"], bool):
        raise UsageError(f"ngram_cache must be true or false, got {kw['ngram_cache']!r}")
    if args.speculation is not None:
        if "prompt_lookup_num_tokens" not in kw and args.assistant_model is None and not kw.get("ngram_cache") \
                and args.ngram_corpus is None:
            raise UsageError("--speculation needs prompt_lookup_num_tokens=N or ngram_cache=true in "
                             "--generate_kwargs, --ngram_corpus FILE, or --assistant_model PATH")
        kw["speculation"] = args.speculation
    max_new = kw.pop("max_new_tokens", args.max_new_tokens)
    if not os.path.exists(args.model):
        raise UsageError(f"model file {args.model!r} does not exist; create one with "
                         f"`openelm-rt-export CHECKPOINT_DIR -o {args.model}`")
    from .session import parse_memory_budget, parse_size
    try:
        parse_size("--kv-budget", args.kv_budget)
        parse_memory_budget(args.memory_budget, os.path.getsize(args.model))
    except ValueError as e:
        raise UsageError(str(e).replace("memory_budget", "--memory-budget")) from None
    with Session(args.model, threads=args.threads, max_context=args.max_context, backend=args.backend,
                 kv_budget=args.kv_budget, kv_dtype=args.kv_dtype, memory_budget=args.memory_budget,
                 exact=not args.bf16_activations) as s:
        if s.memory_plan is not None:
            print(s.memory_plan["text"], file=sys.stderr, flush=True)
        if args.chat:
            return _run_chat(s, args, max_new, kw)
        if args.max_length is not None:
            n_prompt = len(s.tokenize(args.prompt))
            max_new = args.max_length - n_prompt
            if max_new < 0:
                raise UsageError(f"--max_length {args.max_length} is shorter than the prompt ({n_prompt} tokens)")
        _run_generation(s, args.prompt, max_new, kw, stream=not args.no_stream)
    return 0


def cmd_demo(args) -> int:
    from .demo import ensure_random_model
    from .session import Session

    log = lambda msg: print(f"[openelm-rt demo] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    m = ensure_random_model(args.preset, args.dtype, args.cache_dir, args.tokenizer, log=log)
    log(f"model: {m.path}")
    log(f"tokenizer: {m.tokenizer_desc}")
    kw = {"temperature": args.temperature, "seed": args.seed} if args.temperature else {}
    with Session(m.path, threads=args.threads) as s:
        log(f"loaded: {s!r}")
        _run_generation(s, args.prompt, args.max_new_tokens, kw)
    print(
        "\nNOTE: these weights are RANDOM, so the text above is meaningless; the run shows the\n"
        "pipeline (checkpoint -> export -> native forward pass -> generation) and its speed.\n"
        "To run a real model, download an OpenELM checkpoint (e.g. apple/OpenELM-270M:\n"
        "config.json + model.safetensors) and the LLaMA-2 tokenizer.model, then:\n"
        "  openelm-rt-export OpenELM-270M --tokenizer tokenizer.model -o openelm-270m.oelm\n"
        "  openelm-rt generate --model openelm-270m.oelm --prompt 'Once upon a time there was'\n",
        file=sys.stderr)
    return 0


BF16_ACTIVATIONS_HELP = ("bf16 weights: multiply them by activations rounded to bf16 with the CPU's bf16 dot "
                         "products where it has them (AVX-512 BF16): about twice the KL to f32, faster only where "
                         "those outrun f32 FMAs (docs/WEIGHT_TYPES.md); default: exact f32 activations")


def cmd_info(args) -> int:
    from . import _core

    from .autoexport import resolve_model

    m = _core.Model(resolve_model(args.model), bool(args.verify))
    c = m.config
    print(f"file:          {args.model} ({m.file_size:,} bytes, format {m.format_version}, names {m.names_version})")
    print(f"weights:       {m.weights_dtype}   embedding / head {m.embedding_dtype}")
    print(f"layers:        {c['n_layer']}   d_model {c['d_model']}   head_dim {c['head_dim']}   vocab {c['vocab_size']}")
    print(f"q heads:       {c['n_head_q']}")
    print(f"kv heads:      {c['n_head_kv']}")
    print(f"ffn widths:    {c['ffn_dim']}")
    print(f"rope theta:    {c['rope_theta']}   norm eps {c['norm_eps']}   max_context {c['max_context']}")
    print(f"tokens:        bos {c['bos_token_id']}   eos {c['eos_token_id']}   tied head {c['tied_embeddings']}"
          f"   q/k norm {c.get('qk_norm', True)}")
    print(f"tokenizer:     {'sentencepiece' if m.has_tokenizer else 'none (token ids only)'}")
    if "bf16" in (m.weights_dtype, m.embedding_dtype):
        b = _core.Backend("cpu", 1, "", False)
        rounded = ("activations rounded to bf16, bf16 dot products (kernels " + b.kernels + ")"
                   if b.rounds_activations("bf16") else "exact too: this CPU's kernels (" + b.kernels
                   + ") have no bf16 dot products")
        print(f"bf16 matmuls:  exact f32 activations (default); --bf16-activations / exact=False: {rounded}")
    if args.verify:
        print("checksums:     all tensors verified")
    return 0


def cmd_perplexity(args) -> int:
    import json

    from .perplexity import _read_ids, perplexity

    if (args.text is None) == (args.ids is None):
        raise UsageError("give the input as --text FILE or --ids FILE (one of them)")
    kw = {}
    if args.text is not None:
        try:
            with open(args.text, encoding="utf-8") as f:
                kw["text"] = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --text {args.text}: {e}") from None
    else:
        if not os.path.isfile(args.ids):
            raise UsageError(f"--ids {args.ids}: no such file")
        kw["ids"] = _read_ids(args.ids)
    r = perplexity(args.model, ctx=args.ctx, kl_base=args.kl_base, threads=args.threads,
                   add_bos=False if args.no_bos else None, exact=not args.bf16_activations, **kw)
    print(json.dumps(r.as_dict()) if args.json else str(r))
    return 0


def _version_string() -> str:
    from . import __version__

    try:
        from . import _core

        return (f"openelm-rt {__version__} (reads .oelm format_version {_core.FORMAT_VERSION}, "
                f"names_version {_core.NAMES_VERSION})")
    except ImportError:
        return f"openelm-rt {__version__} (native core not built)"


def cmd_serve(args) -> int:
    from .session import parse_size

    if args.kv_budget is not None:
        parse_size("--kv-budget", args.kv_budget)
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"{args.model}: no such file; export a model with "
                                f"`openelm-rt-export CHECKPOINT_DIR -o model.oelm` first")
    for name in ("max_batch", "max_queue", "port", "prefill_chunk"):
        lo = 0 if name in ("max_queue", "prefill_chunk") else 1
        if getattr(args, name) is not None and getattr(args, name) < lo:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    try:
        from . import serve
        serve._require()
    except ImportError as e:
        raise UsageError(str(e))
    api_key = args.api_key or os.environ.get("OPENELM_RT_API_KEY") or None
    opts = serve.ServeOptions(model=args.model, model_name=args.model_name, api_key=api_key,
                              max_batch=args.max_batch, max_queue=args.max_queue, threads=args.threads,
                              max_context=args.max_context, kv_budget=args.kv_budget, kv_dtype=args.kv_dtype,
                              prefix_cache=args.prefix_cache, prefill_chunk=args.prefill_chunk,
                              session_kwargs={"backend": args.backend})
    serve.run(opts, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openelm-rt", description="Run Apple OpenELM models natively.")
    p.add_argument("--version", action="version", version=_version_string())
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate text with an .oelm model; prints the prompt and its "
                                   "continuation, and the speed on stderr. With --chat, a multi-turn "
                                   "conversation with an Instruct model: each line of stdin is a user "
                                   "message and each reply is printed on its own line, until EOF.",
                       epilog="examples: openelm-rt generate --model openelm-270m.oelm --prompt 'Once upon a "
                              "time there was' --generate_kwargs repetition_penalty=1.2\n"
                              "  openelm-rt generate --model openelm-1_1b.oelm --prompt '...' --generate_kwargs "
                              "repetition_penalty=1.2 prompt_lookup_num_tokens=10\n"
                              "  openelm-rt generate --model openelm-1_1b.oelm --prompt '...' --assistant_model "
                              "openelm-270m.oelm\n"
                              "  echo 'What is the capital of France?' | openelm-rt generate --model "
                              "openelm-270m-instruct.oelm --chat --system 'Answer briefly.'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--model", required=True, help="an .oelm file made by openelm-rt-export, or a Hugging Face OpenELM checkpoint directory (exported once into ~/.cache/openelm_rt)")
    g.add_argument("--prompt", default=None,
                   help="prompt text (BOS is prepended); with --chat, the first user message")
    g.add_argument("--chat", action="store_true",
                   help="chat with an OpenELM Instruct model: user messages from stdin, one per line, "
                        "rendered in the Zephyr-style format it was tuned on (<|user|>, <|assistant|>, "
                        "</s>; see the README); OpenELM ships no chat template")
    g.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message first")
    g.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=128,
                   help="most tokens to generate (default 128)")
    g.add_argument("--max_length", "--max-length", dest="max_length", type=int, default=None,
                   help="total length, prompt included, as in generate_openelm.py (overrides --max-new-tokens)")
    g.add_argument("--generate_kwargs", "--generate-kwargs", nargs="*", metavar="KEY=VALUE",
                   help=f"generation options: {', '.join(_SUPPORTED_KWARGS)}; values parse as int, "
                        f"then float, then string (as in generate_openelm.py)")
    g.add_argument("--assistant_model", "--assistant-model", default=None, metavar="PATH",
                   help="a smaller .oelm model with the same tokenizer that proposes tokens for this one to "
                        "check (speculative generation; the output does not change)")
    g.add_argument("--ngram_corpus", "--ngram-corpus", default=None, metavar="FILE",
                   help="a UTF-8 text file whose n-grams propose tokens (llama.cpp's static lookup cache; "
                        "speculative generation, the output does not change); ngram_cache=true in "
                        "--generate_kwargs uses the n-grams of this generation alone, ngram_num_tokens=N caps "
                        "the tokens proposed per step")
    g.add_argument("--speculation", choices=("adaptive", "hf"), default=None,
                   help="with prompt_lookup_num_tokens, the n-gram cache or --assistant_model: 'adaptive' "
                        "(default) checks as many proposed tokens per step as pays on this machine, none when "
                        "speculation would be slower, and also tries the n-gram cache (before the assistant); "
                        "'hf' uses Hugging Face's fixed numbers")
    g.add_argument("--threads", type=int, default=None, help="worker threads (default: all cores)")
    g.add_argument("--max-context", type=int, default=None, help="context size (default: the model's)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--kv-budget", default=None, metavar="SIZE",
                   help="KV cache memory, e.g. 512MiB or 2GiB (default: room for 4 sequences of the context)")
    g.add_argument("--memory-budget", default=None, metavar="SIZE|PCT",
                   help="run in at most this much memory, e.g. 1.2GiB or 50%% (of the model file): feed-forward "
                        "weights that do not fit are read from the file every token, same output; prints the plan")
    g.add_argument("--kv-dtype", choices=("f32", "f16"), default="f32",
                   help="KV cache element type: f32 (exact, default) or f16 (half the memory)")
    g.add_argument("--bf16-activations", action="store_true", help=BF16_ACTIVATIONS_HELP)
    g.add_argument("--backend", choices=("cpu", "cuda", "auto", "ref"), default="cpu",
                   help="cpu (default); cuda: the GPU (a CUDA build, see `python -c 'import openelm_rt; "
                        "print(openelm_rt.cuda_info())'`); auto: cuda when available, else cpu")
    g.add_argument("--stream", dest="no_stream", action="store_false",
                   help="print text as it is generated (the default)")
    g.add_argument("--no-stream", dest="no_stream", action="store_true",
                   help="print the text at the end instead of streaming")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="end-to-end demo on random weights (no checkpoint needed)",
                       description="Build a Hugging Face-format OpenELM checkpoint with random weights in "
                                   "the real shape, export it, and generate from it. The text is "
                                   "meaningless; the point is the pipeline and the speed. Files are "
                                   "cached and reused.")
    d.add_argument("--preset", default="270M", choices=("tiny", "270M", "450M", "1_1B", "3B"),
                   help="model shape (default 270M)")
    d.add_argument("--cache-dir", default=None,
                   help="where to keep the files (default $XDG_CACHE_HOME/openelm_rt or ~/.cache/openelm_rt)")
    d.add_argument("--tokenizer", default=None,
                   help="a tokenizer.model to use (e.g. LLaMA-2's); default: train one locally")
    d.add_argument("--dtype", default="f32", choices=("f32", "f16", "bf16"), help="weight type (default f32)")
    d.add_argument("--prompt", default="Once upon a time there was", help="prompt text")
    d.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    d.add_argument("--seed", type=int, default=0, help="sampling seed")
    d.add_argument("--threads", type=int, default=None, help="worker threads (default: all cores)")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="print the configuration stored in an .oelm file")
    i.add_argument("model", help="an .oelm file or an OpenELM checkpoint directory")
    i.add_argument("--verify", action="store_true", help="also check every tensor's CRC-32")
    i.set_defaults(func=cmd_info)

    sub.add_parser("eval", help="lm-evaluation-harness with --model openelm_rt (all of lm_eval's flags)",
                   description="Runs lm-eval's command line with this runtime as the model, e.g. "
                               "openelm-rt eval --model_args pretrained=openelm-270m.oelm --tasks arc_easy "
                               "--num_fewshot 0. Every flag is lm_eval's (see openelm-rt eval --help). Needs "
                               "pip install 'openelm_rt[eval]'.", add_help=False)
    pp = sub.add_parser("perplexity", help="perplexity on a text, and KL / top-1 / ΔPPL against a base model",
                        description="Perplexity of MODEL over non-overlapping windows of --ctx tokens (each "
                                    "from an empty cache; every token but a window's first is predicted; with "
                                    "text, each window starts with BOS and every text token is predicted). "
                                    "With --kl-base, also KL(base ‖ model) per position (mean, p99, max), "
                                    "top-1 agreement and ΔPPL, as llama-perplexity --kl-divergence reports.",
                        epilog="example: openelm-rt perplexity m-q4.oelm --text wiki.txt --kl-base m-f32.oelm")
    pp.add_argument("model", help="an .oelm file or an OpenELM checkpoint directory")
    pp.add_argument("--text", metavar="FILE", help="UTF-8 text, tokenized with the model's tokenizer")
    pp.add_argument("--ids", metavar="FILE",
                    help="token ids (integers separated by spaces/commas/newlines, or a .npy array): "
                         "for models without a tokenizer; used as given (no BOS added)")
    pp.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    pp.add_argument("--kl-base", metavar="BASE.oelm", default=None,
                    help="reference model (e.g. the f32 export) for KL divergence and top-1 agreement")
    pp.add_argument("--no-bos", action="store_true", help="with --text: do not start each window with BOS")
    pp.add_argument("--bf16-activations", action="store_true",
                    help=BF16_ACTIVATIONS_HELP + " (MODEL only, not --kl-base: measures what the rounding costs)")
    pp.add_argument("--threads", type=int, default=None, help="worker threads (default: all cores)")
    pp.add_argument("--json", action="store_true", help="print the result as one JSON object")
    pp.set_defaults(func=cmd_perplexity)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the extra openelm_rt[serve])",
                        description="Serve MODEL over the OpenAI HTTP API: /v1/chat/completions, /v1/completions "
                                    "(streamed or not), /v1/models, /tokenize, /detokenize, /health, /metrics "
                                    "(Prometheus). One engine batches all requests (continuous batching); chat "
                                    "uses the OpenELM Instruct format. Binds to loopback unless --host says "
                                    "otherwise.",
                        epilog="example: openelm-rt serve openelm-270m-instruct.oelm --port 8080 --api-key s3cret\n"
                               "  then: OpenAI(base_url='http://127.0.0.1:8080/v1', api_key='s3cret')",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sv.add_argument("model", help="path of an .oelm file")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    sv.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' (default: $OPENELM_RT_API_KEY, else no key)")
    sv.add_argument("--model-name", default=None, help="the model id clients see (default: the file name's stem)")
    sv.add_argument("--max-batch", type=int, default=16, help="sequences generating at once (default 16)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="sequences waiting beyond those; more get 503 with Retry-After (default 64)")
    sv.add_argument("--threads", type=int, default=None, help="worker threads (default: all cores)")
    sv.add_argument("--max-context", type=int, default=None, help="context size (default: the model's)")
    sv.add_argument("--kv-budget", default=None, metavar="SIZE",
                    help="KV cache memory, e.g. 1GiB (default: room for --max-batch sequences of the context, "
                         "at most a quarter of RAM)")
    sv.add_argument("--kv-dtype", choices=("f32", "f16"), default="f32", help="KV cache element type")
    sv.add_argument("--backend", choices=("cpu", "cuda", "auto"), default="cpu",
                    help="cpu (default); cuda: the GPU (a CUDA build); auto: cuda when available, else cpu")
    sv.add_argument("--prefix-cache", type=int, default=16,
                    help="finished sequences kept for prefix reuse (system prompts, chat turns); 0 = off")
    sv.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                    help="prompt tokens per engine step while other requests are generating (default 64): "
                         "lower keeps their inter-token latency steadier, higher gives new requests their "
                         "first token sooner; 0 = up to the step's whole token budget")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    sv.set_defaults(func=cmd_serve)
    return p


def cmd_eval(argv) -> int:
    """`openelm-rt eval ...`: lm-eval's CLI with --model openelm_rt (openelm_rt.lm_eval.main)."""
    try:
        from .lm_eval import main as eval_main
    except ImportError as e:
        print(f"openelm-rt: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return eval_main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":  # every flag is lm-eval's: passed through untouched
        return cmd_eval(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as e:  # ValueError includes FormatError
        print(f"openelm-rt: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\n[openelm-rt] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
