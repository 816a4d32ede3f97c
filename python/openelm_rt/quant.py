"""Block-quantized weight matrices (`q8_b32r16i`, `q6_b32r16i`, `q5_b32r16i`, `q4_b32r16i`): the
NumPy reference quantizer, packer and dequantizer for the layout in docs/FORMAT.md
("Block-quantized matrices").

The exporter writes what `quantize_q8/q6/q5/q4` + `pack_*` produce; the C++ reader decodes the
same bytes (`row_to_f32` kernels) and the tests hold it bit-exact against `dequantize` here.
NumPy only, vectorized, and row-chunked (`quantize_packed`) so a 1.1B model's weights never
sit in memory twice. Not a kernel: activations are quantized in C++ (kernels.h).

Choosing the scale `d` of a block of 32 weights (stored as binary16; `q = clamp(rint(w / d))`,
rint = round half to even, computed with the stored, rounded `d`):

* q8: `d = f16(amax / 127)`, q in [-127, 127]: llama.cpp Q8_0's scale, and as each `q` is the
  integer nearest `w / d` given that `d`, the block error is never larger than Q8_0's.
* q4: q in [-8, 7]. Let `max` be the block's signed value of largest magnitude (the first one
  on a tie). llama.cpp Q4_0 stores `d = max / -8`, mapping `max` onto -8, the longer side of
  the range. We try `d = f16(max / -m)` for every m in `Q4_CANDIDATES`, each with its nearest
  integers, and keep the one with the least squared error of the block (computed in float64,
  which is exact here; Q4_0's candidate, m = 8, wins ties). Because m = 8 is a candidate and
  nearest-integer rounding is the best possible `q` for a given `d`, a block's error is never
  larger than Q4_0's (up to the float32 rounding of `w / d` on a near-tie). Why these m:
  Q4_0's `max / -8` gives the one largest weight its own level and leaves the rest of the block
  coarse; a slightly smaller `d` (m > 8) clips `max` by less than half a step and refines
  everything else, a slightly larger one (m < 8) helps blocks with two large weights of
  opposite sign. On Gaussian / Laplace / Student-t(3) blocks this set of 8 lowers the mean
  squared error by 9.5% / 7.5% / 5.7% relative to Q4_0; 41 candidates (m = 6 ... 11 by 1/8)
  would gain only 1.5 more points at 5x the export time, and mapping `max` to +7 instead of -8
  gained nothing measurable.

* q6 / q5: q in [-32, 31] / [-16, 15]. The same search as the importance-weighted one below with
  every weight counted once (u_k = 1): d = f16(max / -m) for m in `Q6_CANDIDATES` / `Q5_CANDIDATES`
  (the first, 32 / 16, maps max onto the longer side of the range as Q4_0 does), and each
  candidate's least-squares refit.

Importance-weighted (`imp`, from imatrix.py: the mean square of each input feature over
calibration text). The error of a block is then sum_k u_k (w_k - d q_k)^2 with, as llama.cpp's
imatrix quantization weighs it, u_k = imp_k * sqrt(sigma2 + w_k^2) (sigma2: the mean square of
the weight's row): the expected error of the matrix product for such activations, with some
weight on the large weights themselves. For a given `d` the nearest integers still minimise it
(the terms are independent), so only the choice of `d` changes: among d = f16(max / -m) for m in
`Q4_WEIGHTED` / `Q8_WEIGHTED` and, for each, the weighted least-squares scale of that
candidate's integers (sum u w q / sum u q^2, llama.cpp's make_qx_quants refit), the one with the
least weighted error. The unweighted choice (m = 8 for q4, amax / 127 for q8) is among them, so
the weighted error is never larger than without `imp`. The layout, and so the kernels, do not
change.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QBLOCK = 32   # weights per block (one scale) along K: kernels.h kQBlock
QROWS = 16    # rows interleaved in one panel: kernels.h kQRows

Q8 = "q8_b32r16i"
Q4 = "q4_b32r16i"
Q6 = "q6_b32r16i"
Q5 = "q5_b32r16i"
Q4K = "q4k_b32r16i"
QUANT_DTYPES = (Q8, Q4, Q6, Q5, Q4K)
# Bits per weight integer; q6 / q5 store q4's nibbles plus 2 / 1 bits in lines of high bits.
BITS = {Q8: 8, Q6: 6, Q5: 5, Q4: 4}
_RANGE = {Q8: (-127, 127), Q6: (-32, 31), Q5: (-16, 15), Q4: (-8, 7)}
# Bytes per 16 rows x 32 columns block (with the 16 binary16 scales), over 32: kernels.h.
_PER_PANEL_COL = {Q8: 17, Q6: 13, Q5: 11, Q4: 9}
# The layout before scales moved next to their blocks (FORMAT.md): no longer read or written.
LEGACY_QUANT_DTYPES = ("q8_b32r16", "q4_b32r16")
_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2, "u8": 1, "i32": 4}

# m in d = max / -m (module docstring). The first, 8, is llama.cpp Q4_0's rule.
Q4_CANDIDATES = (8.0, 7.5, 7.75, 8.25, 8.5, 8.75, 9.0, 9.25)

# The candidates of the importance-weighted search (module docstring); the first of each is the
# unweighted rule's (q8: max / -127 is amax / 127 up to the sign, which a symmetric range ignores).
Q4_WEIGHTED = (8.0, 7.0, 7.25, 7.5, 7.75, 8.25, 8.5, 8.75, 9.0, 9.25, 9.5, 10.0)
Q8_WEIGHTED = (127.0, 124.0, 125.0, 126.0, 128.0, 129.0, 130.0)
Q6_CANDIDATES = (32.0, 31.0, 31.5, 32.5, 33.0, 33.5, 34.0, 35.0)
Q5_CANDIDATES = (16.0, 15.0, 15.5, 16.5, 17.0, 17.5, 18.0, 19.0)

_F16_MAX = 65504.0
_SUB_BLOCKS = 8192  # blocks per inner step of the q4 search: temporaries stay in L2


def padded_k(K: int) -> int:
    return -(-K // QBLOCK) * QBLOCK


def padded_n(N: int) -> int:
    return -(-N // QROWS) * QROWS


def tensor_nbytes(dtype: str, shape) -> int:
    """Bytes of a tensor of this .oelm dtype and logical shape (FORMAT.md)."""
    shape = tuple(int(s) for s in shape)
    if dtype in QUANT_DTYPES:
        if len(shape) != 2:
            raise ValueError(f"{dtype} stores 2-D matrices only, got shape {list(shape)}")
        N, K = shape
        if dtype == Q4K:
            nb = padded_k(K) // QBLOCK
            S = q4k_subs(nb)
            return padded_n(N) // QROWS * (nb // S) * _q4k_super_bytes(S)
        return padded_n(N) // QROWS * _PER_PANEL_COL[dtype] * padded_k(K)
    if dtype not in _ITEMSIZE:
        raise ValueError(f"unknown dtype {dtype!r}")
    return math.prod(shape) * _ITEMSIZE[dtype]


# ----------------------------------------------------------------------------- quantizers

def _blocks(w: np.ndarray) -> np.ndarray:
    """w [N, K] -> float32 [N * nb, 32], K zero-padded to a multiple of 32."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"block quantization needs a 2-D matrix, got shape {list(w.shape)}")
    w = w.astype(np.float32, copy=False)
    N, K = w.shape
    if not np.isfinite(np.sum(w, dtype=np.float32)) and not np.isfinite(w).all():
        raise ValueError(f"cannot quantize NaN or infinite weights "
                         f"({int(np.count_nonzero(~np.isfinite(w)))} of {w.size})")
    Kp = padded_k(K)
    if Kp != K:
        w = np.pad(w, ((0, 0), (0, Kp - K)))
    return np.ascontiguousarray(w).reshape(N * (Kp // QBLOCK), QBLOCK)


def _to_f16(d: np.ndarray, wb: np.ndarray, what: str) -> np.ndarray:
    """Scales rounded to binary16 (nearest even); refuses scales beyond its range."""
    with np.errstate(over="ignore"):
        d16 = d.astype(np.float16)
    if not np.isfinite(d16).all():
        raise ValueError(f"weights too large for {what}: max |w| = "
                         f"{float(np.abs(wb).max()):.6g} needs a scale beyond the binary16 "
                         f"range (±{_F16_MAX:g}); export with --dtype f32 or bf16")
    return d16


def _nearest(wb: np.ndarray, d: np.ndarray, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """out = clamp(rint(wb / d), lo, hi) per block (float32), 0 where d == 0."""
    zero = d == 0
    np.divide(wb, np.where(zero, np.float32(1), d)[:, None], out=out)
    np.rint(out, out=out)
    np.clip(out, lo, hi, out=out)
    out[zero] = 0
    return out


def _importance(w: np.ndarray, imp) -> np.ndarray:
    """u [N * nb, 32] of the module docstring for w [N, K] and imp [K] (zero in the padding)."""
    imp = np.asarray(imp, np.float64).reshape(-1)
    N, K = np.shape(w)
    if imp.shape != (K,):
        raise ValueError(f"importance has {imp.size} entries, the matrix {K} columns")
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise ValueError("importance must be finite and non-negative")
    w = np.asarray(w, np.float32)
    sigma2 = np.einsum("nk,nk->n", w, w, dtype=np.float64) / max(K, 1)
    u = (imp[None, :] * np.sqrt(sigma2[:, None] + np.square(w, dtype=np.float64))).astype(np.float32)
    Kp = padded_k(K)
    if Kp != K:
        u = np.pad(u, ((0, 0), (0, Kp - K)))
    return u.reshape(N * (Kp // QBLOCK), QBLOCK)


def _weighted_search(wb: np.ndarray, u: np.ndarray, lo: int, hi: int, ms, what: str) -> np.ndarray:
    """Best binary16 scale per block of wb [n, 32] under the weights u [n, 32] (module docstring)."""
    n = len(wb)
    mx = wb[np.arange(n), np.abs(wb).argmax(axis=1)]
    w64 = wb.astype(np.float64)
    u64 = u.astype(np.float64)
    q = np.empty_like(wb)
    r = np.empty_like(w64)
    best_err = np.full(n, np.inf)
    best_d = np.zeros(n, np.float16)

    def consider(d16: np.ndarray) -> None:
        d = d16.astype(np.float32)
        _nearest(wb, d, lo, hi, q)
        np.multiply(q, d[:, None], out=r)  # exact: a small integer times an 11-bit scale
        np.subtract(w64, r, out=r)
        np.multiply(r, r, out=r)
        err = np.einsum("ij,ij->i", r, u64)
        better = err < best_err  # strict: earlier candidates win ties
        best_err[better] = err[better]
        best_d[better] = d16[better]

    for m in ms:
        d0 = mx / np.float32(-m)
        consider(_to_f16(d0, wb, what))
        _nearest(wb, d0, lo, hi, q)  # this candidate's integers (unrounded scale) ...
        qu = q * u
        num = np.einsum("ij,ij->i", qu, wb, dtype=np.float64)
        den = np.einsum("ij,ij->i", qu, q, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            d_ls = np.where(den > 0, num / den, d0).astype(np.float32)  # ... and their best scale
        consider(_to_f16(d_ls, wb, what))
    return best_d


def _search_all(wb: np.ndarray, search) -> np.ndarray:
    """search(s, e) -> f16 scales of blocks [s, e), over sub-ranges of _SUB_BLOCKS in threads.
    NumPy releases the GIL inside its loops, so threads share the work (each sub-range is
    independent: the result does not depend on the thread count)."""
    d16 = np.empty(len(wb), np.float16)
    starts = range(0, len(wb), _SUB_BLOCKS)

    def run(s: int) -> None:
        d16[s:s + _SUB_BLOCKS] = search(s, min(s + _SUB_BLOCKS, len(wb)))

    _in_threads(run, starts)
    return d16


def _in_threads(run, starts) -> None:
    """run(s) for every s in starts, on up to one thread per CPU (independent pieces of work)."""
    threads = min(len(starts), os.cpu_count() or 1)
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, starts))
    else:
        for s in starts:
            run(s)


def quantize_q8(w: np.ndarray, imp=None) -> tuple[np.ndarray, np.ndarray]:
    """w f32 [N, K] -> (d float16 [N, nb], q int8 [N, Kp]); q in [-127, 127]; d = f16(amax/127),
    or with imp [K] the importance-weighted search among Q8_WEIGHTED (module docstring)."""
    wb = _blocks(w)
    N = np.shape(w)[0]
    if imp is None:
        d16 = _to_f16(np.abs(wb).max(axis=1) / np.float32(127), wb, Q8)
    else:
        u = _importance(w, imp)
        d16 = _search_all(wb, lambda s, e: _weighted_search(wb[s:e], u[s:e], -127, 127, Q8_WEIGHTED, Q8))
    q = _nearest(wb, d16.astype(np.float32), -127, 127, np.empty_like(wb))
    return d16.reshape(N, -1), q.astype(np.int8).reshape(N, -1)


def _q4_search(wb: np.ndarray) -> np.ndarray:
    """Best binary16 scale per block of wb [n, 32] among Q4_CANDIDATES (module docstring)."""
    n = len(wb)
    mx = wb[np.arange(n), np.abs(wb).argmax(axis=1)]  # signed value of largest magnitude
    w64 = wb.astype(np.float64)
    q = np.empty_like(wb)
    r = np.empty_like(w64)
    best_err = np.full(n, np.inf)
    best_d = np.zeros(n, np.float16)
    for m in Q4_CANDIDATES:
        d16 = _to_f16(mx / np.float32(-m), wb, Q4)
        d = d16.astype(np.float32)
        _nearest(wb, d, -8, 7, q)
        np.multiply(q, d[:, None], out=r)  # exact: a 4-bit integer times an 11-bit scale
        np.subtract(w64, r, out=r)
        err = np.einsum("ij,ij->i", r, r)
        better = err < best_err  # strict: the first candidate (Q4_0's) wins ties
        best_err[better] = err[better]
        best_d[better] = d16[better]
    return best_d


def quantize_q4(w: np.ndarray, imp=None) -> tuple[np.ndarray, np.ndarray]:
    """w f32 [N, K] -> (d float16 [N, nb], q int8 [N, Kp]); q in [-8, 7], d by least squares
    among Q4_CANDIDATES, or with imp [K] by the importance-weighted search (module docstring)."""
    wb = _blocks(w)
    N = np.shape(w)[0]
    if imp is None:
        d16 = _search_all(wb, lambda s, e: _q4_search(wb[s:e]))
    else:
        u = _importance(w, imp)
        d16 = _search_all(wb, lambda s, e: _weighted_search(wb[s:e], u[s:e], -8, 7, Q4_WEIGHTED, Q4))
    q = _nearest(wb, d16.astype(np.float32), -8, 7, np.empty_like(wb))
    return d16.reshape(N, -1), q.astype(np.int8).reshape(N, -1)


def _quantize_hi(dtype: str, cands):
    lo, hi = _RANGE[dtype]

    def quantize(w: np.ndarray, imp=None) -> tuple[np.ndarray, np.ndarray]:
        wb = _blocks(w)
        N = np.shape(w)[0]
        u = np.ones_like(wb) if imp is None else _importance(w, imp)
        d16 = _search_all(wb, lambda s, e: _weighted_search(wb[s:e], u[s:e], lo, hi, cands, dtype))
        q = _nearest(wb, d16.astype(np.float32), lo, hi, np.empty_like(wb))
        return d16.reshape(N, -1), q.astype(np.int8).reshape(N, -1)

    quantize.__doc__ = (f"w f32 [N, K] -> (d float16 [N, nb], q int8 [N, Kp]); q in [{lo}, {hi}], d by the "
                        f"(with imp: importance-) weighted search (module docstring)")
    return quantize


quantize_q6 = _quantize_hi(Q6, Q6_CANDIDATES)
quantize_q5 = _quantize_hi(Q5, Q5_CANDIDATES)


# ----------------------------------------------------------------------------- layout

def _check_parts(d: np.ndarray, q: np.ndarray, N: int, K: int, lo: int, hi: int) -> None:
    nb = padded_k(K) // QBLOCK
    if d.shape != (N, nb) or q.shape != (N, padded_k(K)):
        raise ValueError(f"expected d [{N}, {nb}] and q [{N}, {padded_k(K)}] for a [{N}, {K}] "
                         f"matrix, got {list(d.shape)} and {list(q.shape)}")
    if q.size and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"q outside [{lo}, {hi}]")


def _panels(d: np.ndarray, q: np.ndarray, N: int):
    """Rows padded to a multiple of 16 (zero scale, zero q), split into panels:
    d [P, 16, nb] float16, q [P, 16, Kp] int8."""
    Np = padded_n(N)
    if Np != N:
        d = np.pad(d, ((0, Np - N), (0, 0)))
        q = np.pad(q, ((0, Np - N), (0, 0)))
    P = Np // QROWS
    return d.reshape(P, QROWS, -1), q.reshape(P, QROWS, -1)


def _block_scales(d: np.ndarray) -> np.ndarray:
    """[P, 16, nb] -> bytes [P, nb, 32]: the 16 rows' binary16 scales of each block."""
    P, _, nb = d.shape
    return d.astype("<f2").transpose(0, 2, 1).copy().view(np.uint8).reshape(P, nb, 2 * QROWS)


def pack_q8(d: np.ndarray, q: np.ndarray, N: int, K: int) -> bytes:
    """FORMAT.md q8_b32r16i bytes of the quantized [N, K] matrix (d [N, nb], q [N, Kp])."""
    _check_parts(d, q, N, K, -127, 127)
    dp, qp = _panels(d, q, N)
    P, nb = dp.shape[0], dp.shape[2]
    u = (qp.astype(np.int16) + 128).astype(np.uint8)
    # byte (b, c // 4, r, c % 4) of the panel's weights: [P, r, b, g, j] -> [P, b, g, r, j]
    u = u.reshape(P, QROWS, nb, 8, 4).transpose(0, 2, 3, 1, 4).reshape(P, nb, -1)
    return np.concatenate([_block_scales(dp), u], axis=2).tobytes()


def pack_q4(d: np.ndarray, q: np.ndarray, N: int, K: int) -> bytes:
    """FORMAT.md q4_b32r16i bytes of the quantized [N, K] matrix (d [N, nb], q [N, Kp])."""
    _check_parts(d, q, N, K, -8, 7)
    dp, qp = _panels(d, q, N)
    P, nb = dp.shape[0], dp.shape[2]
    u = (qp + 8).astype(np.uint8).reshape(P, QROWS, nb, 2, 4, 4)  # [P, r, b, half, g, j]
    byte = u[:, :, :, 0] | (u[:, :, :, 1] << 4)                   # c < 16 low, c >= 16 high
    byte = byte.transpose(0, 2, 3, 1, 4).reshape(P, nb, -1)       # [P, b, g, r, j]
    return np.concatenate([_block_scales(dp), byte], axis=2).tobytes()


def _pack_hi(d: np.ndarray, q: np.ndarray, N: int, K: int, dtype: str) -> bytes:
    """FORMAT.md q6_b32r16i / q5_b32r16i bytes: q4's nibble lines of the low 4 bits of u, then
    HB lines of high bits (vector v = 2 line + half at bits [HB v % 8, + HB) of line HB v / 8)."""
    lo, hi = _RANGE[dtype]
    _check_parts(d, q, N, K, lo, hi)
    hb = BITS[dtype] - 4
    dp, qp = _panels(d, q, N)
    P, nb = dp.shape[0], dp.shape[2]
    u = (qp.astype(np.int16) - lo).astype(np.uint8).reshape(P, QROWS, nb, 2, 4, 4)  # [P, r, b, half, line, j]
    nib = (u[:, :, :, 0] & 15) | ((u[:, :, :, 1] & 15) << 4)
    nib = nib.transpose(0, 2, 3, 1, 4).reshape(P, nb, -1)                        # [P, b, line, r, j]
    high = np.zeros((P, nb, hb, QROWS, 4), np.uint8)                             # [P, b, L, r, j]
    top = (u >> 4).transpose(0, 2, 3, 4, 1, 5)                                   # [P, b, half, line, r, j]
    for half in range(2):
        for line in range(4):
            bit = hb * (2 * line + half)
            high[:, :, bit // 8] |= top[:, :, half, line] << (bit % 8)
    return np.concatenate([_block_scales(dp), nib, high.reshape(P, nb, -1)], axis=2).tobytes()


def pack_q6(d: np.ndarray, q: np.ndarray, N: int, K: int) -> bytes:
    """FORMAT.md q6_b32r16i bytes of the quantized [N, K] matrix (d [N, nb], q [N, Kp])."""
    return _pack_hi(d, q, N, K, Q6)


def pack_q5(d: np.ndarray, q: np.ndarray, N: int, K: int) -> bytes:
    """FORMAT.md q5_b32r16i bytes of the quantized [N, K] matrix (d [N, nb], q [N, Kp])."""
    return _pack_hi(d, q, N, K, Q5)


def unpack(raw, dtype: str, N: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of pack_q8 / q6 / q5 / q4: (d float16 [N, nb], q int8 [N, Kp]); padding dropped.
    (q4k has more parts: unpack_q4k.)"""
    if dtype == Q4K:
        raise ValueError(f"{Q4K} has scales, minimums and super-block scales: use unpack_q4k")
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"{dtype!r} is not a block-quantized dtype ({', '.join(QUANT_DTYPES)})")
    buf = np.frombuffer(raw, np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1)
    if buf.size != tensor_nbytes(dtype, (N, K)):
        raise ValueError(f"{dtype} [{N}, {K}] is {tensor_nbytes(dtype, (N, K))} bytes, "
                         f"got {buf.size}")
    Kp, Np = padded_k(K), padded_n(N)
    P, nb = Np // QROWS, Kp // QBLOCK
    blocks = buf.reshape(P, nb, -1)  # [P, b, 32 scale bytes + body]
    d = blocks[:, :, :2 * QROWS].copy().view("<f2").reshape(P, nb, QROWS).transpose(0, 2, 1)
    body = blocks[:, :, 2 * QROWS:]
    if dtype == Q8:
        u = body.reshape(P, nb, 8, QROWS, 4).transpose(0, 3, 1, 2, 4)  # [P, r, b, g, j]
        q = u.astype(np.int16) - 128
    else:
        nib = body[:, :, :256].reshape(P, nb, 4, QROWS, 4).transpose(0, 3, 1, 2, 4)  # [P, r, b, g, j]
        u = np.stack([nib & 15, nib >> 4], axis=3).astype(np.int16)                # [P, r, b, half, g, j]
        hb = BITS[dtype] - 4
        if hb:
            high = body[:, :, 256:].reshape(P, nb, hb, QROWS, 4).transpose(0, 3, 1, 2, 4)  # [P, r, b, L, j]
            for half in range(2):
                for line in range(4):
                    bit = hb * (2 * line + half)
                    top = (high[:, :, :, bit // 8] >> (bit % 8)) & ((1 << hb) - 1)
                    u[:, :, :, half, line] |= top.astype(np.int16) << 4
        q = u + _RANGE[dtype][0]
    d = d.reshape(Np, nb)[:N].astype(np.float16)
    q = q.reshape(Np, Kp)[:N].astype(np.int8)
    return d, q


def dequantize(raw, dtype: str, N: int, K: int) -> np.ndarray:
    """f32 [N, K] = d * q of the packed bytes (exact in float32)."""
    if dtype == Q4K:
        return dequantize_q4k(raw, N, K)
    d, q = unpack(raw, dtype, N, K)
    w = np.repeat(d.astype(np.float32), QBLOCK, axis=1) * q.astype(np.float32)
    return np.ascontiguousarray(w[:, :K])


# ----------------------------------------------------------------------------- q4k

# q4k_b32r16i (FORMAT.md): w = d * sc * u - dmin * m, u in [0, 15] per weight, sc and m in [0, 63] per
# block of 32, d and dmin binary16 per super-block of S blocks (q4k_subs). How the exporter chooses
# them (llama.cpp's Q4_K recipe, importance-weighted as its imatrix quantization):
#  1. per block, the best (scale s >= 0, minimum mn >= 0) of w ~ s u - mn under the weights u_k
#     (importance, or 1): for each candidate iscale = (15 + t) / (max - min), t in Q4K_STEPS, the
#     integers u = clamp(rint(iscale (w - min)), 0, 15) and their weighted least-squares (s, -mn)
#     (mn clamped at 0), keeping the least weighted error;
#  2. per super-block, s and mn to 6 bits: d = the weighted least-squares scale of the best of a
#     few rounding candidates (weights: each block's total u), rounded to binary16, sc = clamp(rint(s / d));
#     likewise dmin and m;
#  3. the weights' integers again for the stored d * sc and dmin * m; then (d, dmin) refit by least
#     squares for those integers, kept only where it lowers the super-block's weighted error.
Q4K_STEPS = tuple(-1.0 + 0.1 * i for i in range(21))
_Q4K_SCALE_STEPS = tuple(0.1 * i for i in range(-4, 5))


def q4k_subs(nb: int) -> int:
    """Blocks per super-block for a row of nb blocks: the largest of 8, 7, ..., 1 dividing nb."""
    for s in range(8, 1, -1):
        if nb % s == 0:
            return s
    return 1


def _q4k_super_bytes(S: int) -> int:
    return 4 * QROWS + S * (24 + 16 * QBLOCK // 2)


def _q4k_block_fit(wb: np.ndarray, u: np.ndarray):
    """Step 1 on blocks wb [n, 32], weights u [n, 32]: (s, mn) float64 [n]."""
    w = wb.astype(np.float64)
    uu = u.astype(np.float64)
    lo = np.minimum(w.min(axis=1), 0.0)
    hi = w.max(axis=1)
    rng = hi - lo
    live = rng > 0
    rng = np.where(live, rng, 1.0)
    sw = uu.sum(axis=1)
    sx = (uu * w).sum(axis=1)
    # start: the plain min / max mapping
    best_s = np.where(live, rng / 15, 0.0)
    best_m = -lo  # a constant block (not live): all of it in the minimum (0 if it is >= 0)
    q = np.clip(np.rint((w - lo[:, None]) * (15 / rng)[:, None]), 0, 15)
    r = best_s[:, None] * q - best_m[:, None] - w
    best_err = np.einsum("ij,ij,ij->i", uu, r, r)
    for t in Q4K_STEPS:
        q = np.clip(np.rint((w - lo[:, None]) * ((15 + t) / rng)[:, None]), 0, 15)
        uq = uu * q
        sq = uq.sum(axis=1)
        sqq = np.einsum("ij,ij->i", uq, q)
        sqx = np.einsum("ij,ij->i", uq, w)
        det = sw * sqq - sq * sq
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (sw * sqx - sq * sx) / det
            b = (sqq * sx - sq * sqx) / det
            pos = b > 0  # the offset must be a minimum (<= 0): refit the scale alone
            s = np.where(pos, sqx / sqq, s)
            b = np.where(pos, 0.0, b)
        ok = live & (det > 0) & np.isfinite(s) & (s >= 0)
        r = s[:, None] * q + b[:, None] - w
        err = np.einsum("ij,ij,ij->i", uu, r, r)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_m = np.where(better, -b, best_m)
    return best_s, best_m


def _q4k_six_bits(v: np.ndarray, wt: np.ndarray, what: str):
    """Step 2 on v [n, S] >= 0 with weights wt [n, S]: (binary16 scale [n], integers [n, S])."""
    vmax = v.max(axis=1)
    live = vmax > 0
    safe = np.where(live, vmax, 1.0)
    best_d = np.where(live, vmax / 63, 0.0)
    best_err = np.full(len(v), np.inf)
    for t in _Q4K_SCALE_STEPS:
        L = np.clip(np.rint(v * ((63 + t) / safe)[:, None]), 0, 63)
        num = (wt * v * L).sum(axis=1)
        den = (wt * L * L).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(den > 0, num / den, best_d)
        err = (wt * (v - d[:, None] * L) ** 2).sum(axis=1)
        better = live & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d, best_d)
    with np.errstate(over="ignore"):
        d16 = best_d.astype(np.float16)
    if not np.isfinite(d16).all():
        raise ValueError(f"weights too large for {Q4K}: a {what} beyond the binary16 range (±{_F16_MAX:g}); "
                         f"export with --dtype f32 or bf16")
    d32 = d16.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.where(d32[:, None] > 0, np.clip(np.rint(v / np.where(d32 > 0, d32, 1.0)[:, None]), 0, 63), 0)
    return d16, L.astype(np.uint8)


def _q4k_ints(wb, dsc, dm):
    """Step 3's integers: clamp(rint((w + dm) / dsc), 0, 15), 0 where dsc == 0 (float32, as stored)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((wb + dm[:, None]) / np.where(dsc > 0, dsc, 1)[:, None])
    return np.where(dsc[:, None] > 0, np.clip(q, 0, 15), 0)


def _q4k_chunk(wb: np.ndarray, u: np.ndarray, S: int):
    """wb, u [n * S, 32] (whole super-blocks, in order) -> d16, dmin16 [n], sc, m [n, S], q [n * S, 32]."""
    s, mn = _q4k_block_fit(wb, u)
    wt = u.astype(np.float64).sum(axis=1).reshape(-1, S)
    d16, sc = _q4k_six_bits(s.reshape(-1, S), wt, "scale")
    m16, mq = _q4k_six_bits(mn.reshape(-1, S), wt, "minimum")
    w64 = wb.astype(np.float64)
    u64 = u.astype(np.float64)

    def ints_and_err(d16, m16):
        dsc = (d16.astype(np.float32)[:, None] * sc).reshape(-1)  # exact: 11 bits x 6 bits
        dm = (m16.astype(np.float32)[:, None] * mq).reshape(-1)
        q = _q4k_ints(wb, dsc, dm)
        r = (dsc[:, None].astype(np.float64) * q - dm[:, None]) - w64
        return q, np.einsum("ij,ij,ij->i", u64, r, r).reshape(-1, S).sum(axis=1)

    q, err = ints_and_err(d16, m16)
    # refit (d, dmin) for these integers: minimise sum u (d a - dmin c - w)^2, a = sc u, c = m
    a = (sc.reshape(-1).astype(np.float64)[:, None] * q)
    c = np.broadcast_to(mq.reshape(-1).astype(np.float64)[:, None], a.shape)

    def ssum(x):
        return np.einsum("ij,ij->i", u64, x).reshape(-1, S).sum(axis=1)
    saa, scc, sac = ssum(a * a), ssum(c * c), ssum(a * c)
    saw, scw = ssum(a * w64), ssum(c * w64)
    det = saa * scc - sac * sac
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d_new = (saw * scc - scw * sac) / det
        m_new = (saw * sac - scw * saa) / det
        ok = (det > 0) & np.isfinite(d_new) & np.isfinite(m_new) & (d_new > 0) & (m_new >= 0) & \
            (d_new < _F16_MAX) & (m_new < _F16_MAX)
        d_try = np.where(ok, d_new, d16.astype(np.float64)).astype(np.float16)
        m_try = np.where(ok, m_new, m16.astype(np.float64)).astype(np.float16)
    q2, err2 = ints_and_err(d_try, m_try)
    better = err2 < err
    d16 = np.where(better, d_try, d16)
    m16 = np.where(better, m_try, m16)
    q = np.where(np.repeat(better, S)[:, None], q2, q)
    return d16, m16, sc, mq, q


def quantize_q4k(w: np.ndarray, imp=None):
    """w f32 [N, K] -> (d, dmin float16 [N, nb / S], sc, m uint8 [N, nb], u uint8 [N, Kp]) of
    q4k_b32r16i (the rule above; with imp [K] importance-weighted). Padding columns get u = 0 and
    weight 0 in every fit."""
    wb = _blocks(w)
    N, K = np.shape(w)
    Kp = padded_k(K)
    nb = Kp // QBLOCK
    S = q4k_subs(nb)
    if imp is None:
        u = np.ones((N, Kp), np.float32)
        u[:, K:] = 0
        u = u.reshape(-1, QBLOCK)
    else:
        u = _importance(w, imp)
    if N * nb and not (np.abs(wb).max() * 1.01 < _F16_MAX * 63):
        raise ValueError(f"weights too large for {Q4K}: max |w| = {float(np.abs(wb).max()):.6g} needs a "
                         f"scale beyond the binary16 range (±{_F16_MAX:g}); export with --dtype f32 or bf16")
    d = np.empty((N, nb // S), np.float16)
    dmin = np.empty_like(d)
    sc = np.empty((N, nb), np.uint8)
    m = np.empty_like(sc)
    q = np.empty((N * nb, QBLOCK), np.uint8)
    rows = max(1, _SUB_BLOCKS // max(nb, 1))

    def run(r0: int) -> None:
        r1 = min(N, r0 + rows)
        b0, b1 = r0 * nb, r1 * nb
        dd, mm, ss, mq, qq = _q4k_chunk(wb[b0:b1], u[b0:b1], S)
        d[r0:r1] = dd.reshape(r1 - r0, -1)
        dmin[r0:r1] = mm.reshape(r1 - r0, -1)
        sc[r0:r1] = ss.reshape(r1 - r0, -1)
        m[r0:r1] = mq.reshape(r1 - r0, -1)
        q[b0:b1] = qq

    _in_threads(run, range(0, N, rows))
    q = q.reshape(N, Kp)
    q[:, K:] = 0
    return d, dmin, sc, m, q


def pack_q4k(d, dmin, sc, m, q, N: int, K: int) -> bytes:
    """FORMAT.md q4k_b32r16i bytes of the quantized [N, K] matrix (quantize_q4k's parts)."""
    Kp, Np = padded_k(K), padded_n(N)
    nb = Kp // QBLOCK
    S = q4k_subs(nb)
    ns = nb // S
    if d.shape != (N, ns) or dmin.shape != (N, ns) or sc.shape != (N, nb) or m.shape != (N, nb) or \
            q.shape != (N, Kp):
        raise ValueError(f"q4k parts do not fit a [{N}, {K}] matrix")
    if q.size and int(q.max()) > 15 or sc.size and (int(sc.max()) > 63 or int(m.max()) > 63):
        raise ValueError("q4k integers out of range (u: [0, 15], sc and m: [0, 63])")
    pad = ((0, Np - N), (0, 0))
    d, dmin, sc, m, q = (np.pad(a, pad) for a in (d, dmin, sc, m, q))
    P = Np // QROWS
    head = np.concatenate([d.astype("<f2").reshape(P, QROWS, ns).transpose(0, 2, 1).copy().view(np.uint8),
                           dmin.astype("<f2").reshape(P, QROWS, ns).transpose(0, 2, 1).copy().view(np.uint8)],
                          axis=2)                                         # [P, ns, 64]
    sc = sc.astype(np.uint8).reshape(P, QROWS, ns, S).transpose(0, 2, 3, 1)  # [P, ns, S, r]
    m = m.astype(np.uint8).reshape(P, QROWS, ns, S).transpose(0, 2, 3, 1)
    a = sc | ((m >> 4) << 6)
    b = (m[..., :8] & 15) | ((m[..., 8:] & 15) << 4)
    scales = np.concatenate([a, b], axis=3).reshape(P, ns, S * 24)
    u = q.astype(np.uint8).reshape(P, QROWS, nb, 2, 4, 4)                   # [P, r, b, half, g, j]
    byte = u[:, :, :, 0] | (u[:, :, :, 1] << 4)
    byte = byte.transpose(0, 2, 3, 1, 4).reshape(P, ns, S * 256)           # [P, b, g, r, j]
    return np.concatenate([head, scales, byte], axis=2).tobytes()


def unpack_q4k(raw, N: int, K: int):
    """Inverse of pack_q4k: (d, dmin [N, nb / S], sc, m [N, nb], u [N, Kp]); padding rows dropped."""
    buf = np.frombuffer(raw, np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1)
    if buf.size != tensor_nbytes(Q4K, (N, K)):
        raise ValueError(f"{Q4K} [{N}, {K}] is {tensor_nbytes(Q4K, (N, K))} bytes, got {buf.size}")
    Kp, Np = padded_k(K), padded_n(N)
    nb = Kp // QBLOCK
    S = q4k_subs(nb)
    ns, P = nb // S, Np // QROWS
    sup = buf.reshape(P, ns, -1)
    d = sup[:, :, :32].copy().view("<f2").transpose(0, 2, 1).reshape(Np, ns)
    dmin = sup[:, :, 32:64].copy().view("<f2").transpose(0, 2, 1).reshape(Np, ns)
    sm = sup[:, :, 64:64 + 24 * S].reshape(P, ns, S, 24)
    a, b = sm[..., :16], sm[..., 16:]
    sc = (a & 63).transpose(0, 3, 1, 2).reshape(Np, nb)
    m = (((a >> 6) << 4) | np.concatenate([b & 15, b >> 4], axis=3)).transpose(0, 3, 1, 2).reshape(Np, nb)
    nib = sup[:, :, 64 + 24 * S:].reshape(P, nb, 4, QROWS, 4).transpose(0, 3, 1, 2, 4)  # [P, r, b, g, j]
    u = np.stack([nib & 15, nib >> 4], axis=3).reshape(Np, Kp)
    return (d[:N].astype(np.float16), dmin[:N].astype(np.float16), sc[:N].astype(np.uint8), m[:N].astype(np.uint8),
            u[:N].astype(np.uint8))


def dequantize_q4k(raw, N: int, K: int) -> np.ndarray:
    """f32 [N, K]: f32(d * sc) * u - f32(dmin * m), as the C++ row decode computes it."""
    d, dmin, sc, m, u = unpack_q4k(raw, N, K)
    S = q4k_subs(padded_k(K) // QBLOCK)
    dsc = np.repeat(d.astype(np.float32), S, axis=1) * sc.astype(np.float32)
    dm = np.repeat(dmin.astype(np.float32), S, axis=1) * m.astype(np.float32)
    w = np.repeat(dsc, QBLOCK, axis=1) * u.astype(np.float32) - np.repeat(dm, QBLOCK, axis=1)
    return np.ascontiguousarray(w[:, :K])


# ----------------------------------------------------------------------------- one call

_QUANTIZE = {Q8: (quantize_q8, pack_q8), Q4: (quantize_q4, pack_q4), Q6: (quantize_q6, pack_q6),
             Q5: (quantize_q5, pack_q5)}


def quantize_packed(w: np.ndarray, dtype: str, imp=None) -> bytes:
    """Quantize (with imp: importance-weighted, module docstring) and pack a whole [N, K] matrix. Packing is per panel of 16 rows, so the bytes
    of rows [16 a, 16 b) are exactly what this returns for those rows alone: the exporter
    calls it on row chunks that are multiples of 16 and concatenates."""
    if dtype == Q4K:
        parts = quantize_q4k(w, imp)  # checks that w is 2-D
        return pack_q4k(*parts, *np.shape(w))
    quantize, pack = _QUANTIZE[dtype]
    d, q = quantize(w) if imp is None else quantize(w, imp)  # checks that w is 2-D
    N, K = np.shape(w)
    return pack(d, q, N, K)
