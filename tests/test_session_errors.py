"""Argument and lifecycle errors of openelm_rt.Session: each bad argument raises ValueError (or
FileNotFoundError) naming the argument and value; a closed session refuses work; Ctrl-C stops
a long generation promptly (subprocess + SIGINT, POSIX).
"""
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import build_model, env_with_pythonpath, prompt_ids


def _raises(exc, fn, *words):
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    for w in words:
        assert str(w).lower() in msg.lower(), f"message {msg!r} does not mention {w!r}"
    return msg


# ----------------------------------------------------------------------------- opening

def test_missing_file(ort, tmp_path):
    path = tmp_path / "no_such_model.oelm"
    _raises(FileNotFoundError, lambda: ort.Session(str(path)), str(path))


def test_directory_instead_of_file(ort, tmp_path):
    with pytest.raises((ValueError, OSError)):
        ort.Session(str(tmp_path))


@pytest.mark.parametrize("kwargs,word", [
    (dict(threads=0), "threads"), (dict(threads=-2), "threads"),
    (dict(max_context=0), "max_context"), (dict(max_context=-5), "max_context"),
    (dict(backend="no_such_backend"), "no_such_backend"),
])
def test_bad_session_arguments(ort, tiny_f32, kwargs, word):
    _raises(ValueError, lambda: ort.Session(str(tiny_f32.oelm), **kwargs), word)


def test_format_error_is_value_error(ort):
    assert issubclass(ort.FormatError, ValueError)


# ----------------------------------------------------------------------------- generate

