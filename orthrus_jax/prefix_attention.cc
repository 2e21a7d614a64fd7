// Attention of a few query rows over the live prefix of a KV cache, on the CPU (an XLA
// FFI handler; orthrus_jax/cpu_attention.py builds and registers it).
//
// q [N, R, D], k and v [M, S, D] with M >= N (N = batch * kv heads; groups past N are
// not read), limit [N, R] int32: row r of group n sees keys [0, limit[n, r]). Returns the flash-attention partials
// o [N, R, D] = sum_s exp(score - m) v_s, m [N, R] (the largest score, -1e30 where
// nothing is visible) and l [N, R] = sum_s exp(score - m), score = scale * q . k_s.
// Keys past a group's largest limit are never read. Work is split into chunks of
// keys, spread over XLA's intra-op thread pool, and merged. Within a chunk: scores 16
// keys at a time (for fewer than 8 rows, a dot product per key and one reduction of the
// 16; for more, a product with the 16 keys transposed), a vectorised exp, then the
// weighted sum of V, whose rows are prefetched into L2 while the scores are computed.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kNeg = -1e30f;
constexpr int64_t kChunk = 256;  // keys per task
// Query rows from which scores are computed as a product with keys transposed 16 at a time.
constexpr int64_t kProductRows = 8;

