// Decode attention over the paged KV cache on CPU, reading keys and values in place.
//
// Meaning: kernels/shared_prefix_attention.py's shared_prefix_decode_reference (a step's decode rows,
// some in groups that share a prefix; with no groups, kernels/paged_attention.py's reference for decode
// rows). Built at first use by kernels/cpu_decode.py, which holds the launcher; tests compare the two.
//
// Work: one task per group tile (up to TILE_QUERIES query vectors of its members) and one per row
// without a group. A task keeps every query's online-softmax state (running max, sum, output) in
// float32; the group's prefix keys are read once for all the tile's queries, then each member's own
// keys. Keys are visited in chunks of at most CHUNK positions inside one block; a chunk's scores are
// computed for all queries, then one rescale per query, then the values. Masked keys (before a
// query's sliding window) score MASKED, a finite stand-in for -inf: the file is built with
// -ffast-math (vectorised exp), under which infinities are not allowed.
#include "attention_tiles.h"
#include "threads.h"

namespace {

constexpr int CHUNK = 64;
constexpr int TILE_QUERIES = 256;

// The online-softmax state of n query vectors (each a query head of one row).
struct State {
  int n = 0, head_dim = 0;
  std::vector<float> q, acc, max, sum, scores, kv, values;  // kv: one token's keys; values: one chunk's
  std::vector<int> kv_head;        // [n] the KV head each query reads
  std::vector<int64_t> visible;    // [n] first key position each query sees
  void reset(int n_, int d) {
    n = n_; head_dim = d;
    q.resize(static_cast<size_t>(n) * d); acc.assign(static_cast<size_t>(n) * d, 0.f);
    max.assign(n, MASKED); sum.assign(n, 0.f); scores.resize(static_cast<size_t>(n) * CHUNK);
    kv_head.resize(n); visible.resize(n);
  }
};

// Asks the memory system for `count` elements of keys and values from k and v (a block's tokens, at
// random places of the cache: the hardware prefetcher does not see the next one coming).
template <typename T>
inline void prefetch_tokens(const T* k, const T* v, int64_t count) {
  const int64_t bytes = count * static_cast<int64_t>(sizeof(T));
  const char* kc = reinterpret_cast<const char*>(k);
  const char* vc = reinterpret_cast<const char*>(v);
  for (int64_t b = 0; b < bytes; b += 64) {
    __builtin_prefetch(kc + b);
    __builtin_prefetch(vc + b);
  }
}

// Attend queries [first, last) of `st` to key positions [begin, end) of one block table (column 0 =
// position table_start * block_size).
template <typename T>
void attend_span(State& st, int first, int last, const T* k_cache, const T* v_cache, const int32_t* table,
                 int64_t table_start, int64_t begin, int64_t end, const Shape& s) {
  const int D = s.head_dim, BS = s.block_size;
  const int64_t token_stride = static_cast<int64_t>(s.kv_heads) * D;
  std::vector<float>& kv = st.kv;
  kv.resize(static_cast<size_t>(token_stride));
  st.values.resize(static_cast<size_t>(token_stride) * CHUNK);
  for (int64_t pos = begin; pos < end;) {
    const int64_t block = table[pos / BS - table_start];
    const int offset = static_cast<int>(pos % BS);
    const int n = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(BS - offset), CHUNK, end - pos}));
    const T* kb = k_cache + (block * BS + offset) * token_stride;
    const T* vb = v_cache + (block * BS + offset) * token_stride;
    if (pos + n < end) {  // the next chunk's keys and values, requested now: they sit in another block
      const int64_t next = table[(pos + n) / BS - table_start];
      prefetch_tokens(k_cache + next * BS * token_stride, v_cache + next * BS * token_stride,
                      std::min<int64_t>(BS, end - (pos + n)) * token_stride);
    }
    for (int t = 0; t < n; ++t) {
      const T* row = kb + t * token_stride;
#pragma omp simd
      for (int64_t i = 0; i < token_stride; ++i) kv[i] = load(row, i);
      for (int j = first; j < last; ++j) {
        const float* qj = &st.q[static_cast<size_t>(j) * D];
        const float* kj = &kv[static_cast<size_t>(st.kv_head[j]) * D];
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int d = 0; d < D; ++d) dot += qj[d] * kj[d];
        if (s.softcap > 0.f) dot = s.softcap * std::tanh(dot / s.softcap);
        st.scores[static_cast<size_t>(j) * CHUNK + t] = pos + t < st.visible[j] ? MASKED : dot;
      }
    }
    for (int j = first; j < last; ++j) {
      float* sj = &st.scores[static_cast<size_t>(j) * CHUNK];
      float top = st.max[j];
      for (int t = 0; t < n; ++t) top = std::max(top, sj[t]);
      float total = 0.f;
#pragma omp simd reduction(+ : total)
      for (int t = 0; t < n; ++t) {
        sj[t] = sj[t] <= MASKED ? 0.f : std::exp(sj[t] - top);
        total += sj[t];
      }
      advance_softmax(st.max[j], st.sum[j], &st.acc[static_cast<size_t>(j) * D], D, top, total);
    }
    // the chunk's values in float32, then each query's output accumulated in registers, LANES dims at a
    // time, over the chunk's tokens (one load per value, none of the output, per token)
    float* values = st.values.data();
    const int64_t count = n * token_stride;  // the chunk's tokens are consecutive slots of one block
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) values[i] = load(vb, i);
    for (int j = first; j < last; ++j) {
      const float* sj = &st.scores[static_cast<size_t>(j) * CHUNK];
      float* aj = &st.acc[static_cast<size_t>(j) * D];
      const float* vj = values + static_cast<int64_t>(st.kv_head[j]) * D;
      int d0 = 0;
      for (; d0 + LANES <= D; d0 += LANES) {
        Lanes a;
        std::memcpy(&a, aj + d0, sizeof a);
        for (int t = 0; t < n; ++t) {
          Lanes v;
          std::memcpy(&v, vj + t * token_stride + d0, sizeof v);
          a += sj[t] * v;
        }
        std::memcpy(aj + d0, &a, sizeof a);
      }
      for (; d0 < D; ++d0) {
        float a = aj[d0];
        for (int t = 0; t < n; ++t) a += sj[t] * vj[t * token_stride + d0];
        aj[d0] = a;
      }
    }
    pos += n;
  }
}


