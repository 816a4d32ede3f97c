// Kernel signatures and the table a backend dispatches through.
// Kernels are pure functions on raw buffers: no allocation, no threads, no model
// knowledge. `_ref` kernels (kernels/ref/) are plain fp32 loops, the truth every
// faster variant (SIMD, CUDA) is tested against. Threading is the backend's job:
// each kernel takes the sub-range of outputs it should produce.
#pragma once
#include <cstdint>

#include "format/oelm_file.h"

namespace oelm {

// y[t*ldy + n] = sum_k x[t*K + k] * W[n*K + k] for t in [0,T), n in [n0,n1).
// W is row-major [N, K] in the weight dtype; x is [T, K] f32.
using matmul_fn = void (*)(const float* x, int64_t T, int64_t K, const void* W, int64_t n0,
                           int64_t n1, float* y, int64_t ldy);

// f32 weights against many tokens, where a variant has a faster form of matmul[f32] that wants
// the activations repacked once per product (x86 with 512-bit vectors; nullptr elsewhere):
// pack_f32 packs token groups [g0, g1) of kF32Group tokens of x [T, K] (K a multiple of 16)
// into xp (kF32Group * K floats per group, T / kF32Group groups; the caller may split the groups
// among threads), then matmul_f32_packed(x, xp, ...) gives matmul[f32]'s result bit for bit.
constexpr int64_t kF32Group = 12;
// matmul_f32_packed repacks W in blocks of rows whose panels take at most this many bytes (or one
// 32-row panel where a row is longer), into a buffer each calling thread keeps: at most
// kF32PanelBlockBytes + 32 * K * 4 bytes per thread (Backend::f32_pack_thread_bytes).
constexpr int64_t kF32PanelBlockBytes = 768 * 1024;
// The same for f16 and bf16 weights (matmul_packed[f16 / bf16]): the panels are the weights widened
// to f32 (exact), so the result is matmul[f16 / bf16]'s bit for bit, and the panel buffer the same.
using pack_f32_fn = void (*)(const float* x, int64_t K, int64_t g0, int64_t g1, float* xp);
using matmul_f32_packed_fn = void (*)(const float* x, const float* xp, int64_t T, int64_t K, const void* W,
                                      int64_t n0, int64_t n1, float* y, int64_t ldy);

// The same product for 16-bit float weights with the activations given as bfloat16 (x rounded to
// bf16 by the caller, [T, K] row-major): y = sum_k bf16(x)[k] * w[k], every product exact in f32,
// the sums in f32 in any order (as matmul_fn). Where the CPU has bf16 dot-product instructions
// (AVX-512 BF16: vdpbf16ps, 32 multiply-adds per instruction, twice f32 FMA's rate) this is the
// fast path for bf16 weights; the rounding of x is its only cost in accuracy (Backend chooses).
using matmul_xbf16_fn = void (*)(const uint16_t* x, int64_t T, int64_t K, const void* W, int64_t n0,
                                 int64_t n1, float* y, int64_t ldy);
// Its form for many tokens, as matmul_f32_packed is matmul[f32]'s: xp holds x's token groups packed
// by pack_f32 with x's bf16 pairs as K / 2 32-bit words (pack_f32 only moves words:
// pack_f32(reinterpret_cast<const float*>(x), K / 2, ...)), and the result is matmul_xbf16's bit for
// bit (K a multiple of 32 for the packed groups; other K, and the tokens past the last whole group,
// take matmul_xbf16 itself). The same per-thread weight panel buffer as matmul_f32_packed.
using matmul_xbf16_packed_fn = void (*)(const uint16_t* x, const float* xp, int64_t T, int64_t K, const void* W,
                                        int64_t n0, int64_t n1, float* y, int64_t ldy);

// y[i] = x[i] / sqrt(mean(x^2) + eps) * w[i], i in [0, n). y may alias x.
using rmsnorm_fn = void (*)(const float* x, const float* w, int64_t n, float eps, float* y);

// Rotate-half RoPE in place on n_heads heads of width hd laid out contiguously
// (head h at x + h*hd): pairs (j, j + hd/2) rotate by angle (cos[j], sin[j]).
using rope_fn = void (*)(float* x, int64_t n_heads, int64_t hd, const float* cos,
                         const float* sin);

// Causal attention of one query head over n_kv cached positions, online softmax:
// out[d] = sum_s softmax_s(scale * q.k_s) v_s[d]. k and v are [n_kv, hd] contiguous.
using attention_fn = void (*)(const float* q, const float* k, const float* v, int64_t n_kv,
                              int64_t hd, float scale, float* out);

// The KV cache of one KV head of one sequence, in blocks of `block` positions (a multiple of
// kKvAlign, so a kernel's 16-key step never crosses a block). Block i of the table starts at
// k + table[i] * stride (and v + table[i] * stride), in elements of `type`.
//  - Values: row-major, position r of a block at row r: element d at r * hd + d.
//  - Keys: in groups of kKvAlign positions, each group dimension-major: element d of position
//    r is at (r / 16) * 16 * hd + d * 16 + r % 16. A kernel reads the 16 keys' element d as
//    one contiguous run, so q.k for 16 keys is hd multiply-adds of vectors, no horizontal sums.
constexpr int64_t kKvAlign = 16;
enum class KvType : int { f32 = 0, f16 = 1 };  // f16: IEEE binary16, widened exactly on load
struct KvView {
  const void* k;
  const void* v;
  const int32_t* table;
  int64_t stride;  // elements from block id i to block id i + 1
  int64_t block;   // positions per block
  KvType type;
};

// Causal attention for a tile of queries that share one KV head: n_tok consecutive tokens
// times n_grp query heads. Query head g of token t is q + t*ldq + g*hd and attends positions
// 0 .. pos0 + t of kv; its output goes to out + t*ldo + g*hd. Same result as `attention_fn`
// row by row on the widened keys and values; fast variants tile it (flash attention: blocks
// of keys against blocks of queries, online softmax, each key and value read once per tile
// instead of once per query). A row's result must not depend on the other rows of the tile
// (the batched step relies on it: a sequence's logits never depend on its neighbours).
using attention_tile_fn = void (*)(const float* q, int64_t ldq, int64_t n_tok, int64_t n_grp, int64_t pos0,
                                   const KvView& kv, int64_t hd, float scale, float* out, int64_t ldo);

// out[j] = silu(gate[j]) * up[j], j in [0, n).
using swiglu_fn = void (*)(const float* gate, const float* up, int64_t n, float* out);

// Widens row `row` (< N) of a weight matrix W [N, K] stored in the kernel's dtype to
// f32: out[0..K). Used for the embedding lookup. Exact for every dtype (block-quantized
// rows come back as scale * q, which is exact in f32).
using row_to_f32_fn = void (*)(const void* W, int64_t N, int64_t K, int64_t row, float* out);

// --- Block-quantized weights (q8_b32r16i, q6_b32r16i, q5_b32r16i, q4_b32r16i, q4k_b32r16i; layout in
// docs/FORMAT.md) ---
// Integer kernels multiply int8 activations by the stored integer weights. Activations are
// quantized per block of kQBlock values: d = amax / 127, q = nearbyint(x * (127 / amax)),
// s = sum of the block's q. A row of K values is padded with zeros to Kp = round_up(K, kQBlock).
// Every input is defined: a block holding a NaN or an infinity gets q = 0, s = 0 and d = NaN
// (every output it touches is NaN, as a float matmul would give, and the runtime reports the
// non-finite logits); a block whose 127 / amax is not finite (all zero, or amax < 127 / FLT_MAX,
// about 3.7e-37) gets q = 0, s = 0 and d = 0. So |s| <= 32 * 127 always.
constexpr int64_t kQBlock = 32;   // weights and activations share the block size along K
constexpr int64_t kQRows = 16;    // rows interleaved in one panel of a quantized matrix
// A panel is nb blocks one after another; a block is the 16 rows' binary16 scales, then
// their 32 weights each (4 consecutive weights of every row per 64 bytes).
constexpr int64_t kQScaleBytes = 2 * kQRows;
constexpr int64_t kQ8BlockBytes = kQScaleBytes + kQRows * kQBlock;      // 544 = 17 * 32
constexpr int64_t kQ4BlockBytes = kQScaleBytes + kQRows * kQBlock / 2;  // 288 = 9 * 32
// q6 / q5: q4's 256 bytes of low nibbles, then 2 / 1 lines of 64 bytes of high bits (FORMAT.md).
constexpr int64_t kQNibbleBytes = kQRows * kQBlock / 2;
constexpr int64_t kQ6BlockBytes = kQ4BlockBytes + 2 * 64;  // 416 = 13 * 32
constexpr int64_t kQ5BlockBytes = kQ4BlockBytes + 64;      // 352 = 11 * 32
inline int64_t q_padded_k(int64_t K) { return (K + kQBlock - 1) / kQBlock * kQBlock; }
inline int64_t q_padded_n(int64_t N) { return (N + kQRows - 1) / kQRows * kQRows; }

// q4k_b32r16i (FORMAT.md): 4-bit weights u in [0, 15], w = d * sc * u - dmin * m, with a 6-bit
// scale sc and a 6-bit minimum m per block of 32 and binary16 d, dmin per super-block of S
// blocks. S is the largest of 8, 7, ..., 1 that divides the row's nb = Kp / 32 blocks (8 when
// K is a multiple of 256; 6 for K = 576). A panel is nb / S super-blocks; a super-block is the
// 16 rows' d (32 bytes), their dmin (32 bytes), S x 24 bytes of scales and minimums, then S x
// 256 bytes of nibbles in q4's layout.
constexpr int64_t kQ4kHeadBytes = 4 * kQRows;    // d and dmin of 16 rows
constexpr int64_t kQ4kScaleBytes = 24;           // one block's 16 (sc, m) pairs
inline int64_t q4k_super_bytes(int64_t S) { return kQ4kHeadBytes + S * (kQ4kScaleBytes + kQNibbleBytes); }
inline int64_t q4k_panel_bytes(int64_t Kp) {
  const int64_t nb = Kp / kQBlock, S = q4k_subs(nb);
  return nb / S * q4k_super_bytes(S);
}

// Quantizes one row x[0..K) into q[0..Kp), d[0..Kp/32), s[0..Kp/32).
using quantize_row_fn = void (*)(const float* x, int64_t K, int8_t* q, float* d, int32_t* s);

// T rows of quantized activations: row t at q + t*Kp, d + t*Kp/32, s + t*Kp/32.
struct QActs {
  const int8_t* q;
  const float* d;
  const int32_t* s;
  int64_t Kp;
};

// y[t*ldy + n] for t < T, n in [n0, n1): per block b of K, the exact integer dot product
// isum of the weight integers (q8: q in [-127,127]; q6: [-32,31]; q5: [-16,15]; q4: [-8,7]) with the activation
// integers, then acc = fma(float(isum) * x.d[t][b], w.d[n][b], acc) with acc starting at 0
// and b ascending. q4k: isum of the nibbles u (no offset) with the activation integers, then
// acc = fma(float(isum) * x.d[t][b], d * sc, acc); acc = fma(float(x.s[t][b]) * x.d[t][b], -(dmin * m), acc)
// (d * sc and dmin * m are exact in f32). n0 is a multiple of kQRows; n1 is a multiple of kQRows or N.
using qmatmul_fn = void (*)(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0,
                            int64_t n1, float* y, int64_t ldy);

constexpr int kNumDTypes = 10;  // DType values (i32 included, its entries null) index the tables below

struct KernelTable {
  const char* name;
  matmul_fn matmul[kNumDTypes];    // f32, f16, bf16 weights (nullptr for the others)
  matmul_xbf16_fn matmul_xbf16[kNumDTypes];  // bf16 activations: bf16 weights (nullptr elsewhere)
  qmatmul_fn qmatmul[kNumDTypes];  // block-quantized weights (nullptr for the others)
  row_to_f32_fn row_to_f32[kNumDTypes];
  quantize_row_fn quantize_row;
  rmsnorm_fn rmsnorm;
  rope_fn rope;
  attention_fn attention;
  attention_tile_fn attention_tile;
  swiglu_fn swiglu;
  pack_f32_fn pack_f32;                  // nullptr: no packed f32 form (see pack_f32_fn)
  matmul_f32_packed_fn matmul_packed[kNumDTypes];  // f32, f16, bf16 weights (nullptr: no packed form)
  matmul_xbf16_packed_fn matmul_xbf16_packed[kNumDTypes];  // bf16 weights (nullptr: no packed form)
};

// The scalar reference kernels.
const KernelTable& ref_kernels();

void matmul_f32_ref(const float*, int64_t, int64_t, const void*, int64_t, int64_t, float*, int64_t);
void matmul_f16_ref(const float*, int64_t, int64_t, const void*, int64_t, int64_t, float*, int64_t);
void matmul_bf16_ref(const float*, int64_t, int64_t, const void*, int64_t, int64_t, float*, int64_t);
void matmul_bf16_xbf16_ref(const uint16_t*, int64_t, int64_t, const void*, int64_t, int64_t, float*, int64_t);
void rmsnorm_ref(const float* x, const float* w, int64_t n, float eps, float* y);
void rope_ref(float* x, int64_t n_heads, int64_t hd, const float* cos, const float* sin);
void attention_ref(const float* q, const float* k, const float* v, int64_t n_kv, int64_t hd,
                   float scale, float* out);
void attention_tile_ref(const float* q, int64_t ldq, int64_t n_tok, int64_t n_grp, int64_t pos0, const KvView& kv,
                        int64_t hd, float scale, float* out, int64_t ldo);
void swiglu_ref(const float* gate, const float* up, int64_t n, float* out);
void quantize_row_ref(const float* x, int64_t K, int8_t* q, float* d, int32_t* s);
void qmatmul_q8_ref(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                    int64_t ldy);
void qmatmul_q4_ref(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                    int64_t ldy);
void qmatmul_q6_ref(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                    int64_t ldy);
void qmatmul_q5_ref(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                    int64_t ldy);
void row_to_f32_q8_ref(const void* W, int64_t N, int64_t K, int64_t row, float* out);
void row_to_f32_q4_ref(const void* W, int64_t N, int64_t K, int64_t row, float* out);
void row_to_f32_q6_ref(const void* W, int64_t N, int64_t K, int64_t row, float* out);
void row_to_f32_q5_ref(const void* W, int64_t N, int64_t K, int64_t row, float* out);
void qmatmul_q4k_ref(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                     int64_t ldy);
// q4k rows: f32(d * sc) * u - f32(dmin * m), one rounding (the subtraction).
void row_to_f32_q4k_ref(const void* W, int64_t N, int64_t K, int64_t row, float* out);

}  // namespace oelm