// exp(x) for x <= 0 (scores less their maximum): range reduction to [-ln2/2, ln2/2], a
// degree-6 polynomial, scaled by 2^n; relative error about 1e-7.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// The sums of 16 vectors: element i of the result is the sum of a[i]'s 16 floats.
inline __m512 Sum16(const __m512* a) {
  __m512 y[4];
  for (int g = 0; g < 4; ++g) {
    const __m512* b = a + 4 * g;
    const __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
    const __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
    // Per 128-bit lane: [sum of b[0]'s lane, b[1]'s, b[2]'s, b[3]'s].
    y[g] = _mm512_add_ps(_mm512_shuffle_ps(x01, x23, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x01, x23, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88),
                                   _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88),
                                   _mm512_shuffle_f32x4(y[2], y[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

// Transposes a 16 x 16 block: out[c][r] = in[r][c] (rows 16 floats, in and out strides
// in floats).
inline void Transpose16(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * in_stride);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // r[4a + b] holds, in 128-bit lane L, column 4L + b of rows 4a..4a+3 (source lane L).
  for (int b = 0; b < 4; ++b) {
    const __m512 x0 = _mm512_shuffle_f32x4(r[b], r[4 + b], 0x88);
    const __m512 x1 = _mm512_shuffle_f32x4(r[b], r[4 + b], 0xDD);
    const __m512 x2 = _mm512_shuffle_f32x4(r[8 + b], r[12 + b], 0x88);
    const __m512 x3 = _mm512_shuffle_f32x4(r[8 + b], r[12 + b], 0xDD);
    _mm512_storeu_ps(out + (0 + b) * out_stride, _mm512_shuffle_f32x4(x0, x2, 0x88));
    _mm512_storeu_ps(out + (8 + b) * out_stride, _mm512_shuffle_f32x4(x0, x2, 0xDD));
    _mm512_storeu_ps(out + (4 + b) * out_stride, _mm512_shuffle_f32x4(x1, x3, 0x88));
    _mm512_storeu_ps(out + (12 + b) * out_stride, _mm512_shuffle_f32x4(x1, x3, 0xDD));
  }
}

// Partials of rows [0, R) over keys [s0, s1) of one group: m, l, o per row. D is a
// multiple of 16 (AVX-512 vectors of 16 floats), at most 16 vectors. scores holds
// R * (s1 - s0 rounded up to 16) floats.
template <int DV>
void ChunkV(const float* q, const float* k, const float* v, const int32_t* limit,
            int64_t R, int64_t s0, int64_t s1, int64_t S, float scale, float* m, float* l,
            float* o, float* scores) {
  constexpr int64_t D = DV * 16;
  const int64_t n = s1 - s0;
  int64_t live = 0;  // keys any row of the chunk sees
  for (int64_t r = 0; r < R; ++r)
    live = std::max(live, std::min<int64_t>(std::max<int64_t>(limit[r] - s0, 0), n));
  const int64_t padded = (live + 15) / 16 * 16, stride = (n + 15) / 16 * 16;
  const __m512 vscale = _mm512_set1_ps(scale);
  // V's rows are asked for (into L2) now, to stream in while the scores are computed.
  for (int64_t j = 0; j < live; ++j)
    for (int64_t c = 0; c < D; c += 16) _mm_prefetch((const char*)(v + (s0 + j) * D + c), _MM_HINT_T1);
  if (R >= kProductRows) {  // scores as a product with 16 keys at a time transposed
    alignas(64) float kt[D * 16];
    alignas(64) float pad[16 * D];
    for (int64_t j0 = 0; j0 < padded; j0 += 16) {
      const float* kb = k + (s0 + j0) * D;
      if (s0 + j0 + 16 > S) {  // the cache's last keys: copy, zero-padded
        const int64_t nb = S - s0 - j0;
        std::fill(pad, pad + 16 * D, 0.f);
        std::copy(kb, kb + nb * D, pad);
        kb = pad;
      }
      if (s0 + j0 + 48 <= S)  // K two blocks ahead, into L1
        for (int64_t c = 0; c < 16 * D; c += 16)
          _mm_prefetch((const char*)(k + (s0 + j0 + 32) * D + c), _MM_HINT_T0);
      for (int t = 0; t < DV; ++t) Transpose16(kb + 16 * t, D, kt + 16 * t * 16, 16);
      constexpr int64_t RB = 8;
      for (int64_t r0 = 0; r0 < R; r0 += RB) {
        const int64_t rb = std::min(RB, R - r0);
        __m512 acc[RB];
        for (int64_t i = 0; i < RB; ++i) acc[i] = _mm512_setzero_ps();
        const float* qb = q + r0 * D;
        if (rb == RB) {
          for (int64_t d = 0; d < D; ++d) {
            const __m512 kv = _mm512_load_ps(kt + d * 16);
            for (int64_t i = 0; i < RB; ++i)
              acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(qb[i * D + d]), kv, acc[i]);
          }
        } else {
          for (int64_t d = 0; d < D; ++d) {
            const __m512 kv = _mm512_load_ps(kt + d * 16);
            for (int64_t i = 0; i < rb; ++i)
              acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(qb[i * D + d]), kv, acc[i]);
          }
        }
        for (int64_t i = 0; i < rb; ++i)
          _mm512_storeu_ps(scores + (r0 + i) * stride + j0, _mm512_mul_ps(acc[i], vscale));
      }
    }
  } else {
    for (int64_t r = 0; r < R; ++r) {  // scores, 16 keys at a time
      __m512 qv[DV];
      for (int t = 0; t < DV; ++t) qv[t] = _mm512_loadu_ps(q + r * D + 16 * t);
      for (int64_t j0 = 0; j0 < padded; j0 += 16) {
        const int64_t nb = std::min<int64_t>(16, live - j0);
        __m512 acc[16];
        for (int64_t j = 0; j < 16; ++j) {
          if (j < nb) {
            const float* kj = k + (s0 + j0 + j) * D;
            __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kj));
            for (int t = 1; t < DV; ++t) a = _mm512_fmadd_ps(qv[t], _mm512_loadu_ps(kj + 16 * t), a);
            acc[j] = a;
          } else {
            acc[j] = _mm512_setzero_ps();
          }
        }
        _mm512_storeu_ps(scores + r * stride + j0, _mm512_mul_ps(Sum16(acc), vscale));
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {  // exponentials, their shift and sum
    float* sr = scores + r * stride;
    const int64_t end = std::min<int64_t>(std::max<int64_t>(limit[r] - s0, 0), n);
    __m512 top = _mm512_set1_ps(kNeg);
    for (int64_t j = 0; j < end; j += 16) {
      const __mmask16 mk = end - j >= 16 ? 0xFFFF : (__mmask16)((1u << (end - j)) - 1);
      top = _mm512_mask_max_ps(top, mk, top, _mm512_loadu_ps(sr + j));
    }
    const float t = _mm512_reduce_max_ps(top);
    const __m512 vt = _mm512_set1_ps(t);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < padded; j += 16) {
      const __mmask16 mk = j >= end ? 0 : end - j >= 16 ? 0xFFFF : (__mmask16)((1u << (end - j)) - 1);
      const __m512 p = _mm512_maskz_mov_ps(mk, Exp(_mm512_sub_ps(_mm512_loadu_ps(sr + j), vt)));
      _mm512_storeu_ps(sr + j, p);
      sum = _mm512_add_ps(sum, p);
    }
    m[r] = t;
    l[r] = _mm512_reduce_add_ps(sum);
  }
  constexpr int64_t RB = DV <= 4 ? 4 : 2;  // rows per block: RB * DV accumulators
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int64_t rb = std::min(RB, R - r0);
    __m512 acc[RB][DV];
    for (int64_t i = 0; i < RB; ++i)
      for (int t = 0; t < DV; ++t) acc[i][t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < live; ++j) {
      const float* vj = v + (s0 + j) * D;
      __m512 vv[DV];
      for (int t = 0; t < DV; ++t) vv[t] = _mm512_loadu_ps(vj + 16 * t);
      for (int64_t i = 0; i < rb; ++i) {
        const __m512 p = _mm512_set1_ps(scores[(r0 + i) * stride + j]);
        for (int t = 0; t < DV; ++t) acc[i][t] = _mm512_fmadd_ps(p, vv[t], acc[i][t]);
      }
    }
    for (int64_t i = 0; i < rb; ++i)
      for (int t = 0; t < DV; ++t) _mm512_storeu_ps(o + (r0 + i) * D + 16 * t, acc[i][t]);
  }
}

