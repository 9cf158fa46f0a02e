// Prefill attention over the paged KV cache on CPU: each span's query tokens attend causally (and
// within a sliding window) to its keys, read in place from the cache.
//
// Meaning: kernels/paged_attention.py's paged_attention_reference for its prefill spans (a sequence's
// chunk of q_len query tokens, the last q_len positions of its ctx_len keys). Built at first use by
// kernels/cpu_decode.py (one library with decode_attention.cpp); kernels/cpu_prefill.py holds the
// launcher; tests compare the two.
//
// Work: one task per (span, KV head, tile of up to TILE_TOKENS query tokens); a tile's rows are its
// tokens x the KV head's query heads, so each key is read once for all of them. Keys go in blocks of
// 16: a block's keys are transposed into [head_dim][16] (float32), scores for ROWS rows at a time are
// 16-lane vectors accumulated over head_dim (each key vector load serves ROWS rows), then one online-
// softmax update per row, then the values: per 16 output dims, ROWS rows' accumulators over the block's
// keys (each value load serves ROWS rows). Float32 state whatever the cache's type. Masked keys score
// MASKED, a finite stand-in for -inf: the file is built with -ffast-math (vectorised exp), under which
// infinities are not allowed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef uint16_t bf16_t;
constexpr int LANES = 16;        // floats per vector
constexpr int KEYS = 64;         // keys per block: LANES-wide score vectors, one softmax update
constexpr int ROWS = 8;          // rows whose scores / outputs are accumulated together
constexpr int TILE_TOKENS = 32;  // query tokens per task
constexpr float MASKED = -1.0e30f;
typedef float Lanes __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t Ints __attribute__((vector_size(LANES * sizeof(int32_t))));
constexpr int VECS = KEYS / LANES;

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const bf16_t* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, int64_t i, float x) { p[i] = x; }
inline void store(bf16_t* p, int64_t i, float x) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  p[i] = static_cast<bf16_t>(u >> 16);
}
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

struct Span {
  int64_t q_start, q_len, ctx_len, key_start;  // key_start: position of table column 0's first key
  const int32_t* table;
};

