// Blocked attention of a tile of query rows (one KV head's) to a range of keys of the paged KV cache:
// the part the CPU prefill kernel (prefill_attention.cpp) and the decode kernel's groups
// (decode_attention.cpp) share. Included by both; everything here is inline or in an anonymous namespace.
//
// A tile holds any number of rows: query vectors (float32, already scaled), each with its position
// (it sees keys up to its own position, within the sliding window) and its online-softmax state
// (running max, sum, unnormalised output). The loop works on chunks of ROW_CHUNK rows held transposed, rows
// in vector lanes: queries and outputs as [head_dim][ROW_CHUNK], scores as [KEYS][ROW_CHUNK]. So a score pass
// broadcasts one key element against a vector of rows (FAN keys at a time, no key is ever transposed),
// the softmax's max, exp, sum and rescale are lane-wise (one row per lane, no horizontal step), and a
// value pass broadcasts one value element against a vector of weights (FAN dims at a time). Keys go in
// blocks of KEYS (one softmax update per block), read in place from a float32 cache; where the keys are
// likely out of cache, the next block is requested while one is worked on. Masked keys score MASKED, a
// finite stand-in for -inf: the library is built with -ffast-math (vectorised exp), under which
// infinities are not allowed.
//
// A bfloat16 cache, on a CPU with AVX-512 BF16: both products run as bfloat16 dot products of pairs
// (vdpbf16ps: two products per float32 lane, accumulated in float32), as bfloat16 attention on a GPU does:
// scores from the bfloat16 queries and keys, then scaled; the softmax in float32; its weights rounded to
// bfloat16 for the values' product (as transformers' bfloat16 attention rounds them). Pairs run along
// head_dim for the scores (a key's two neighbouring elements are one 32-bit word, broadcast as is) and
// along the keys for the values (each block's values interleaved two keys at a time once, for all rows).
// Elsewhere a bfloat16 block is widened to float32 once and goes the float32 way.
#pragma once

#include <algorithm>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bf16.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define ATTENTION_BF16_DOT 1
#else
#define ATTENTION_BF16_DOT 0
#endif

