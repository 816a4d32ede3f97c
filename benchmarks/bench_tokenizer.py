"""Encode throughput (MB of UTF-8 text per second) of the native tokenizer against the
`sentencepiece` library, on the same tokenizer and the same text, single-threaded both.

Two texts: the multilingual prose of python/openelm_rt/data/corpus.txt (repeated to make a
bigger one) and the tokenizer test cases (tests/tokenizer_cases.py: every hard category),
each encoded as a batch of lines and as one big string. Runs are interleaved (ours, theirs,
ours, ...) and repeated; medians are reported, as this machine's speed drifts. Ids are
checked equal first.

    python benchmarks/bench_tokenizer.py [--tokenizer PATH] [--repeats 7]

Default tokenizer: ../shared/tokenizers/llama2/tokenizer.model (LLaMA-2, what OpenELM
uses), else a 4000-piece one trained on the corpus.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from openelm_rt import _core

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tokenizer_cases import CORPUS, cases  # noqa: E402

LLAMA2 = ROOT.parent / "shared" / "tokenizers" / "llama2" / "tokenizer.model"


def load_tokenizer(path):
    if path is None:
        if LLAMA2.is_file():
            path = LLAMA2
        else:
            from openelm_rt.tokenizer_train import train_sentencepiece
            path = train_sentencepiece(Path(tempfile.mkdtemp()) / "t.model", 4000)
    blob = Path(path).read_bytes()
    return Path(path), _core.Tokenizer.from_sentencepiece(blob), spm.SentencePieceProcessor(model_proto=blob)


def workloads():
    prose = CORPUS.read_text(encoding="utf-8")
    prose_lines = [line for line in prose.splitlines() if line]
    test_lines = cases(10_000)
    return [("corpus lines", prose_lines), ("corpus x8 big", [prose * 8]),
            ("test cases lines", test_lines), ("test cases big", ["\n".join(test_lines)])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=None, help="a SentencePiece tokenizer.model (default: LLaMA-2's)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    path, ours, sp = load_tokenizer(args.tokenizer)
    print(f"tokenizer: {path} ({ours.vocab_size} pieces); sentencepiece {spm.__version__}; "
          f"medians of {args.repeats} interleaved runs, one thread each")
    runners = {
        "openelm_rt": lambda texts: ours.encode_batch(texts) if len(texts) > 1 else [ours.encode(texts[0])],
        "sentencepiece": lambda texts: sp.encode(texts, num_threads=1) if len(texts) > 1 else [sp.encode(texts[0])],
    }
    print(f"{'text':<18} {'MB':>6} {'openelm_rt MB/s':>16} {'sentencepiece MB/s':>19} {'ratio':>6}")
    for name, texts in workloads():
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        if runners["openelm_rt"](texts) != runners["sentencepiece"](texts):
            print(f"{name}: ids differ between openelm_rt and sentencepiece", file=sys.stderr)
            return 1
        speeds = {k: [] for k in runners}
        for _ in range(args.repeats):
            for k, fn in runners.items():
                t0 = time.perf_counter()
                fn(texts)
                speeds[k].append(mb / (time.perf_counter() - t0))
        a, b = statistics.median(speeds["openelm_rt"]), statistics.median(speeds["sentencepiece"])
        print(f"{name:<18} {mb:6.2f} {a:16.2f} {b:19.2f} {a / b:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
