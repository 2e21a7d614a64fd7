// Attention of a few query rows over the live prefix of a KV cache, on the CPU (an XLA
// FFI handler; orthrus_jax/cpu_attention.py builds and registers it).
//
// q [N, R, D], k and v [M, S, D] with M >= N (N = batch * kv heads; groups past N are
// not read), limit [N, R] int32: row r of group n sees keys [0, limit[n, r]). Returns the flash-attention partials
// o [N, R, D] = sum_s exp(score - m) v_s, m [N, R] (the largest score, -1e30 where
// nothing is visible) and l [N, R] = sum_s exp(score - m), score = scale * q . k_s.
// Keys past a group's largest limit are never read. Work is split into chunks of
// keys, spread over XLA's intra-op thread pool, and merged.

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

// Partials of rows [0, R) over keys [s0, s1) of one group: m, l, o per row. D is a
// multiple of 16 (AVX-512 vectors of 16 floats), at most 16 vectors.
template <int DV>
void ChunkV(const float* q, const float* k, const float* v, const int32_t* limit,
            int64_t R, int64_t s0, int64_t s1, float scale, float* m, float* l, float* o,
            float* scores) {
  constexpr int64_t D = DV * 16;
  const int64_t n = s1 - s0;
  int64_t live = 0;  // keys any row of the chunk sees
  for (int64_t r = 0; r < R; ++r)
    live = std::max(live, std::min<int64_t>(std::max<int64_t>(limit[r] - s0, 0), n));
  for (int64_t j = 0; j < live; ++j) {
    const float* kj = k + (s0 + j) * D;
    __m512 kv[DV];
    for (int t = 0; t < DV; ++t) kv[t] = _mm512_loadu_ps(kj + 16 * t);
    for (int64_t r = 0; r < R; ++r) {
      const float* qr = q + r * D;
      __m512 acc = _mm512_mul_ps(kv[0], _mm512_loadu_ps(qr));
      for (int t = 1; t < DV; ++t) acc = _mm512_fmadd_ps(kv[t], _mm512_loadu_ps(qr + 16 * t), acc);
      scores[r * n + j] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float* sr = scores + r * n;
    const int64_t end = std::min<int64_t>(std::max<int64_t>(limit[r] - s0, 0), n);
    float top = kNeg;
    for (int64_t j = 0; j < end; ++j) top = std::max(top, sr[j]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < end; ++j) {
      const float p = std::exp(sr[j] - top);
      sr[j] = p;
      sum += p;
    }
    for (int64_t j = end; j < live; ++j) sr[j] = 0.f;
    m[r] = top;
    l[r] = sum;
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
        const __m512 p = _mm512_set1_ps(scores[(r0 + i) * n + j]);
        for (int t = 0; t < DV; ++t) acc[i][t] = _mm512_fmadd_ps(p, vv[t], acc[i][t]);
      }
    }
    for (int64_t i = 0; i < rb; ++i)
      for (int t = 0; t < DV; ++t) _mm512_storeu_ps(o + (r0 + i) * D + 16 * t, acc[i][t]);
  }
}

using ChunkFn = void (*)(const float*, const float*, const float*, const int32_t*, int64_t,
                         int64_t, int64_t, float, float*, float*, float*, float*);

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
    std::vector<float> scores(R * (s1 - s0));
    chunk(qp + g * R * D, kp + g * S * D, vp + g * S * D, lp + g * R, R, s0, s1, scale,
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
