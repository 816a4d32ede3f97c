"""Session on the native tokenizer: tokenize/detokenize equal sentencepiece, streamed text of
random generations joins to `.text` (and to what sentencepiece decodes); the OpenELM
Instruct chat format id for id (README, "Chatting with the Instruct models"), its argument
errors, Session.chat, and `openelm-rt generate --chat` fed through stdin.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import sentencepiece as spm

from conftest import TEXT_PROMPTS, build_model, env_with_pythonpath

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a color."}]

# CHAT in LLaMA-2 ids: <s> "<|system|>\nBe brief." </s> "\n<|user|>\nHi!" </s> ... "\n<|assistant|>\n",
# each text segment with SentencePiece's dummy prefix ("▁<" first, then "▁" "<0x0A>" after each </s>).
CHAT_LLAMA2_IDS = [
    1, 529, 29989, 5205, 29989, 29958, 13, 3629, 11473, 29889, 2,
    29871, 13, 29966, 29989, 1792, 29989, 29958, 13, 18567, 29991, 2,
    29871, 13, 29966, 29989, 465, 22137, 29989, 29958, 13, 10994, 29889, 2,
    29871, 13, 29966, 29989, 1792, 29989, 29958, 13, 1170, 263, 2927, 29889, 2,
    29871, 13, 29966, 29989, 465, 22137, 29989, 29958, 13]


def test_session_tokenize_matches_sentencepiece(session_f32, sp):
    for text in TEXT_PROMPTS + ["", " ", "<s>x</s>", "a\tb\n"]:
        assert session_f32.tokenize(text) == [1] + sp.encode(text)
        assert session_f32.tokenize(text, add_bos=False) == sp.encode(text)
        ids = session_f32.tokenize(text)
        assert session_f32.detokenize(ids) == sp.decode(ids)


@pytest.mark.parametrize("seed", range(6))
def test_stream_joins_to_text_for_random_generations(session_f32, sp, seed):
    """Sampled from random weights, the new ids include byte pieces that form broken UTF-8."""
    prompt = TEXT_PROMPTS[seed % len(TEXT_PROMPTS)]
    it = session_f32.generate(prompt, max_new_tokens=40, temperature=1.5, seed=seed, stream=True)
    pieces = list(it)
    r = it.result
    assert "".join(pieces) == r.text
    assert all(pieces)
    prompt_ids = r.prompt_token_ids
    assert sp.decode(prompt_ids + r.token_ids) == sp.decode(prompt_ids) + r.text
    non_stream = session_f32.generate(prompt, max_new_tokens=40, temperature=1.5, seed=seed)
    assert non_stream.text == r.text


def test_stream_with_stop_strings(session_f32):
    full = session_f32.generate("Once upon a time", max_new_tokens=30, temperature=1.0, seed=3).text
    stop = full[5:7]
    assert len(full) > 8 and stop
    it = session_f32.generate("Once upon a time", max_new_tokens=30, temperature=1.0, seed=3, stop=stop,
                              stream=True)
    pieces = list(it)
    assert it.result.finish_reason == "stop"
    assert "".join(pieces) == it.result.text == full[:full.index(stop)]


# ----------------------------------------------------------------------------- chat format

@pytest.fixture(scope="module")
def llama_vocab_session(work_dir, real_llama_tokenizer, ort):
    m = build_model(work_dir, real_llama_tokenizer, "llama_vocab", seed=11,
                    config_overrides={"vocab_size": 32000})
    s = ort.Session(str(m.oelm))
    yield s
    s.close()


def test_chat_ids_llama2_exact(llama_vocab_session):
    s = llama_vocab_session
    assert s.chat_token_ids(CHAT) == CHAT_LLAMA2_IDS
    assert s.detokenize(CHAT_LLAMA2_IDS) == (
        "<|system|>\nBe brief. \n<|user|>\nHi! \n<|assistant|>\nHello. \n<|user|>\nName a color. \n<|assistant|>\n")


def test_chat_ids_structure(session_f32, sp):
    """On the trained tokenizer: BOS, segments encoded alone (dummy prefix each), EOS after
    every turn, the generation prompt last; a literal "</s>" in a message stays text."""
    msgs = [{"role": "user", "content": "a </s> b"}]
    ids = session_f32.chat_token_ids(msgs)
    assert ids == [1] + sp.encode("<|user|>\na </s> b") + [2] + sp.encode("\n<|assistant|>\n")
    assert ids.count(2) == 1
    ids = session_f32.chat_token_ids(CHAT)
    expected = [1]
    for i, m in enumerate(CHAT):
        expected += sp.encode(("\n" if i else "") + f"<|{m['role']}|>\n{m['content']}") + [2]
    assert ids == expected + sp.encode("\n<|assistant|>\n")


@pytest.mark.parametrize("messages,words", [
    ([], ["empty"]),
    ("hello", ["list"]),
    ({"role": "user", "content": "x"}, ["list"]),
    (["hi"], ["messages[0]", "dict"]),
    ([{"role": "user"}], ["messages[0]", "content"]),
    ([{"role": "user", "content": "x", "name": "bob"}], ["messages[0]", "name"]),
    ([{"role": "bot", "content": "x"}], ["'bot'", "system, user, assistant"]),
    ([{"role": "user", "content": 3}], ["messages[0]['content']", "str"]),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}, {"role": "user", "content": "z"}],
     ["messages[1]", "first"]),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], ["end with a user"]),
])
def test_chat_bad_messages(session_f32, messages, words):
    with pytest.raises(ValueError) as e:
        session_f32.chat(messages, max_new_tokens=1)
    for w in words:
        assert w.lower() in str(e.value).lower(), (w, str(e.value))


def test_chat_generates_from_the_chat_prompt(session_f32):
    r = session_f32.chat(CHAT, max_new_tokens=6)
    assert r.prompt_token_ids == session_f32.chat_token_ids(CHAT)
    assert r.token_ids == session_f32.generate(session_f32.chat_token_ids(CHAT), max_new_tokens=6).token_ids
    it = session_f32.chat(CHAT, max_new_tokens=6, stream=True)
    assert "".join(it) == it.result.text == r.text


def _chat_cli(tiny_f32, stdin, *args):
    return subprocess.run([sys.executable, "-m", "openelm_rt.cli", "generate", "--model", str(tiny_f32.oelm),
                           "--chat", "--max-new-tokens", "6", *args], input=stdin, capture_output=True,
                          text=True, env=env_with_pythonpath(), timeout=120)


def test_cli_chat_multi_turn_from_stdin(session_f32, tiny_f32):
    p = _chat_cli(tiny_f32, "Hi!\n\nName a color.\n", "--system", "Be brief.")
    assert p.returncode == 0, p.stderr
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    r1 = session_f32.chat(history, max_new_tokens=6)
    history += [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "Name a color."}]
    r2 = session_f32.chat(history, max_new_tokens=6)
    assert p.stdout == r1.text + "\n" + r2.text + "\n"
    assert p.stderr.count("decode") == 2, p.stderr  # one speed line per reply (blank line skipped)


def test_cli_chat_errors(tiny_f32):
    p = _chat_cli(tiny_f32, "", "--max_length", "9")
    assert p.returncode == 2 and "--max_length does not apply to --chat" in p.stderr
    p = subprocess.run([sys.executable, "-m", "openelm_rt.cli", "generate", "--model", str(tiny_f32.oelm)],
                       capture_output=True, text=True, env=env_with_pythonpath(), timeout=60)
    assert p.returncode == 2 and "--prompt is required" in p.stderr
