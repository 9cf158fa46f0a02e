// Blocked attention of a tile of query rows (one KV head's) to a range of keys of the paged KV cache:
// the part the CPU prefill kernel (prefill_attention.cpp) and the decode kernel's groups
// (decode_attention.cpp) share. Included by both; everything here is inline or in an anonymous namespace.
//
// A tile holds any number of rows: query vectors (float32, already scaled), each with its position
// (it sees keys up to its own position, within the sliding window) and its online-softmax state
// (running max, sum, unnormalised output). Keys go in blocks of KEYS: a block's keys are transposed into
// [head_dim][KEYS] (float32), scores for ROWS rows at a time are LANES-wide vectors accumulated over
// head_dim (each key vector load serves ROWS rows), then one online-softmax update per row, then the
// values: per LANES output dims, ROWS rows' accumulators over the block's keys (each value load serves
// ROWS rows). Masked keys score MASKED, a finite stand-in for -inf: the library is built with
// -ffast-math (vectorised exp), under which infinities are not allowed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"

namespace {

constexpr int LANES = 16;        // floats per vector
constexpr int KEYS = 64;         // keys per block: LANES-wide score vectors, one softmax update
constexpr int ROWS = 8;          // rows whose scores / outputs are accumulated together
constexpr float MASKED = -1.0e30f;
typedef float Lanes __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t Ints __attribute__((vector_size(LANES * sizeof(int32_t))));
constexpr int VECS = KEYS / LANES;

inline Lanes lanes_at(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

struct Shape {
  int heads, kv_heads, head_dim, block_size;
  float scale, softcap;
  int64_t window;  // 0: none
};

// A task's working memory, reused across tasks of a thread.
struct Tile {
  std::vector<float> q, acc, max, sum, scores, kt, values;
  std::vector<int64_t> pos;  // [rows] the query's position
  void reset(int rows, int d) {
    q.resize(static_cast<size_t>(rows) * d);
    acc.assign(static_cast<size_t>(rows) * d, 0.f);
    max.assign(rows, MASKED);
    sum.assign(rows, 0.f);
    scores.resize(static_cast<size_t>(rows) * KEYS);
    kt.resize(static_cast<size_t>(d) * KEYS);
    values.resize(static_cast<size_t>(KEYS) * d);
    pos.resize(rows);
  }
};

// Scores of rows [r0, r0 + N) against the block's keys (kt: [D][KEYS]) into tile.scores.
template <int N>
inline void block_scores(Tile& tl, int r0, int D, int vecs) {
  const float* q = tl.q.data() + static_cast<size_t>(r0) * D;
  for (int c = 0; c < vecs; ++c) {
    Lanes s[N];
    for (int i = 0; i < N; ++i) s[i] = Lanes{};
    const float* kt = tl.kt.data() + c * LANES;
    for (int d = 0; d < D; ++d) {
      const Lanes k = lanes_at(kt + d * KEYS);
      for (int i = 0; i < N; ++i) s[i] += q[i * D + d] * k;
    }
    for (int i = 0; i < N; ++i)
      std::memcpy(&tl.scores[static_cast<size_t>(r0 + i) * KEYS + c * LANES], &s[i], sizeof(Lanes));
  }
}

// Outputs of rows [r0, r0 + N) += their block weights (tile.scores, now probabilities) x values.
template <int N>
inline void block_values(Tile& tl, int r0, int D, int n) {
  const float* p = tl.scores.data() + static_cast<size_t>(r0) * KEYS;
  const int full = D - D % LANES;
  for (int d = full; d < D; ++d)  // head sizes that are no multiple of LANES: the last dims one at a time
    for (int i = 0; i < N; ++i) {
      float a = tl.acc[static_cast<size_t>(r0 + i) * D + d];
      for (int t = 0; t < n; ++t) a += p[i * KEYS + t] * tl.values[static_cast<size_t>(t) * D + d];
      tl.acc[static_cast<size_t>(r0 + i) * D + d] = a;
    }
  for (int d0 = 0; d0 < full; d0 += LANES) {
    Lanes a[N];
    for (int i = 0; i < N; ++i) a[i] = lanes_at(&tl.acc[static_cast<size_t>(r0 + i) * D + d0]);
    for (int t = 0; t < n; ++t) {
      const Lanes v = lanes_at(&tl.values[static_cast<size_t>(t) * D + d0]);
      for (int i = 0; i < N; ++i) a[i] += p[i * KEYS + t] * v;
    }
    for (int i = 0; i < N; ++i) std::memcpy(&tl.acc[static_cast<size_t>(r0 + i) * D + d0], &a[i], sizeof(Lanes));
  }
}

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

// One online-softmax step of row r over the block's scores (keys j0 .. j0 + n - 1): masks the keys the
// row does not see, turns its scores into weights, rescales its sum and output.
inline void update_softmax(Tile& tl, int r, int D, int64_t j0, int n, const Shape& s) {
  float* sr = &tl.scores[static_cast<size_t>(r) * KEYS];
  const int vecs = (n + LANES - 1) / LANES;
  if (s.softcap > 0.f)
    for (int t = 0; t < n; ++t) sr[t] = s.softcap * std::tanh(sr[t] / s.softcap);
  const int64_t qpos = tl.pos[r];
  const int64_t last = std::min<int64_t>(n - 1, qpos - j0);  // causal: keys up to the query's own
  const int64_t first = s.window > 0 ? std::max<int64_t>(0, qpos - s.window + 1 - j0) : 0;
  Lanes x[VECS];
  for (int c = 0; c < vecs; ++c) x[c] = lanes_at(sr + c * LANES);
  if (last < vecs * LANES - 1 || first > 0) {
    const Ints lane = Ints{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const int lo = static_cast<int>(std::min<int64_t>(first, KEYS)), hi = static_cast<int>(std::max<int64_t>(last, -1));
    for (int c = 0; c < vecs; ++c) {
      const Ints key = lane + c * LANES;
      x[c] = (key >= lo) & (key <= hi) ? x[c] : Lanes{} + MASKED;
    }
  }
  Lanes m = x[0];
  for (int c = 1; c < vecs; ++c) m = m > x[c] ? m : x[c];
  float top = tl.max[r];
  for (int t = 0; t < LANES; ++t) top = std::max(top, m[t]);
  if (top <= MASKED) {  // no key of this block is visible to the row
    std::memset(sr, 0, sizeof(float) * KEYS);
    return;
  }
  Lanes total = Lanes{};
  for (int c = 0; c < vecs; ++c) {
    const Lanes p = x[c] <= MASKED ? Lanes{} : exp_lanes(x[c] - top);
    std::memcpy(sr + c * LANES, &p, sizeof p);
    total += p;
  }
  float sum = 0.f;
  for (int t = 0; t < LANES; ++t) sum += total[t];
  advance_softmax(tl.max[r], tl.sum[r], &tl.acc[static_cast<size_t>(r) * D], D, top, sum);
}

template <typename F>
inline void for_row_groups(int rows, F&& f) {
  int r = 0;
  for (; r + ROWS <= rows; r += ROWS) f(r, ROWS);
  for (; r < rows; ++r) f(r, 1);
}

// Rows [0, rows) of `tl` attend to key positions [begin, end) of KV head `kv_head`, read through `table`
// (column 0 = the block of position key_start). Rows whose position or window excludes a key skip it.
template <typename T>
void attend_keys(Tile& tl, int rows, const T* k_cache, const T* v_cache, const int32_t* table, int64_t key_start,
                 int64_t begin, int64_t end, int64_t kv_head, const Shape& s) {
  const int D = s.head_dim, BS = s.block_size;
  const int64_t token_stride = static_cast<int64_t>(s.kv_heads) * D;
  const int64_t head_offset = kv_head * D;
  for (int64_t j0 = begin; j0 < end; j0 += KEYS) {
    const int n = static_cast<int>(std::min<int64_t>(KEYS, end - j0));
    // the block's keys transposed to [D][KEYS] and its values as [KEYS][D], float32, unused lanes zero
    const int vecs = (n + LANES - 1) / LANES;
    for (int t = 0; t < vecs * LANES; ++t) {
      if (t < n) {
        const int64_t p = j0 + t - key_start;
        const int64_t slot = static_cast<int64_t>(table[p / BS]) * BS + p % BS;
        const T* kr = k_cache + slot * token_stride + head_offset;
        const T* vr = v_cache + slot * token_stride + head_offset;
        for (int d = 0; d < D; ++d) tl.kt[static_cast<size_t>(d) * KEYS + t] = load(kr, d);
#pragma omp simd
        for (int d = 0; d < D; ++d) tl.values[static_cast<size_t>(t) * D + d] = load(vr, d);
      } else {
        for (int d = 0; d < D; ++d) tl.kt[static_cast<size_t>(d) * KEYS + t] = 0.f;
        std::memset(&tl.values[static_cast<size_t>(t) * D], 0, sizeof(float) * D);
      }
    }
    for_row_groups(rows, [&](int r0, int g) { g == ROWS ? block_scores<ROWS>(tl, r0, D, vecs) : block_scores<1>(tl, r0, D, vecs); });
    for (int r = 0; r < rows; ++r) update_softmax(tl, r, D, j0, n, s);
    for_row_groups(rows, [&](int r0, int g) { g == ROWS ? block_values<ROWS>(tl, r0, D, n) : block_values<1>(tl, r0, D, n); });
  }
}

}  // namespace