struct Task {
  int64_t span, kv_head, first_token, last_token, keys;  // keys: how many it reads (for ordering)
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
  for (int d0 = 0; d0 < D; d0 += LANES) {
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
  const float rescale = std::exp(tl.max[r] - top);
  tl.sum[r] = tl.sum[r] * rescale + sum;
  tl.max[r] = top;
  if (rescale != 1.f) {
    float* ar = &tl.acc[static_cast<size_t>(r) * D];
#pragma omp simd
    for (int d = 0; d < D; ++d) ar[d] *= rescale;
  }
}

template <typename F>
inline void for_row_groups(int rows, F&& f) {
  int r = 0;
  for (; r + ROWS <= rows; r += ROWS) f(r, ROWS);
  for (; r < rows; ++r) f(r, 1);
}

template <typename T>
void run_task(const Task& task, const Span& sp, const T* q, int64_t q_row_stride, const T* k_cache, const T* v_cache,
              T* out, int64_t out_row_stride, const Shape& s) {
  thread_local Tile tl;
  const int D = s.head_dim, BS = s.block_size, per_kv = s.heads / s.kv_heads;
  const int tokens = static_cast<int>(task.last_token - task.first_token);
  const int rows = tokens * per_kv;  // row = token * per_kv + (query head - first query head of the KV head)
  tl.reset(rows, D);
  const int64_t first_pos = sp.ctx_len - sp.q_len + task.first_token;
  for (int t = 0; t < tokens; ++t) {
    const T* qt = q + (sp.q_start + task.first_token + t) * q_row_stride;
    for (int g = 0; g < per_kv; ++g) {
      const int r = t * per_kv + g;
      const int64_t head = task.kv_head * per_kv + g;
      for (int d = 0; d < D; ++d) tl.q[static_cast<size_t>(r) * D + d] = load(qt, head * D + d) * s.scale;
      tl.pos[r] = first_pos + t;
    }
  }
  const int64_t last_pos = first_pos + tokens - 1;
  int64_t begin = sp.key_start;
  if (s.window > 0) begin = std::max(begin, first_pos - s.window + 1);
  const int64_t token_stride = static_cast<int64_t>(s.kv_heads) * D;
  const int64_t head_offset = task.kv_head * D;
  for (int64_t j0 = begin; j0 <= last_pos; j0 += KEYS) {
    const int n = static_cast<int>(std::min<int64_t>(KEYS, last_pos + 1 - j0));
    // the block's keys transposed to [D][KEYS] and its values as [KEYS][D], float32, unused lanes zero
    const int vecs = (n + LANES - 1) / LANES;
    for (int t = 0; t < vecs * LANES; ++t) {
      if (t < n) {
        const int64_t p = j0 + t - sp.key_start;
        const int64_t slot = static_cast<int64_t>(sp.table[p / BS]) * BS + p % BS;
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
  for (int r = 0; r < rows; ++r) {
    const int t = r / per_kv, g = r % per_kv;
    T* orow = out + (sp.q_start + task.first_token + t) * out_row_stride + (task.kv_head * per_kv + g) * D;
    const float inv = tl.sum[r] > 0.f ? 1.f / tl.sum[r] : 0.f;
    for (int d = 0; d < D; ++d) store(orow, d, tl.acc[static_cast<size_t>(r) * D + d] * inv);
  }
}

template <typename T>
void prefill_attention(const std::vector<Span>& spans, const T* q, int64_t q_row_stride, const T* k_cache,
                       const T* v_cache, T* out, int64_t out_row_stride, const Shape& s) {
  std::vector<Task> tasks;
  for (int64_t i = 0; i < static_cast<int64_t>(spans.size()); ++i) {
    const Span& sp = spans[i];
    for (int64_t first = 0; first < sp.q_len; first += TILE_TOKENS) {
      const int64_t last = std::min<int64_t>(first + TILE_TOKENS, sp.q_len);
      const int64_t last_pos = sp.ctx_len - sp.q_len + last - 1;
      int64_t begin = sp.key_start;
      if (s.window > 0) begin = std::max(begin, sp.ctx_len - sp.q_len + first - s.window + 1);
      for (int64_t h = 0; h < s.kv_heads; ++h) tasks.push_back({i, h, first, last, last_pos + 1 - begin});
    }
  }
  // longest first: the causal tiles at a span's end read the most keys
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.keys > b.keys; });
  const int64_t n = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i)
    run_task<T>(tasks[i], spans[tasks[i].span], q, q_row_stride, k_cache, v_cache, out, out_row_stride, s);
}

}  // namespace

// span_info: [spans, 4] int64 (query start row, query length, context length, key start); tables:
// [spans, table_stride] int32, column 0 holding the block of position key_start (a multiple of block_size).
#define PREFILL_ENTRY(NAME, T)                                                                                    \
  extern "C" void NAME(const T* q, int64_t q_row_stride, const T* k_cache, const T* v_cache, T* out,              \
                       int64_t out_row_stride, int64_t num_spans, const int64_t* span_info, const int32_t* tables, \
                       int64_t table_stride, int heads, int kv_heads, int head_dim, int block_size, float scale,  \
                       float softcap, int64_t window) {                                                           \
    std::vector<Span> spans(static_cast<size_t>(num_spans));                                                      \
    for (int64_t i = 0; i < num_spans; ++i)                                                                       \
      spans[i] = {span_info[4 * i], span_info[4 * i + 1], span_info[4 * i + 2], span_info[4 * i + 3],             \
                  tables + i * table_stride};                                                                     \
    const Shape s{heads, kv_heads, head_dim, block_size, scale, softcap, window};                                 \
    prefill_attention<T>(spans, q, q_row_stride, k_cache, v_cache, out, out_row_stride, s);                       \
  }

PREFILL_ENTRY(prefill_attention_f32, float)
PREFILL_ENTRY(prefill_attention_bf16, bf16_t)