struct Batch {  // kernels/shared_prefix_attention.py's SharedPrefixBatch, as raw pointers
  int64_t rows;
  const int64_t* query_index;   // [rows]
  const int32_t* tables;        // [rows, table_stride]
  int64_t table_stride;
  const int32_t* table_starts;  // [rows]
  const int32_t* context_lens;  // [rows]
  const int32_t* suffix_starts; // [rows]
  int64_t groups;
  const int32_t* group_row_starts;  // [groups + 1]
  const int32_t* prefix_tables;     // [groups, prefix_table_stride]
  int64_t prefix_table_stride;
  const int32_t* prefix_lens;       // [groups]
};

struct Task {
  int64_t group;  // -1: a row without a group
  int64_t first_row, last_row;
};

// The group's prefix part: every query vector of the tile (all its members' query heads) over the prefix
// keys [begin, end), one KV head at a time through attention_tiles.h's blocked loop, whose state is
// then the queries' state in `st` (fresh before: the prefix part comes first).
template <typename T>
void attend_prefix(State& st, const Task& task, const Batch& b, const T* k_cache, const T* v_cache,
                   const int32_t* prefix_table, int64_t begin, int64_t end, const Shape& s) {
  thread_local Tile tl;
  const int H = s.heads, D = s.head_dim, per_kv = s.heads / s.kv_heads;
  const int rows = static_cast<int>(task.last_row - task.first_row);
  const size_t bytes = sizeof(float) * D;
  for (int kh = 0; kh < s.kv_heads; ++kh) {
    tl.reset(rows * per_kv, D);
    for (int r = 0; r < rows; ++r)
      for (int g = 0; g < per_kv; ++g) {
        const int i = r * per_kv + g, j = r * H + kh * per_kv + g;
        std::memcpy(&tl.q[static_cast<size_t>(i) * D], &st.q[static_cast<size_t>(j) * D], bytes);
        tl.pos[i] = b.context_lens[task.first_row + r] - 1;  // a decode row's query is its last token
      }
    attend_keys<T>(tl, rows * per_kv, k_cache, v_cache, prefix_table, 0, begin, end, kh, s);
    for (int r = 0; r < rows; ++r)
      for (int g = 0; g < per_kv; ++g) {
        const int i = r * per_kv + g, j = r * H + kh * per_kv + g;
        std::memcpy(&st.acc[static_cast<size_t>(j) * D], &tl.acc[static_cast<size_t>(i) * D], bytes);
        st.max[j] = tl.max[i];
        st.sum[j] = tl.sum[i];
      }
  }
}