BAD_GENERATE = [
    ("max_new_tokens", -1), ("max_new_tokens", 2.5), ("max_new_tokens", "3"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", math.nan),
    ("top_k", -1),
    ("min_p", -0.1), ("min_p", 1.5),
    ("temperature", -0.5), ("temperature", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.2),
]


@pytest.mark.parametrize("arg,value", BAD_GENERATE)
def test_bad_generate_argument(session_f32, arg, value):
    words = [arg] if isinstance(value, float) and math.isnan(value) else [arg, value]
    for stream in (False, True):
        def call():
            kw = {"max_new_tokens": 4, "stream": stream, arg: value}
            out = session_f32.generate([1, 5, 6], **kw)
            if stream:
                list(out)     # validation may be lazy for the iterator, but must happen
        _raises(ValueError, call, *words)
    # the session is still usable afterwards
    assert len(session_f32.generate([1, 5, 6], max_new_tokens=2).token_ids) == 2


def test_integers_past_the_cores_types(session_f32):
    """A top_k or max_new_tokens beyond the core's int32 / int64 (found by fuzzing the server,
    issue 19: the binding's TypeError escaped as a 500) means what its largest value means: top_k
    at least the vocabulary keeps every token, as 0 does; generation ends at the context."""
    s = session_f32
    kw = dict(temperature=1.0, seed=7)
    ref = s.generate([1, 5, 6], max_new_tokens=6, top_k=0, **kw).token_ids
    for top_k in (s.vocab_size, 2**31, 2**40, 2**64):
        assert s.generate([1, 5, 6], max_new_tokens=6, top_k=top_k, **kw).token_ids == ref, top_k
        assert [r.token_ids for r in s.generate_batch([[1, 5, 6]], max_new_tokens=6, top_k=top_k, **kw)] == [ref]
    full = s.generate([1, 5, 6], max_new_tokens=2**62, **kw).token_ids
    for n in (2**63, 2**64, 10**30):
        assert s.generate([1, 5, 6], max_new_tokens=n, **kw).token_ids == full, n
        assert "".join(s.generate([1, 5, 6], max_new_tokens=n, stream=True, **kw)) == s.detokenize(full), n


def test_prompt_too_long(ort, session_f32):
    s = session_f32
    n = s.max_context
    _raises(ValueError, lambda: s.generate(prompt_ids(n, 1024), max_new_tokens=1), "prompt", n)
    _raises(ValueError, lambda: s.generate(prompt_ids(n + 10, 1024), max_new_tokens=1),
            "prompt", n + 10)
    # exactly one free slot is fine
    assert len(s.generate(prompt_ids(n - 1, 1024), max_new_tokens=4).token_ids) == 1
    # text prompt too long
    _raises(ValueError, lambda: s.generate("hello " * (2 * n), max_new_tokens=1), "prompt")
    with pytest.raises(ValueError):
        s.logits(prompt_ids(n + 1, 1024))


@pytest.mark.parametrize("bad", [1024, 5000, -1])
def test_token_id_out_of_range(session_f32, bad):
    s = session_f32
    _raises(ValueError, lambda: s.generate([1, 5, bad], max_new_tokens=2), bad)
    _raises(ValueError, lambda: s.logits([1, bad]), bad)
    if bad >= 0:
        _raises(ValueError, lambda: s.detokenize([1, bad]), bad)


def test_empty_prompt(session_f32):
    with pytest.raises(ValueError):
        session_f32.generate([], max_new_tokens=2)


def test_bad_prompt_type(session_f32):
    with pytest.raises((TypeError, ValueError)):
        session_f32.generate(12345, max_new_tokens=2)
    with pytest.raises((TypeError, ValueError)):
        session_f32.generate([1, "a"], max_new_tokens=2)


def test_closed_session_refuses_work(ort, tiny_f32):
    s = ort.Session(str(tiny_f32.oelm))
    s.close()
    s.close()                                    # idempotent
    for call in (lambda: s.generate([1, 5], max_new_tokens=2), lambda: s.logits([1, 5]),
                 lambda: s.tokenize("hi")):
        with pytest.raises(Exception) as e:
            call()
        assert isinstance(e.value, (ValueError, RuntimeError)), repr(e.value)
    with ort.Session(str(tiny_f32.oelm)) as s2:
        assert len(s2.generate([1, 5], max_new_tokens=1).token_ids) == 1
    with pytest.raises((ValueError, RuntimeError)):
        s2.logits([1, 5])


# ----------------------------------------------------------------------------- Ctrl-C

_CTRL_C_SCRIPT = textwrap.dedent("""
    import signal, sys, time
    import openelm_rt
    # A process started in the background by a non-interactive shell inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler: install it, so that the test
    # checks the runtime and not how the test run was launched.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    s = openelm_rt.Session(sys.argv[1], threads=1, backend="ref")
    stream = sys.argv[2] == "stream"
    # one long C++ call: the prefill of a prompt as long as the context allows (a new one
    # each time: the prefix cache would serve a repeated prompt at once)
    k = 0
    while True:
        k += 1
        ids = [1, 5 + k] + [5 + (i * 7919) % 1000 for i in range(s.max_context - 3)]
        t0 = time.time()
        r = s.generate(ids, max_new_tokens=1, stream=stream)
        if stream:
            for _ in r:
                pass
        print("call took %.3f" % (time.time() - t0), flush=True)
""")


@pytest.fixture(scope="module")
def long_context_model(work_dir, tokenizer_path):
    return build_model(work_dir, tokenizer_path, "long_ctx", seed=9,
                       config_overrides={"max_context_length": 4096})


@pytest.mark.skipif(os.name != "posix", reason="SIGINT delivery to a child needs POSIX")
@pytest.mark.parametrize("mode", ["blocking", "stream"])
def test_ctrl_c_interrupts_generation(ort, long_context_model, tmp_path, mode):
    """SIGINT in the middle of a long prefill must end the process well before the call
    would have returned, with a KeyboardInterrupt and nothing else."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C_SCRIPT)
    p = subprocess.Popen([sys.executable, str(script), str(long_context_model.oelm), mode],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env_with_pythonpath())
    try:
        first = p.stdout.readline().strip()          # the first call, timed, uninterrupted
        assert first.startswith("call took"), (first, p.stderr.read() if p.poll() else "")
        call_s = float(first.split()[-1])
        time.sleep(min(0.5, call_s / 4))              # now inside the second call
        p.send_signal(signal.SIGINT)
        t0 = time.time()
        out, err = p.communicate(timeout=call_s * 3 + 10)
        waited = time.time() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    if call_s < 1.5:
        pytest.skip(f"one call takes only {call_s:.2f}s here; too fast to tell an interrupt "
                    "from a normal return")
    assert p.returncode != 0
    lines = err.strip().splitlines()
    # nothing but one KeyboardInterrupt traceback (no C++ abort, no chained exception)
    assert lines and lines[-1].startswith("KeyboardInterrupt"), f"stderr: {err[-2000:]}"
    assert err.count("Traceback") == 1 and "During handling" not in err, err[-2000:]
    assert "call took" not in out, "the interrupted call ran to completion"
    assert waited < max(1.0, call_s / 3), (
        f"exit took {waited:.2f}s after SIGINT; an uninterrupted call takes {call_s:.2f}s")