using ChunkFn = void (*)(const float*, const float*, const float*, const int32_t*, int64_t,
                         int64_t, int64_t, int64_t, float, float*, float*, float*, float*);

ChunkFn ChunkFor(int64_t D) {
  switch (D) {
    case 32: return ChunkV<2>;
    case 64: return ChunkV<4>;
    case 128: return ChunkV<8>;
    case 256: return ChunkV<16>;
    default: return nullptr;
  }
}

struct Latch {
  std::mutex mu;
  std::condition_variable cv;
  bool closed = false;
  int active = 0;
  std::atomic<int64_t> next{0};
};

ffi::Error PrefixAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::S32> limit, float scale,
                               ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> m,
                               ffi::ResultBuffer<ffi::F32> l) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto vd = v.dimensions();
  auto ld = limit.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || ld.size() != 2 ||
      kd[0] < qd[0] || kd[2] != qd[2] || vd[0] != kd[0] || vd[1] != kd[1] ||
      vd[2] != kd[2] || ld[0] != qd[0] || ld[1] != qd[1])
    return ffi::Error::InvalidArgument(
        "prefix_attention: q [N, R, D], k and v [M >= N, S, D], limit [N, R]");
  const int64_t N = qd[0], R = qd[1], D = qd[2], S = kd[1];
  const ChunkFn chunk = ChunkFor(D);
  if (chunk == nullptr)
    return ffi::Error::InvalidArgument("prefix_attention: head size must be 32, 64, 128 or 256");
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const int32_t* lp = limit.typed_data();

  // Chunks per group: up to the group's largest limit.
  std::vector<int64_t> first(N + 1, 0);
  for (int64_t g = 0; g < N; ++g) {
    int64_t top = 0;
    for (int64_t r = 0; r < R; ++r) top = std::max<int64_t>(top, lp[g * R + r]);
    top = std::min(top, S);
    first[g + 1] = first[g] + std::max<int64_t>((top + kChunk - 1) / kChunk, 1);
  }
  const int64_t tasks = first[N];
  std::vector<float> pm(tasks * R), pl(tasks * R), po(tasks * R * D);
  std::vector<int64_t> group(tasks);
  for (int64_t g = 0; g < N; ++g)
    for (int64_t t = first[g]; t < first[g + 1]; ++t) group[t] = g;

  auto run = [&](int64_t t) {  // one chunk of keys of one group
    const int64_t g = group[t], c = t - first[g];
    const int64_t s0 = c * kChunk, s1 = std::min(S, s0 + kChunk);
    thread_local std::vector<float> scores;
    scores.resize(R * ((s1 - s0 + 15) / 16 * 16));
    chunk(qp + g * R * D, kp + g * S * D, vp + g * S * D, lp + g * R, R, s0, s1, S, scale,
          pm.data() + t * R, pl.data() + t * R, po.data() + t * R * D, scores.data());
  };
  auto latch = std::make_shared<Latch>();
  auto work = [latch, tasks, &run] {
    for (int64_t t; (t = latch->next.fetch_add(1)) < tasks;) run(t);
  };
  // Helpers only where there is work to share (a schedule costs tens of microseconds).
  const int64_t helpers = tasks < 4 ? 0 : std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([latch, work] {
      {
        std::lock_guard<std::mutex> lock(latch->mu);
        if (latch->closed) return;
        ++latch->active;
      }
      work();
      std::lock_guard<std::mutex> lock(latch->mu);
      --latch->active;
      latch->cv.notify_all();
    });
  }
  work();
  {
    std::unique_lock<std::mutex> lock(latch->mu);
    latch->closed = true;
    latch->cv.wait(lock, [&] { return latch->active == 0; });
  }

  float* op = o->typed_data();
  float* mp = m->typed_data();
  float* lo = l->typed_data();
  for (int64_t g = 0; g < N; ++g) {
    for (int64_t r = 0; r < R; ++r) {
      float top = kNeg;
      for (int64_t t = first[g]; t < first[g + 1]; ++t) top = std::max(top, pm[t * R + r]);
      float sum = 0.f;
      float* orow = op + (g * R + r) * D;
      std::fill(orow, orow + D, 0.f);
      for (int64_t t = first[g]; t < first[g + 1]; ++t) {
        const float w = pl[t * R + r] > 0.f ? std::exp(pm[t * R + r] - top) : 0.f;
        sum += w * pl[t * R + r];
        const float* src = po.data() + (t * R + r) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] += w * src[d];
      }
      mp[g * R + r] = top;
      lo[g * R + r] = sum;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthrusPrefixAttention, PrefixAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