namespace {

constexpr int LANES = 16;           // floats per vector
constexpr int KEYS = 64;            // keys per block: one online-softmax update
constexpr int ROW_CHUNK = 2 * LANES;    // rows per chunk: two vectors of rows
constexpr int FAN = 12;             // keys per score pass, dims per value pass: FAN x 2 accumulators
constexpr float MASKED = -1.0e30f;
typedef float Lanes __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t Ints __attribute__((vector_size(LANES * sizeof(int32_t))));

inline Lanes lanes_at(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void put_lanes(float* p, Lanes v) { std::memcpy(p, &v, sizeof v); }
inline Ints ints_at(const int32_t* p) {
  Ints v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline bool any_lane(Ints v) {
  for (int i = 0; i < LANES; ++i)
    if (v[i]) return true;
  return false;
}

struct Shape {
  int heads, kv_heads, head_dim, block_size;
  float scale, softcap;
  int64_t window;  // 0: none
};

// The cache slot of key position p, through a block table whose column 0 holds position `first` (a block's
// first position); a token's keys (all KV heads) are at slot * kv_heads * head_dim.
inline int64_t slot_of(const int32_t* table, int64_t p, int64_t first, int block_size) {
  const int64_t i = p - first;
  return static_cast<int64_t>(table[i / block_size]) * block_size + i % block_size;
}

// Rows of keys and values the work will need next (the next block's: at a random place of the cache, the
// hardware prefetcher does not see it coming), requested a few cache lines per step of the work done
// meanwhile: requested all at once, the memory system's queue filled and stalled the core (a decode row's
// keys came at half the speed; bench/cpu_decode_attention.py).
struct SpreadPrefetch {
  const char* k[KEYS];
  const char* v[KEYS];
  int rows = 0, row_bytes = 0, row = 0, at = 0, lines = 1;
  template <typename T>
  void set(int i, const T* key_row, const T* value_row) {
    k[i] = reinterpret_cast<const char*>(key_row);
    v[i] = reinterpret_cast<const char*>(value_row);
  }
  // the rows set (up to KEYS, row_bytes each), spread over `steps` calls of step()
  void start(int rows_, int row_bytes_, int steps) {
    rows = rows_;
    row_bytes = row_bytes_;
    row = at = 0;
    const int total = rows * ((row_bytes + 63) / 64);
    lines = std::max(1, (total + std::max(1, steps) - 1) / std::max(1, steps));
  }
  void step() {
    for (int l = 0; l < lines && row < rows; ++l) {
      __builtin_prefetch(k[row] + at);
      __builtin_prefetch(v[row] + at);
      at += 64;
      if (at >= row_bytes) {
        at = 0;
        ++row;
      }
    }
  }
  // the same rows again from their first line, over `steps` calls (a request prepared before the work
  // it is spread over was known)
  void restart(int steps) { start(rows, row_bytes, steps); }
  void finish() {
    while (row < rows) step();
  }
};

// A task's tile, reused across tasks of a thread, held in attend_keys' layout so no call copies it: per
// chunk c of ROW_CHUNK rows, queries and outputs [c][D][ROW_CHUNK], running max and sum [c][ROW_CHUNK]
// (a row's values are ROW_CHUNK floats apart). Callers start(), set each row's query (query_at) and
// position, run attend_keys (any number of times over disjoint key ranges), and read output_at, max_of
// and sum_of. A chunk's unused lanes hold zero queries and see what its last row sees.
struct Tile {
  int rows = 0, D = 0;
  std::vector<float> qt, acct, mt, lt;
  std::vector<int64_t> pos;    // [rows] the query's position
  std::vector<int32_t> rel;    // [chunks][ROW_CHUNK] position relative to the attend's first key
  // working memory: one block's scores [KEYS][ROW_CHUNK]; a bfloat16 block's keys and values widened [KEYS][D]
  std::vector<float> scores, keys, values;
  // the bfloat16 dot-product path's pairs (two bfloat16 in a 32-bit word, the first in the low half):
  // queries [chunks][D / 2][ROW_CHUNK], one block's values [KEYS / 2][D] (keys 2t and 2t + 1) and a chunk's
  // weights [KEYS / 2][ROW_CHUNK]
  std::vector<uint32_t> qpairs, vpairs, ppairs;
  SpreadPrefetch ahead;  // the next block of keys and values, while attend_keys works on one
  // what the caller reads after this attend (set after start(), spread over attend_steps() of it; the
  // caller finishes it): its own next keys would otherwise come in with a stall
  SpreadPrefetch after;
  void step_requests() {
    ahead.step();
    after.step();
  }
  int chunks() const { return (rows + ROW_CHUNK - 1) / ROW_CHUNK; }
  static size_t at(int r, int d, int D) {
    return (static_cast<size_t>(r / ROW_CHUNK) * D + d) * ROW_CHUNK + r % ROW_CHUNK;
  }
  // a fresh state for `rows` queries of D dims, queries zero
  void start(int rows_, int D_) {
    rows = rows_;
    D = D_;
    const size_t lanes = static_cast<size_t>(chunks()) * ROW_CHUNK;
    qt.assign(lanes * D, 0.f);
    acct.assign(lanes * D, 0.f);
    mt.assign(lanes, MASKED);
    lt.assign(lanes, 0.f);
    pos.resize(rows);
    after.start(0, 0, 1);
  }
  // about how many steps of work attend_keys does over `keys` keys (what `after` is spread over)
  int attend_steps(int64_t keys) const {
    const int64_t blocks = (keys + KEYS - 1) / KEYS;
    return static_cast<int>(std::min<int64_t>(INT_MAX / 4, blocks * chunks() * ((KEYS + D) / FAN + 2)));
  }
  float& query_at(int r, int d) { return qt[at(r, d, D)]; }
  float output_at(int r, int d) const { return acct[at(r, d, D)]; }
  float max_of(int r) const { return mt[r]; }
  float sum_of(int r) const { return lt[r]; }
};

// exp of each lane, for x <= 0 (a score minus the running max): 2^n * 2^f with n the nearest integer to
// x * log2(e), f in [-0.5, 0.5], 2^f by its Taylor series to f^6 (relative error < 2e-7).
inline Lanes exp_lanes(Lanes x) {
  x = x < -87.0f ? Lanes{} - 87.0f : x;
  const Lanes t = x * 1.44269504f;
  const Ints n = __builtin_convertvector(t - 0.5f, Ints);  // truncation: the nearest integer for t <= 0.5
  const Lanes f = (t - __builtin_convertvector(n, Lanes)) * 0.693147181f;
  Lanes p = 1.0f + f * (1.0f + f * (0.5f + f * (0.166666667f + f * (0.0416666667f + f * (0.00833333333f
                + f * 0.00138888889f)))));
  Ints bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += n << 23;
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

// Folds a block into one query's online-softmax state: its running max becomes `top`, its sum and
// unnormalised output (acc, D floats) are rescaled from the old max, and the block's weights (already
// exp(score - top)) add `block_total` to the sum.
inline void advance_softmax(float& max, float& sum, float* acc, int D, float top, float block_total) {
  const float rescale = std::exp(max - top);
  sum = sum * rescale + block_total;
  max = top;
  if (rescale != 1.f) {
#pragma omp simd
    for (int d = 0; d < D; ++d) acc[d] *= rescale;
  }
}

// Scores of a chunk's rows (RV vectors of them) for N keys: scores[i][rows] = sum_d key_i[d] * qt[d][rows].
template <int RV, int N>
inline void score_pass(const float* qt, const float* const* key, int D, float* scores) {
  Lanes a[N][RV];
  for (int i = 0; i < N; ++i)
    for (int v = 0; v < RV; ++v) a[i][v] = Lanes{};
  for (int d = 0; d < D; ++d) {
    Lanes q[RV];
    for (int v = 0; v < RV; ++v) q[v] = lanes_at(qt + d * ROW_CHUNK + v * LANES);
    for (int i = 0; i < N; ++i) {
      const float k = key[i][d];
      for (int v = 0; v < RV; ++v) a[i][v] += k * q[v];
    }
  }
  for (int i = 0; i < N; ++i)
    for (int v = 0; v < RV; ++v) put_lanes(scores + i * ROW_CHUNK + v * LANES, a[i][v]);
}

// Outputs of a chunk's rows for N dims from d0, rescaled to the block's max on the way in:
// acct[d][rows] = acct[d][rows] * rescale[rows] + sum_t value_t[d] * weights[t][rows].
template <int RV, int N>
inline void value_pass(const float* weights, const float* const* value, int n, int d0, const Lanes* rescale,
                       float* acct) {
  Lanes a[N][RV];
  for (int i = 0; i < N; ++i)
    for (int v = 0; v < RV; ++v) a[i][v] = lanes_at(acct + (d0 + i) * ROW_CHUNK + v * LANES) * rescale[v];
  for (int t = 0; t < n; ++t) {
    Lanes p[RV];
    for (int v = 0; v < RV; ++v) p[v] = lanes_at(weights + t * ROW_CHUNK + v * LANES);
    const float* x = value[t] + d0;
    for (int i = 0; i < N; ++i)
      for (int v = 0; v < RV; ++v) a[i][v] += x[i] * p[v];
  }
  for (int i = 0; i < N; ++i)
    for (int v = 0; v < RV; ++v) put_lanes(acct + (d0 + i) * ROW_CHUNK + v * LANES, a[i][v]);
}

#if ATTENTION_BF16_DOT
inline __m512bh pair_broadcast(uint32_t pair) { return (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)); }
inline __m512bh pairs_at(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline uint32_t pair_at(const bf16_t* p) {
  uint32_t pair;
  std::memcpy(&pair, p, sizeof pair);
  return pair;
}

// score_pass from bfloat16 pairs: qp = the chunk's query pairs [D / 2][ROW_CHUNK], key[i] a bfloat16 key
// row; the scores come out multiplied by `scale` (the queries' pairs are unscaled).
template <int RV, int N>
inline void score_pass_pairs(const uint32_t* qp, const bf16_t* const* key, int D, float scale, float* scores) {
  __m512 a[N][RV];
  for (int i = 0; i < N; ++i)
    for (int v = 0; v < RV; ++v) a[i][v] = _mm512_setzero_ps();
  for (int j = 0; j < D / 2; ++j) {
    __m512bh q[RV];
    for (int v = 0; v < RV; ++v) q[v] = pairs_at(qp + j * ROW_CHUNK + v * LANES);
    for (int i = 0; i < N; ++i) {
      const __m512bh k = pair_broadcast(pair_at(key[i] + 2 * j));
      for (int v = 0; v < RV; ++v) a[i][v] = _mm512_dpbf16_ps(a[i][v], q[v], k);
    }
  }
  for (int i = 0; i < N; ++i)
    for (int v = 0; v < RV; ++v) _mm512_storeu_ps(scores + i * ROW_CHUNK + v * LANES, _mm512_mul_ps(a[i][v], _mm512_set1_ps(scale)));
}

// value_pass from bfloat16 pairs: pp = the chunk's weight pairs [n2][ROW_CHUNK], vp = the block's value
// pairs [n2][D].
template <int RV, int N>
inline void value_pass_pairs(const uint32_t* pp, const uint32_t* vp, int n2, int D, int d0, const Lanes* rescale,
                             float* acct) {
  __m512 a[N][RV];
  for (int i = 0; i < N; ++i)
    for (int v = 0; v < RV; ++v)
      a[i][v] = (__m512)(lanes_at(acct + (d0 + i) * ROW_CHUNK + v * LANES) * rescale[v]);
  for (int t = 0; t < n2; ++t) {
    __m512bh p[RV];
    for (int v = 0; v < RV; ++v) p[v] = pairs_at(pp + t * ROW_CHUNK + v * LANES);
    const uint32_t* x = vp + static_cast<size_t>(t) * D + d0;
    for (int i = 0; i < N; ++i) {
      const __m512bh b = pair_broadcast(x[i]);
      for (int v = 0; v < RV; ++v) a[i][v] = _mm512_dpbf16_ps(a[i][v], p[v], b);
    }
  }
  for (int i = 0; i < N; ++i)
    for (int v = 0; v < RV; ++v) _mm512_storeu_ps(acct + (d0 + i) * ROW_CHUNK + v * LANES, a[i][v]);
}

// The weights of keys 2t and 2t + 1 (float32, [n][ROW_CHUNK]) as bfloat16 pairs per row: [n2][ROW_CHUNK]; an
// odd n's last pair has a zero second weight.
template <int RV>
inline void weight_pairs(const float* weights, int n, uint32_t* pp) {
  // words 0..15 hold the first key's 16 weights, 16..31 the second's: interleaved into 16 pairs
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int t = 0; 2 * t < n; ++t)
    for (int v = 0; v < RV; ++v) {
      const __m512 first = _mm512_loadu_ps(weights + 2 * t * ROW_CHUNK + v * LANES);
      const __m512 second = 2 * t + 1 < n ? _mm512_loadu_ps(weights + (2 * t + 1) * ROW_CHUNK + v * LANES)
                                          : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(second, first);
      _mm512_storeu_si512(pp + t * ROW_CHUNK + v * LANES, _mm512_permutexvar_epi16(interleave, both));
    }
}

// Value rows 2t and 2t + 1 of a block (bfloat16, D each; a missing second row counts as zeros) interleaved
// into D pairs: vp[d] = (first[d], second[d]).
inline void value_pairs(const bf16_t* first, const bf16_t* second, int D, uint32_t* vp) {
  const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                       39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i high = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                        55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  int d = 0;
  for (; d + 32 <= D; d += 32) {
    const __m512i a = _mm512_loadu_si512(first + d);
    const __m512i b = second != nullptr ? _mm512_loadu_si512(second + d) : _mm512_setzero_si512();
    _mm512_storeu_si512(vp + d, _mm512_permutex2var_epi16(a, low, b));
    _mm512_storeu_si512(vp + d + 16, _mm512_permutex2var_epi16(a, high, b));
  }
  for (; d < D; ++d) vp[d] = static_cast<uint32_t>(first[d]) | (second != nullptr ? static_cast<uint32_t>(second[d]) << 16 : 0u);
}
#endif

// CALL(N, i) over i in [0, COUNT): steps of FAN, then 4, then 1.
#define FOR_FANS(COUNT, CALL)                          \
  {                                                    \
    int i_ = 0;                                        \
    for (; i_ + FAN <= (COUNT); i_ += FAN) CALL(FAN, i_); \
    for (; i_ + 4 <= (COUNT); i_ += 4) CALL(4, i_);    \
    for (; i_ < (COUNT); ++i_) CALL(1, i_);            \
  }

// One block of n keys for chunk c's rows (RV vectors of them), the block's first key `offset` positions
// after the attend's first key. PAIRS: the bfloat16 dot-product path (key16[t]: the bfloat16 key rows, the
// tile's qpairs and vpairs set); else key[t], value[t]: float32 rows of D.
template <int RV, bool PAIRS>
void attend_chunk(Tile& tl, int c, int D, int n, int32_t offset, const float* const* key, const float* const* value,
                  const bf16_t* const* key16, const Shape& s) {
  float* qt = &tl.qt[static_cast<size_t>(c) * D * ROW_CHUNK];
  float* acct = &tl.acct[static_cast<size_t>(c) * D * ROW_CHUNK];
  float* scores = tl.scores.data();
  // a row sees keys t in [lo, hi] of the block
  Ints hi[RV], lo[RV];
  bool sees = false, partly = false;
  for (int v = 0; v < RV; ++v) {
    hi[v] = ints_at(&tl.rel[static_cast<size_t>(c) * ROW_CHUNK + v * LANES]) - offset;
    lo[v] = s.window > 0 ? hi[v] - static_cast<int32_t>(std::min<int64_t>(s.window, INT_MAX / 4)) + 1 : Ints{} + INT_MIN / 2;
    sees |= any_lane((hi[v] >= 0) & (lo[v] <= n - 1));
  }
  if (!sees) return;
  // keys after every row's position (a causal tile's diagonal block) are not computed at all
  int32_t reach = 0;
  for (int v = 0; v < RV; ++v)
    for (int i = 0; i < LANES; ++i) reach = std::max(reach, hi[v][i]);
  n = std::min(n, reach + 1);
  for (int v = 0; v < RV; ++v) partly |= any_lane((hi[v] < n - 1) | (lo[v] > 0));
#if ATTENTION_BF16_DOT
  if constexpr (PAIRS) {
    const uint32_t* qp = &tl.qpairs[static_cast<size_t>(c) * (D / 2) * ROW_CHUNK];
#define SCORES(N, I) (tl.step_requests(), score_pass_pairs<RV, N>(qp, key16 + (I), D, s.scale, scores + (I) * ROW_CHUNK))
    FOR_FANS(n, SCORES)
#undef SCORES
  } else
#endif
  {
#define SCORES(N, I) (tl.step_requests(), score_pass<RV, N>(qt, key + (I), D, scores + (I) * ROW_CHUNK))
    FOR_FANS(n, SCORES)
#undef SCORES
  }
  if (s.softcap > 0.f)
    for (int t = 0; t < n; ++t)
      for (int r = 0; r < RV * LANES; ++r) {
        float& x = scores[t * ROW_CHUNK + r];
        x = s.softcap * std::tanh(x / s.softcap);
      }
  if (partly)
    for (int t = 0; t < n; ++t)
      for (int v = 0; v < RV; ++v) {
        const Lanes x = lanes_at(scores + t * ROW_CHUNK + v * LANES);
        put_lanes(scores + t * ROW_CHUNK + v * LANES, (hi[v] >= t) & (lo[v] <= t) ? x : Lanes{} + MASKED);
      }
  Lanes top[RV], old[RV], total[RV], rescale[RV];
  for (int v = 0; v < RV; ++v) {
    old[v] = top[v] = lanes_at(&tl.mt[static_cast<size_t>(c) * ROW_CHUNK + v * LANES]);
    total[v] = Lanes{};
  }
  for (int t = 0; t < n; ++t)
    for (int v = 0; v < RV; ++v) {
      const Lanes x = lanes_at(scores + t * ROW_CHUNK + v * LANES);
      top[v] = top[v] > x ? top[v] : x;
    }
  for (int t = 0; t < n; ++t)
    for (int v = 0; v < RV; ++v) {
      const Lanes x = lanes_at(scores + t * ROW_CHUNK + v * LANES);
      const Lanes p = x <= MASKED ? Lanes{} : exp_lanes(x - top[v]);
      put_lanes(scores + t * ROW_CHUNK + v * LANES, p);
      total[v] += p;
    }
  for (int v = 0; v < RV; ++v) {
    float* m = &tl.mt[static_cast<size_t>(c) * ROW_CHUNK + v * LANES];
    float* l = &tl.lt[static_cast<size_t>(c) * ROW_CHUNK + v * LANES];
    rescale[v] = exp_lanes(old[v] - top[v]);
    put_lanes(l, lanes_at(l) * rescale[v] + total[v]);
    put_lanes(m, top[v]);
  }
#if ATTENTION_BF16_DOT
  if constexpr (PAIRS) {
    weight_pairs<RV>(scores, n, tl.ppairs.data());
    const int n2 = (n + 1) / 2;
#define VALUES(N, I) (tl.step_requests(), value_pass_pairs<RV, N>(tl.ppairs.data(), tl.vpairs.data(), n2, D, (I), rescale, acct))
    FOR_FANS(D, VALUES)
#undef VALUES
    return;
  }
#endif
#define VALUES(N, I) (tl.step_requests(), value_pass<RV, N>(scores, value, n, (I), rescale, acct))
  FOR_FANS(D, VALUES)
#undef VALUES
}

// The rows of `tl` attend to key positions [begin, end) of KV head `kv_head`, read through `table`
// (column 0 = the block of position key_start). Rows whose position or window excludes a key skip it.
// read_ahead: request each next block of keys while working on one (keys likely out of cache: a decode
// group's prefix; not a prefill span's, just stored, where the requests only cost time: 0.9x per call).
template <typename T>
void attend_keys(Tile& tl, const T* k_cache, const T* v_cache, const int32_t* table, int64_t key_start,
                 int64_t begin, int64_t end, int64_t kv_head, const Shape& s, bool read_ahead) {
  const int D = s.head_dim, BS = s.block_size;
  const int rows = tl.rows, chunks = tl.chunks();
  assert(tl.D == D && rows > 0);
  tl.rel.resize(static_cast<size_t>(chunks) * ROW_CHUNK);
  tl.scores.resize(static_cast<size_t>(KEYS) * ROW_CHUNK);
  for (int r = 0; r < chunks * ROW_CHUNK; ++r) {
    const int64_t rel = tl.pos[std::min(r, rows - 1)] - begin;
    tl.rel[r] = static_cast<int32_t>(std::clamp<int64_t>(rel, -(INT_MAX / 4), INT_MAX / 4));
  }
  const int64_t token_stride = static_cast<int64_t>(s.kv_heads) * D;
  const int64_t head_offset = kv_head * D;
  const float* key[KEYS];
  const float* value[KEYS];
  const bf16_t* key16[KEYS];
  // the bfloat16 dot-product path: a bfloat16 cache, pairs of head_dim
  constexpr bool bf16_cache = std::is_same<T, bf16_t>::value;
  const bool pairs = ATTENTION_BF16_DOT && bf16_cache && D % 2 == 0;
  if (pairs) {
    // The queries as bfloat16 pairs, unscaled: a query element is a bfloat16 q times the scale, so q is
    // its value divided by the scale rounded to bfloat16, exactly (the product and the quotient each err
    // by at most half a float32 ulp, far inside half a bfloat16 ulp).
    tl.qpairs.resize(static_cast<size_t>(chunks) * (D / 2) * ROW_CHUNK);
    tl.vpairs.resize(static_cast<size_t>(KEYS / 2) * D);
    tl.ppairs.resize(static_cast<size_t>(KEYS / 2) * ROW_CHUNK);
    const float unscale = 1.f / s.scale;
    for (int c = 0; c < chunks; ++c) {
      const float* qc = &tl.qt[static_cast<size_t>(c) * D * ROW_CHUNK];
      for (int j = 0; j < D / 2; ++j)
        for (int r = 0; r < ROW_CHUNK; ++r) {
          const uint32_t first = narrow<bf16_t>(qc[(2 * j) * ROW_CHUNK + r] * unscale);
          const uint32_t second = narrow<bf16_t>(qc[(2 * j + 1) * ROW_CHUNK + r] * unscale);
          tl.qpairs[(static_cast<size_t>(c) * (D / 2) + j) * ROW_CHUNK + r] = first | second << 16;
        }
    }
  } else if (bf16_cache) {
    tl.keys.resize(static_cast<size_t>(KEYS) * D);
    tl.values.resize(static_cast<size_t>(KEYS) * D);
  }
  // the cache rows of `count` keys from position `first` on, found once per key: a block's rows are
  // found while the block before it is worked on, for the read-ahead, and then read from here
  const T* k_rows[KEYS];
  const T* v_rows[KEYS];
  auto find_rows = [&](int64_t first, int count) {
    for (int t = 0; t < count; ++t) {
      const int64_t slot = slot_of(table, first + t, key_start, BS);
      k_rows[t] = k_cache + slot * token_stride + head_offset;
      v_rows[t] = v_cache + slot * token_stride + head_offset;
    }
  };
  find_rows(begin, static_cast<int>(std::min<int64_t>(KEYS, end - begin)));
  for (int64_t j0 = begin; j0 < end; j0 += KEYS) {
    const int n = static_cast<int>(std::min<int64_t>(KEYS, end - j0));
#if ATTENTION_BF16_DOT
    if constexpr (bf16_cache) {
      if (pairs) {
        for (int t = 0; t < n; ++t) key16[t] = k_rows[t];
        for (int t = 0; 2 * t < n; ++t)
          value_pairs(v_rows[2 * t], 2 * t + 1 < n ? v_rows[2 * t + 1] : nullptr, D, &tl.vpairs[static_cast<size_t>(t) * D]);
      }
    }
#endif
    for (int t = 0; t < n && !pairs; ++t) {
      const T* kr = k_rows[t];
      const T* vr = v_rows[t];
      if constexpr (std::is_same<T, float>::value) {
        key[t] = kr;
        value[t] = vr;
      } else {
        float* kw = &tl.keys[static_cast<size_t>(t) * D];
        float* vw = &tl.values[static_cast<size_t>(t) * D];
#pragma omp simd
        for (int d = 0; d < D; ++d) {
          kw[d] = load(kr, d);
          vw[d] = load(vr, d);
        }
        key[t] = kw;
        value[t] = vw;
      }
    }
    const int next_n = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(KEYS, end - j0 - n)));
    find_rows(j0 + n, next_n);
    if (read_ahead)
      for (int t = 0; t < next_n; ++t) tl.ahead.set(t, k_rows[t], v_rows[t]);
    // a step per score and value pass of each chunk (FOR_FANS: about n / FAN + D / FAN of them)
    tl.ahead.start(read_ahead ? next_n : 0, static_cast<int>(D * sizeof(T)), chunks * ((n + D) / FAN + 2));
    const int32_t offset = static_cast<int32_t>(j0 - begin);
    for (int c = 0; c < chunks; ++c) {
      const bool two = rows - c * ROW_CHUNK > LANES;
      if (pairs)
        two ? attend_chunk<2, true>(tl, c, D, n, offset, key, value, key16, s)
            : attend_chunk<1, true>(tl, c, D, n, offset, key, value, key16, s);
      else
        two ? attend_chunk<2, false>(tl, c, D, n, offset, key, value, key16, s)
            : attend_chunk<1, false>(tl, c, D, n, offset, key, value, key16, s);
    }
    tl.ahead.finish();
  }
}

#undef FOR_FANS

}  // namespace