template <typename T>
void run_task(const Task& task, const Batch& b, const T* q, int64_t q_row_stride, const T* k_cache,
              const T* v_cache, T* out, int64_t out_row_stride, const Shape& s) {
  thread_local State st;
  const int H = s.heads, D = s.head_dim, per_kv = s.heads / s.kv_heads;
  const int rows = static_cast<int>(task.last_row - task.first_row);
  st.reset(rows * H, D);
  int64_t earliest = INT64_MAX;
  for (int r = 0; r < rows; ++r) {
    const int64_t row = task.first_row + r;
    const T* qr = q + b.query_index[row] * q_row_stride;
    const int64_t ctx = b.context_lens[row];
    const int64_t visible = s.window > 0 ? std::max<int64_t>(0, ctx - s.window) : 0;
    earliest = std::min(earliest, visible);
    for (int h = 0; h < H; ++h) {
      const int j = r * H + h;
      for (int d = 0; d < D; ++d) st.q[static_cast<size_t>(j) * D + d] = load(qr, static_cast<int64_t>(h) * D + d) * s.scale;
      st.kv_head[j] = h / per_kv;
      st.visible[j] = visible;
    }
  }
  if (task.group >= 0) {
    const int64_t prefix = b.prefix_lens[task.group];
    if (earliest < prefix)
      attend_prefix<T>(st, task, b, k_cache, v_cache, b.prefix_tables + task.group * b.prefix_table_stride, earliest,
                       prefix, s);
  }
  for (int r = 0; r < rows; ++r) {
    const int64_t row = task.first_row + r;
    const int64_t begin = std::max<int64_t>(b.suffix_starts[row], st.visible[static_cast<size_t>(r) * H]);
    attend_span<T>(st, r * H, (r + 1) * H, k_cache, v_cache, b.tables + row * b.table_stride, b.table_starts[row],
                   begin, b.context_lens[row], s);
    T* orow = out + b.query_index[row] * out_row_stride;
    for (int h = 0; h < H; ++h) {
      const int j = r * H + h;
      const float inv = st.sum[j] > 0.f ? 1.f / st.sum[j] : 0.f;
      for (int d = 0; d < D; ++d) store(orow, static_cast<int64_t>(h) * D + d, st.acc[static_cast<size_t>(j) * D + d] * inv);
    }
  }
}

template <typename T>
void decode_attention(const Batch& b, const T* q, int64_t q_row_stride, const T* k_cache, const T* v_cache, T* out,
                      int64_t out_row_stride, const Shape& s) {
  std::vector<Task> tasks;
  const int64_t tile = std::max(1, TILE_QUERIES / s.heads);
  for (int64_t g = 0; g < b.groups; ++g)
    for (int64_t r = b.group_row_starts[g]; r < b.group_row_starts[g + 1]; r += tile)
      tasks.push_back({g, r, std::min<int64_t>(r + tile, b.group_row_starts[g + 1])});
  for (int64_t r = b.groups ? b.group_row_starts[b.groups] : 0; r < b.rows; ++r) tasks.push_back({-1, r, r + 1});
  const int64_t n = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(library_threads())
  for (int64_t i = 0; i < n; ++i) run_task<T>(tasks[i], b, q, q_row_stride, k_cache, v_cache, out, out_row_stride, s);
}

}  // namespace

#define DECODE_ENTRY(NAME, T)                                                                                     \
  extern "C" void NAME(const T* q, int64_t q_row_stride, const T* k_cache, const T* v_cache, T* out,              \
                       int64_t out_row_stride, int64_t rows, const int64_t* query_index, const int32_t* tables,   \
                       int64_t table_stride, const int32_t* table_starts, const int32_t* context_lens,            \
                       const int32_t* suffix_starts, int64_t groups, const int32_t* group_row_starts,             \
                       const int32_t* prefix_tables, int64_t prefix_table_stride, const int32_t* prefix_lens,     \
                       int heads, int kv_heads, int head_dim, int block_size, float scale, float softcap,         \
                       int64_t window) {                                                                          \
    const Batch b{rows, query_index, tables, table_stride, table_starts, context_lens, suffix_starts, groups,      \
                  group_row_starts, prefix_tables, prefix_table_stride, prefix_lens};                             \
    const Shape s{heads, kv_heads, head_dim, block_size, scale, softcap, window};                                 \
    decode_attention<T>(b, q, q_row_stride, k_cache, v_cache, out, out_row_stride, s);                            \
  }

DECODE_ENTRY(decode_attention_f32, float)
DECODE_ENTRY(decode_attention_bf16, bf16_t)
