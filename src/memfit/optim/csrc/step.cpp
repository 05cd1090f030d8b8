// Fused CPU optimizer steps for memfit.optim with block-wise quantized states.
//
// Blocks of `block` elements, split over threads with at::parallel_for; each block:
//   1. dequantize the block's states (code book value * absmax),
//   2. update param and states in fp32 (AdamW, SGD with momentum, or Lion) into stack
//      buffers,
//   3. if any new state element is non-finite: write NOTHING for this block and flag
//      it in `redo` (Python redoes it on the eager path, which keeps non-finite state
//      elements exactly in a side table); blocks already flagged on entry are skipped,
//   4. else store the params, compute the new absmax and requantize to the nearest code
//      (ties to the lower code, exactly as memfit/codec/dynamic.py's quantize_normalized).
//
// Full AdamW blocks (block % 32 == 0, AVX2) take the fast path (AdamWFast below): 8-bit
// float-map codes (memfit's 8-bit AdamW layout) decoded and encoded by integer arithmetic
// on fp32 bits (FMap), 4-bit ones decoded with vpshufb and encoded by a binary search in
// registers, absmax by integer max of fp32 bits; these blocks are pipelined (update of
// one block with the requantization of the previous). Other blocks (other maps included),
// SGD and Lion use the generic per-block code, which rounds
// with a lookup table (sign/exponent/top-mantissa bits -> code of the cell's lower end and
// the one midpoint inside it; see memfit/codec/dynamic.py).
//
// The arithmetic mirrors memfit/optim/_qstate.py (the eager path) operation by operation
// in fp32 with no fused multiply-add (built with -ffp-contract=off; the only fma is the
// quantizer's, whose result is checked), so both paths give identical bits.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t MAXB = 4096;

struct QTab {
  const float* values;   // 2^bits code book
  const int32_t* table;  // packed lookup table (memfit/codec/dynamic.py: _build_table)
  const float* mids;     // 2^bits - 1 midpoints
  int32_t mb;
  int32_t emin;
  int32_t cells;
  int32_t zero;
};

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

template <int BITS>
inline void dequant_block(const uint8_t* codes, int64_t start, int64_t cnt, float am, const float* vals,
                          float* out) {
  if (BITS == 8) {
    const uint8_t* c = codes + start;
    for (int64_t i = 0; i < cnt; ++i) out[i] = vals[c[i]] * am;
  } else {
    const uint8_t* c = codes + start / 2;
    const int64_t pairs = cnt / 2;
    for (int64_t k = 0; k < pairs; ++k) {
      const uint8_t b = c[k];
      out[2 * k] = vals[b & 15] * am;
      out[2 * k + 1] = vals[b >> 4] * am;
    }
    if (cnt & 1) out[cnt - 1] = vals[c[pairs] & 15] * am;
  }
}

inline int32_t quant_one(float x, const QTab& t) {
  // x finite; clamp to [-1, 1] (x * (1/absmax) can round just past 1)
  x = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
  const uint32_t u = f2u(x);
  const uint32_t mag = u & 0x7fffffffu;
  const int32_t sh = 23 - t.mb;
  int32_t j = (int32_t)(mag >> sh) - (t.emin << t.mb);
  j = j < 0 ? 0 : (j > t.cells - 1 ? t.cells - 1 : j);
  int32_t xoff = (int32_t)mag - (int32_t)((uint32_t)(j + (t.emin << t.mb)) << sh);
  xoff = xoff < 0 ? 0 : xoff;
  const uint32_t e = (uint32_t)t.table[j + (u >> 31 ? t.cells : 0)];
  const int32_t toff = (int32_t)(e & 0xffffffu);
  const int32_t up = (u >> 31) ? (xoff < toff) : (xoff > toff);
  return (int32_t)(e >> 24) + up;
}

// nearest code by counting midpoints below x (small maps: 16 codes)
inline int32_t quant_count(float x, const QTab& t, int nm) {
  x = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
  int32_t c = 0;
  for (int k = 0; k < nm; ++k) c += x > t.mids[k] ? 1 : 0;
  return c;
}

// Nearest code exactly as memfit/codec/dynamic.py's quantize_normalized: NaN -> 0, clamp
// to [-1, 1], then the number of midpoints strictly below x (ties go to the lower code).
inline int32_t quant_exact(float x, const float* mids, int nm) {
  if (x != x) x = 0.0f;
  x = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
  int lo = 0, hi = nm;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (mids[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(__AVX2__)
// ------------------------------------------------------------------ AVX2 versions
// Zen-class CPUs gather slowly: 8 scalar loads into a stack buffer beat vpgatherdd.
#ifndef MEMFIT_GATHER
#define MEMFIT_GATHER 0
#endif
__attribute__((optimize("no-tree-vectorize"))) inline void dequant8_scalar(const uint8_t* c, int64_t cnt, float am,
                                                                           const float* vals, float* out) {
  for (int64_t i = 0; i < cnt; ++i) out[i] = vals[c[i]] * am;
}

inline void dequant8_avx(const uint8_t* c, int64_t cnt, float am, const float* vals, float* out) {
  if (!MEMFIT_GATHER) return dequant8_scalar(c, cnt, am, vals, out);
  const __m256 amv = _mm256_set1_ps(am);
  int64_t i = 0;
  for (; i + 8 <= cnt; i += 8) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(c + i)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_i32gather_ps(vals, idx, 4), amv));
  }
  for (; i < cnt; ++i) out[i] = vals[c[i]] * am;
}

inline void dequant4_avx(const uint8_t* c, int64_t cnt, float am, const float* vals, float* out) {
  const __m256 amv = _mm256_set1_ps(am);
  const __m256 lo8 = _mm256_loadu_ps(vals), hi8 = _mm256_loadu_ps(vals + 8);
  const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  const __m256i m15 = _mm256_set1_epi32(15);
  int64_t i = 0;
  for (; i + 8 <= cnt; i += 8) {
    int32_t w;
    std::memcpy(&w, c + i / 2, 4);
    const __m128i b = _mm_shuffle_epi8(_mm_cvtsi32_si128(w), dup);
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(b), shifts), m15);
    const __m256 a = _mm256_permutevar8x32_ps(lo8, idx);
    const __m256 h = _mm256_permutevar8x32_ps(hi8, idx);
    const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 -> sign bit
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_blendv_ps(a, h, sel), amv));
  }
  for (; i < cnt; ++i) out[i] = vals[(c[i / 2] >> ((i & 1) * 4)) & 15] * am;
}

// codes of x[0..cnt) * inv into out[0..cnt) (int32): table lookup (256-code maps)
inline void quant_avx(const float* x, int64_t cnt, float inv, const QTab& t, int32_t* out) {
  const __m256 invv = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.0f), mone = _mm256_set1_ps(-1.0f);
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff), lowmask = _mm256_set1_epi32(0xffffff);
  const __m256i base = _mm256_set1_epi32(t.emin << t.mb), zero = _mm256_setzero_si256();
  const __m256i top = _mm256_set1_epi32(t.cells - 1), cellsv = _mm256_set1_epi32(t.cells);
  const __m128i sh = _mm_cvtsi32_si128(23 - t.mb);
  int64_t i = 0;
  for (; i + 8 <= cnt; i += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), invv);
    v = _mm256_min_ps(_mm256_max_ps(v, mone), one);
    const __m256i u = _mm256_castps_si256(v);
    const __m256i neg = _mm256_srai_epi32(u, 31);  // all ones where x < 0 (or -0)
    const __m256i mag = _mm256_and_si256(u, absmask);
    __m256i j = _mm256_sub_epi32(_mm256_srl_epi32(mag, sh), base);
    j = _mm256_min_epi32(_mm256_max_epi32(j, zero), top);
    const __m256i cb = _mm256_sll_epi32(_mm256_add_epi32(j, base), sh);
    const __m256i xoff = _mm256_max_epi32(_mm256_sub_epi32(mag, cb), zero);
    const __m256i idx = _mm256_add_epi32(j, _mm256_and_si256(neg, cellsv));
#if MEMFIT_GATHER
    const __m256i e = _mm256_i32gather_epi32((const int*)t.table, idx, 4);
#else
    alignas(32) int32_t ix[8], ev[8];
    _mm256_store_si256((__m256i*)ix, idx);
    for (int k = 0; k < 8; ++k) ev[k] = t.table[ix[k]];
    const __m256i e = _mm256_load_si256((const __m256i*)ev);
#endif
    const __m256i toff = _mm256_and_si256(e, lowmask);
    // up = neg ? (xoff < toff) : (xoff > toff), as 0 / -1
    const __m256i up = _mm256_blendv_epi8(_mm256_cmpgt_epi32(xoff, toff), _mm256_cmpgt_epi32(toff, xoff), neg);
    _mm256_storeu_si256((__m256i*)(out + i), _mm256_sub_epi32(_mm256_srli_epi32(e, 24), up));
  }
  for (; i < cnt; ++i) out[i] = quant_one(x[i] * inv, t);
}

// codes for 16-code maps: count the 15 midpoints below x
inline void quant16_avx(const float* x, int64_t cnt, float inv, const QTab& t, int32_t* out) {
  const __m256 invv = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.0f), mone = _mm256_set1_ps(-1.0f);
  __m256 mv[15];
  for (int k = 0; k < 15; ++k) mv[k] = _mm256_set1_ps(t.mids[k]);
  int64_t i = 0;
  for (; i + 8 <= cnt; i += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), invv);
    v = _mm256_min_ps(_mm256_max_ps(v, mone), one);
    __m256i c = _mm256_setzero_si256();
    for (int k = 0; k < 15; ++k) c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(v, mv[k], _CMP_GT_OQ)));
    _mm256_storeu_si256((__m256i*)(out + i), c);
  }
  for (; i < cnt; ++i) out[i] = quant_count(x[i] * inv, t, 15);
}

inline void pack8_avx(const int32_t* q, int64_t block, uint8_t* c) {
  int64_t i = 0;
  for (; i + 8 <= block; i += 8) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(q + i));
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i*)(c + i), _mm_packus_epi16(w, w));
  }
  for (; i < block; ++i) c[i] = (uint8_t)q[i];
}

inline void pack4_avx(const int32_t* q, int64_t block, uint8_t* c) {
  int64_t i = 0;
  const __m128i ff = _mm_set1_epi32(0xff);
  for (; i + 8 <= block; i += 8) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(q + i));
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));  // 8 x u16
    const __m128i p = _mm_and_si128(_mm_or_si128(w, _mm_srli_epi32(w, 12)), ff);  // 4 x u32 bytes
    const __m128i b = _mm_packus_epi16(_mm_packus_epi32(p, p), _mm_setzero_si128());
    const int32_t out = _mm_cvtsi128_si32(b);
    std::memcpy(c + i / 2, &out, 4);
  }
  for (; i < block; i += 2) c[i / 2] = (uint8_t)(q[i] | (q[i + 1] << 4));
}

// ---- register-level helpers for the fused AdamW block (AVX2)
struct Q8C {  // constants of the table lookup, hoisted out of the loops
  __m256i absmask, lowmask, base, zero, top, cellsv;
  __m128i sh;
  const int32_t* table;
  explicit Q8C(const QTab& t) {
    absmask = _mm256_set1_epi32(0x7fffffff);
    lowmask = _mm256_set1_epi32(0xffffff);
    base = _mm256_set1_epi32(t.emin << t.mb);
    zero = _mm256_setzero_si256();
    top = _mm256_set1_epi32(t.cells - 1);
    cellsv = _mm256_set1_epi32(t.cells);
    sh = _mm_cvtsi32_si128(23 - t.mb);
    table = t.table;
  }
};

// v already normalised (|v| <= 1 up to one rounding: the table clamps the rest)
inline __m256i q8v(__m256 v, const Q8C& k) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i neg = _mm256_srai_epi32(u, 31);
  const __m256i mag = _mm256_and_si256(u, k.absmask);
  __m256i j = _mm256_sub_epi32(_mm256_srl_epi32(mag, k.sh), k.base);
  j = _mm256_min_epi32(_mm256_max_epi32(j, k.zero), k.top);
  const __m256i cb = _mm256_sll_epi32(_mm256_add_epi32(j, k.base), k.sh);
  const __m256i xoff = _mm256_max_epi32(_mm256_sub_epi32(mag, cb), k.zero);
  const __m256i idx = _mm256_add_epi32(j, _mm256_and_si256(neg, k.cellsv));
  const __m256i e = _mm256_i32gather_epi32((const int*)k.table, idx, 4);
  const __m256i toff = _mm256_and_si256(e, k.lowmask);
  const __m256i up = _mm256_blendv_epi8(_mm256_cmpgt_epi32(xoff, toff), _mm256_cmpgt_epi32(toff, xoff), neg);
  return _mm256_sub_epi32(_mm256_srli_epi32(e, 24), up);
}

inline __m256i q16v(__m256 v, const __m256* mv) {
  __m256i c = _mm256_setzero_si256();
  for (int k = 0; k < 15; ++k) c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(v, mv[k], _CMP_GT_OQ)));
  return c;
}

inline void store8(uint8_t* c, __m256i q) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  _mm_storel_epi64((__m128i*)c, _mm_packus_epi16(w, w));
}

inline void store4(uint8_t* c, __m256i q) {  // 8 codes -> 4 bytes
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  const __m128i p = _mm_and_si128(_mm_or_si128(w, _mm_srli_epi32(w, 12)), _mm_set1_epi32(0xff));
  const __m128i b = _mm_packus_epi16(_mm_packus_epi32(p, p), _mm_setzero_si128());
  const int32_t out = _mm_cvtsi128_si32(b);
  std::memcpy(c, &out, 4);
}

struct D4C {
  __m256 lo8, hi8;
  __m128i dup;
  __m256i shifts, m15;
  explicit D4C(const float* vals) {
    lo8 = _mm256_loadu_ps(vals);
    hi8 = _mm256_loadu_ps(vals + 8);
    dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);
    shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    m15 = _mm256_set1_epi32(15);
  }
};

inline __m256 d4v(const uint8_t* c, const D4C& k) {  // 4 bytes -> 8 values
  int32_t w;
  std::memcpy(&w, c, 4);
  const __m128i b = _mm_shuffle_epi8(_mm_cvtsi32_si128(w), k.dup);
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(b), k.shifts), k.m15);
  const __m256 a = _mm256_permutevar8x32_ps(k.lo8, idx);
  const __m256 h = _mm256_permutevar8x32_ps(k.hi8, idx);
  return _mm256_blendv_ps(a, h, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

inline __m256 d8v(const uint8_t* c, const float* vals) {
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)c));
  return _mm256_i32gather_ps(vals, idx, 4);
}

inline float hmax8(__m256 m) {
  alignas(32) float f[8];
  _mm256_store_ps(f, m);
  float r = 0.0f;
  for (int k = 0; k < 8; ++k) r = f[k] > r ? f[k] : r;
  return r;
}

// One full AdamW block (block % 8 == 0, cnt == block). Returns false, writing nothing,
// when a new state element is non-finite.
template <int BITS>
inline bool adamw_block_avx(const float* g, float* P, uint8_t* c0, uint8_t* c1, float* am0p, float* am1p,
                            const QTab& t0, const QTab& t1, const float* h, int64_t block, float* s0, float* s1,
                            float* np) {
  const __m256 vdecay = _mm256_set1_ps(h[0]), vb1 = _mm256_set1_ps(h[1]), vomb1 = _mm256_set1_ps(h[2]),
               vb2 = _mm256_set1_ps(h[3]), vomb2 = _mm256_set1_ps(h[4]), vibc2 = _mm256_set1_ps(h[5]),
               veps = _mm256_set1_ps(h[6]), vss = _mm256_set1_ps(h[7]), vgs = _mm256_set1_ps(h[8]);
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 a0 = _mm256_set1_ps(*am0p), a1 = _mm256_set1_ps(*am1p);
  __m256 mx0 = _mm256_setzero_ps(), mx1 = _mm256_setzero_ps(), acc = _mm256_setzero_ps();
  D4C d40(t0.values), d41(t1.values);
  // software prefetch two blocks ahead (the caller guarantees the memory is mapped only
  // up to the tensor's end, and prefetches never fault)
  {
    const int64_t ahead = 2 * block;
    for (int64_t i = 0; i < block; i += 16) {
      _mm_prefetch((const char*)(g + ahead + i), _MM_HINT_T0);
      _mm_prefetch((const char*)(P + ahead + i), _MM_HINT_T0);
    }
    for (int64_t i = 0; i < block * BITS / 8; i += 64) {
      _mm_prefetch((const char*)(c0 + ahead * BITS / 8 + i), _MM_HINT_T0);
      _mm_prefetch((const char*)(c1 + ahead * BITS / 8 + i), _MM_HINT_T0);
    }
  }
  for (int64_t i = 0; i < block; i += 8) {
    __m256 m0, v0;
    if (BITS == 8) {
      m0 = _mm256_mul_ps(d8v(c0 + i, t0.values), a0);
      v0 = _mm256_mul_ps(d8v(c1 + i, t1.values), a1);
    } else {
      m0 = _mm256_mul_ps(d4v(c0 + i / 2, d40), a0);
      v0 = _mm256_mul_ps(d4v(c1 + i / 2, d41), a1);
    }
    const __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g + i), vgs);
    __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(P + i), vdecay);
    const __m256 m = _mm256_add_ps(_mm256_mul_ps(vb1, m0), _mm256_mul_ps(vomb1, gi));
    const __m256 v = _mm256_add_ps(_mm256_mul_ps(vb2, v0), _mm256_mul_ps(vomb2, _mm256_mul_ps(gi, gi)));
    const __m256 den = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(v), vibc2), veps);
    pi = _mm256_sub_ps(pi, _mm256_mul_ps(vss, _mm256_div_ps(m, den)));
    _mm256_store_ps(s0 + i, m);
    _mm256_store_ps(s1 + i, v);
    _mm256_store_ps(np + i, pi);
    mx0 = _mm256_max_ps(mx0, _mm256_and_ps(m, absm));
    mx1 = _mm256_max_ps(mx1, _mm256_and_ps(v, absm));
    acc = _mm256_add_ps(acc, _mm256_add_ps(_mm256_sub_ps(m, m), _mm256_sub_ps(v, v)));
  }
  alignas(32) float af[8];
  _mm256_store_ps(af, acc);
  float bad = 0.0f;
  for (int k = 0; k < 8; ++k) bad += af[k];
  if (bad != bad) return false;
  const float am0 = hmax8(mx0), am1 = hmax8(mx1);
  const float if0 = am0 > 0.0f ? 1.0f / am0 : 0.0f, if1 = am1 > 0.0f ? 1.0f / am1 : 0.0f;
  const __m256 inv0 = _mm256_set1_ps(if0);
  const __m256 inv1 = _mm256_set1_ps(if1);
  if (!(if0 < INFINITY && if1 < INFINITY)) {  // absmax so small that 1/absmax overflows
    const float* ss[2] = {s0, s1};
    const float invs[2] = {if0, if1};
    const QTab* ts[2] = {&t0, &t1};
    uint8_t* cs[2] = {c0, c1};
    for (int k = 0; k < 2; ++k) {
      const int nm = (1 << BITS) - 1;
      for (int64_t i = 0; i < block; i += 2) {
        const int32_t lo = quant_exact(ss[k][i] * invs[k], ts[k]->mids, nm);
        const int32_t hi = quant_exact(ss[k][i + 1] * invs[k], ts[k]->mids, nm);
        if (BITS == 8) {
          cs[k][i] = (uint8_t)lo;
          cs[k][i + 1] = (uint8_t)hi;
        } else {
          cs[k][i / 2] = (uint8_t)(lo | (hi << 4));
        }
      }
    }
    std::memcpy(P, np, sizeof(float) * block);
  } else if (BITS == 8) {
    const Q8C k0(t0), k1(t1);
    for (int64_t i = 0; i < block; i += 8) {
      store8(c0 + i, q8v(_mm256_mul_ps(_mm256_load_ps(s0 + i), inv0), k0));
      store8(c1 + i, q8v(_mm256_mul_ps(_mm256_load_ps(s1 + i), inv1), k1));
      _mm256_storeu_ps(P + i, _mm256_load_ps(np + i));
    }
  } else {
    __m256 mv0[15], mv1[15];
    for (int k = 0; k < 15; ++k) {
      mv0[k] = _mm256_set1_ps(t0.mids[k]);
      mv1[k] = _mm256_set1_ps(t1.mids[k]);
    }
    for (int64_t i = 0; i < block; i += 8) {
      store4(c0 + i / 2, q16v(_mm256_mul_ps(_mm256_load_ps(s0 + i), inv0), mv0));
      store4(c1 + i / 2, q16v(_mm256_mul_ps(_mm256_load_ps(s1 + i), inv1), mv1));
      _mm256_storeu_ps(P + i, _mm256_load_ps(np + i));
    }
  }
  *am0p = am0;
  *am1p = am1;
  return true;
}

// max |x| and whether any x is non-finite
inline float absmax_nf(const float* x, int64_t n, bool* bad) {
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m = _mm256_setzero_ps(), acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    m = _mm256_max_ps(m, _mm256_and_ps(v, absm));
    acc = _mm256_add_ps(acc, _mm256_sub_ps(v, v));
  }
  alignas(32) float mm[8], aa[8];
  _mm256_store_ps(mm, m);
  _mm256_store_ps(aa, acc);
  float r = 0.0f, a = 0.0f;
  for (int k = 0; k < 8; ++k) {
    r = mm[k] > r ? mm[k] : r;
    a += aa[k];
  }
  for (; i < n; ++i) {
    const float f = std::fabs(x[i]);
    r = f > r ? f : r;
    a += x[i] - x[i];
  }
  *bad = *bad || (a != a);
  return r;
}
#endif

template <int BITS>
inline void dequant_any(const uint8_t* codes, int64_t start, int64_t cnt, float am, const float* vals, float* out) {
#if defined(__AVX2__)
  if (BITS == 8) return dequant8_avx(codes + start, cnt, am, vals, out);
  return dequant4_avx(codes + start / 2, cnt, am, vals, out);
#else
  dequant_block<BITS>(codes, start, cnt, am, vals, out);
#endif
}

template <int BITS>
inline void quant_block(const float* x, int64_t cnt, int64_t block, float am, const QTab& t, uint8_t* codes,
                        int64_t start, int32_t* tmp) {
  const float inv = am > 0.0f ? 1.0f / am : 0.0f;
  if (!(inv < INFINITY)) {  // absmax so small that 1/absmax overflows: x * inv is NaN or +-inf
    for (int64_t i = 0; i < cnt; ++i) tmp[i] = quant_exact(x[i] * inv, t.mids, (1 << BITS) - 1);
  } else {
#if defined(__AVX2__)
    if (BITS == 4) quant16_avx(x, cnt, inv, t, tmp);
    else quant_avx(x, cnt, inv, t, tmp);
#else
    if (BITS == 4) for (int64_t i = 0; i < cnt; ++i) tmp[i] = quant_count(x[i] * inv, t, 15);
    else for (int64_t i = 0; i < cnt; ++i) tmp[i] = quant_one(x[i] * inv, t);
#endif
  }
  for (int64_t i = cnt; i < block; ++i) tmp[i] = t.zero;
#if defined(__AVX2__)
  if (BITS == 8) pack8_avx(tmp, block, codes + start);
  else pack4_avx(tmp, block, codes + start / 2);
#else
  if (BITS == 8) {
    uint8_t* c = codes + start;
    for (int64_t i = 0; i < block; ++i) c[i] = (uint8_t)tmp[i];
  } else {
    uint8_t* c = codes + start / 2;
    for (int64_t k = 0; k < block / 2; ++k) c[k] = (uint8_t)(tmp[2 * k] | (tmp[2 * k + 1] << 4));
  }
#endif
}

// max |x[i]| over the block, and sets *bad if any x[i] is non-finite
inline float absmax_check(const float* x, int64_t n, bool* bad) {
#if defined(__AVX2__)
  return absmax_nf(x, n, bad);
#else
  float m = 0.0f, acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    m = a > m ? a : m;
    acc += x[i] - x[i];
  }
  *bad = *bad || (acc != acc);
  return m;
#endif
}

QTab make_tab(const torch::Tensor& values, const torch::Tensor& table, const torch::Tensor& mids,
              const std::vector<int64_t>& ip, size_t k) {
  TORCH_CHECK(values.scalar_type() == torch::kFloat32 && values.is_contiguous(), "values must be fp32");
  TORCH_CHECK(table.scalar_type() == torch::kInt32 && table.is_contiguous(), "table must be int32");
  TORCH_CHECK(mids.scalar_type() == torch::kFloat32 && mids.is_contiguous() && mids.numel() == values.numel() - 1,
              "mids must be fp32[2^bits - 1]");
  QTab t;
  t.values = values.data_ptr<float>();
  t.table = table.data_ptr<int32_t>();
  t.mids = mids.data_ptr<float>();
  t.mb = (int32_t)ip[4 * k + 0];
  t.emin = (int32_t)ip[4 * k + 1];
  t.cells = (int32_t)ip[4 * k + 2];
  t.zero = (int32_t)ip[4 * k + 3];
  TORCH_CHECK(table.numel() == 2 * (int64_t)t.cells, "table size differs from cells");
  return t;
}

// ===================================================================== fast AdamW blocks
// Full blocks of AdamW (block % 32 == 0) on 4-bit maps or on the 8-bit float maps take two
// passes over the block, each with few live constants so that they stay in registers:
//   B. the fp32 update into stack buffers (decoded 32 at a time: 4-bit with vpshufb on the
//      4 bytes of the 16 fp32 code values, 8-bit float maps by integer arithmetic); absmax
//      from integer max of the fp32 bits, which also catches NaN/Inf (their bits are the
//      largest);
//   C. requantization without table lookups (below), packing and the parameter store.
// B of one block and C of the previous run in the same loop (the sqrt and division, B's
// bottleneck, overlap C's vector work).
// The results are bit-identical to the eager path (memfit/optim/_qstate.py).

#if defined(__AVX2__)
// ---- 16-code maps: branchless binary search over the 15 midpoints held in registers
struct Q4V {
  __m256 t1, t2, t3, t4, one, mone;
  explicit Q4V(const float* m) {
    alignas(32) float a[8], b[8], c[8];
    for (int k = 0; k < 8; ++k) {
      a[k] = m[8 * (k & 1) + 3];
      b[k] = m[4 * (k & 3) + 1];
      c[k] = m[2 * k];
    }
    t1 = _mm256_set1_ps(m[7]);
    t2 = _mm256_load_ps(a);
    t3 = _mm256_load_ps(b);
    t4 = _mm256_load_ps(c);
    one = _mm256_set1_ps(1.0f);
    mone = _mm256_set1_ps(-1.0f);
  }
};

inline __m256i q4v(__m256 x, const Q4V& k) {
  x = _mm256_min_ps(_mm256_max_ps(x, k.mone), k.one);
  __m256i m = _mm256_castps_si256(_mm256_cmp_ps(x, k.t1, _CMP_GT_OQ));
  __m256i p = _mm256_sub_epi32(_mm256_setzero_si256(), m);  // node so far: 0 or 1
  m = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_permutevar8x32_ps(k.t2, p), _CMP_GT_OQ));
  p = _mm256_sub_epi32(_mm256_add_epi32(p, p), m);
  m = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_permutevar8x32_ps(k.t3, p), _CMP_GT_OQ));
  p = _mm256_sub_epi32(_mm256_add_epi32(p, p), m);
  m = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_permutevar8x32_ps(k.t4, p), _CMP_GT_OQ));
  return _mm256_sub_epi32(_mm256_add_epi32(p, p), m);
}

// ---- 16-code dequantization, 32 elements (16 bytes) at a time: each of the 4 bytes of
// the 16 fp32 code values is a 16-entry byte table for vpshufb
struct D4V {
  __m256i tab[4];
  __m128i order;
  __m256i m0f;
  explicit D4V(const float* vals) {
    alignas(32) uint8_t t[4][32];
    for (int c = 0; c < 16; ++c) {
      const uint32_t u = f2u(vals[c]);
      for (int p = 0; p < 4; ++p) t[p][c] = t[p][c + 16] = (uint8_t)(u >> (8 * p));
    }
    for (int p = 0; p < 4; ++p) tab[p] = _mm256_load_si256((const __m256i*)t[p]);
    // code bytes 0,1,4,5,8,9,12,13 to the low lane, the others to the high one
    order = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    m0f = _mm256_set1_epi16(0x0f0f);
  }
};

inline void d4x32(const uint8_t* c, const D4V& d, __m256 out[4]) {
  const __m128i b = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)c), d.order);
  const __m256i w = _mm256_cvtepu8_epi16(b);  // byte j -> word: element 2j (low nibble), 2j+1
  const __m256i e = _mm256_and_si256(_mm256_or_si256(w, _mm256_slli_epi16(w, 4)), d.m0f);
  // e (one code a byte), low lane: elements 0-3, 8-11, 16-19, 24-27; high lane: the others
  const __m256i t0 = _mm256_shuffle_epi8(d.tab[0], e), t1 = _mm256_shuffle_epi8(d.tab[1], e);
  const __m256i t2 = _mm256_shuffle_epi8(d.tab[2], e), t3 = _mm256_shuffle_epi8(d.tab[3], e);
  const __m256i l01 = _mm256_unpacklo_epi8(t0, t1), h01 = _mm256_unpackhi_epi8(t0, t1);
  const __m256i l23 = _mm256_unpacklo_epi8(t2, t3), h23 = _mm256_unpackhi_epi8(t2, t3);
  out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

// 4 x 8 codes (int32, < 256) -> 32 bytes in order
inline void pack8x32(uint8_t* dst, __m256i q0, __m256i q1, __m256i q2, __m256i q3) {
  const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(q0, q1), _mm256_packus_epi32(q2, q3));
  _mm256_storeu_si256((__m256i*)dst, _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

// 4 x 8 codes (int32, < 16) -> 16 bytes, element 2i in the low nibble
inline void pack4x32(uint8_t* dst, __m256i q0, __m256i q1, __m256i q2, __m256i q3) {
  const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(q0, q1), _mm256_packus_epi32(q2, q3));
  // b, low lane: elements 0-3, 8-11, 16-19, 24-27; high lane: 4-7, 12-15, 20-23, 28-31
  const __m256i w = _mm256_maddubs_epi16(b, _mm256_set1_epi16(0x1001));  // b[2i] + 16 b[2i+1]
  const __m256i p = _mm256_packus_epi16(w, w);
  _mm_storeu_si128((__m128i*)dst, _mm_unpacklo_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
}

// exact requantization of cnt elements starting at element `start` (rare fallback)
inline void requant_exact(const float* s, int64_t cnt, float inv, const float* mids, int bits, uint8_t* codes,
                          int64_t start) {
  const int nm = (1 << bits) - 1;
  if (bits == 8) {
    for (int64_t i = 0; i < cnt; ++i) codes[start + i] = (uint8_t)quant_exact(s[i] * inv, mids, nm);
  } else {
    for (int64_t i = 0; i < cnt; i += 2) {
      const int32_t lo = quant_exact(s[i] * inv, mids, nm), hi = quant_exact(s[i + 1] * inv, mids, nm);
      codes[(start + i) / 2] = (uint8_t)(lo | (hi << 4));
    }
  }
}

// ---- 8-bit floating-point maps (memfit/codec/dynamic.py: float_map)
// Magnitude code k stands for the fp32 with bits (k + off) << s, so rounding to the
// nearest code is integer rounding of the fp32 bits: add half a step (minus 1 for x >= 0,
// so that ties go to the lower code as in quantize_normalized), shift, subtract off. No
// search, no table; the codes are always exactly quantize_normalized's (tested).
struct FMap {
  bool ok = false;
  bool sym = false;   // signed: codes 127 -/+ k, k = 0 is 0.0, code 255 duplicates 1.0
  int32_t s = 0;      // 23 - mantissa bits
  int32_t off = 0;
  uint32_t mid01 = 0; // signed: bits of the midpoint between 0 and magnitude 1
};

inline FMap build_fmap(const float* v, int n) {
  FMap f;
  if (n != 256) return f;
  for (int mb = 1; mb <= 6; ++mb) {
    const int s = 23 - mb;
    bool good = true;
    if (v[0] < 0.0f) {  // signed
      const int32_t off = (127 << mb) - 127;
      good = v[127] == 0.0f && v[255] == 1.0f;
      for (int k = 1; good && k <= 127; ++k) {
        const float m = u2f((uint32_t)(k + off) << s);
        good = v[127 + k] == m && v[127 - k] == -m;
      }
      if (good) {
        f.ok = true;
        f.sym = true;
        f.s = s;
        f.off = off;
        f.mid01 = f2u(v[128] * 0.5f);
        return f;
      }
    } else {
      const int32_t off = (127 << mb) - 255;
      for (int k = 0; good && k <= 255; ++k) good = v[k] == u2f((uint32_t)(k + off) << s);
      if (good) {
        f.ok = true;
        f.s = s;
        f.off = off;
        return f;
      }
    }
  }
  return f;
}

// (entries are heap-allocated so that references stay valid as the cache grows)
inline const FMap& fmap_cached(const float* v) {
  static std::mutex mu;
  static std::vector<std::pair<std::vector<float>, std::unique_ptr<FMap>>> cache;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& e : cache)
    if (std::memcmp(e.first.data(), v, 256 * 4) == 0) return *e.second;
  cache.emplace_back(std::vector<float>(v, v + 256), std::unique_ptr<FMap>(new FMap(build_fmap(v, 256))));
  return *cache.back().second;
}

#if defined(__AVX2__)
struct F8V {
  bool sym = false;
  __m128i s;
  __m256i off, hm1, mid, c127, c255, zero, sgn, absm;
  __m256 one, mone;
  F8V() = default;
  explicit F8V(const FMap& f) : sym(f.sym) {
    s = _mm_cvtsi32_si128(f.s);
    off = _mm256_set1_epi32(f.off);
    hm1 = _mm256_set1_epi32((1 << (f.s - 1)) - 1);
    mid = _mm256_set1_epi32((int32_t)f.mid01);
    c127 = _mm256_set1_epi32(127);
    c255 = _mm256_set1_epi32(255);
    zero = _mm256_setzero_si256();
    sgn = _mm256_set1_epi32((int32_t)0x80000000u);
    absm = _mm256_set1_epi32(0x7fffffff);
    one = _mm256_set1_ps(1.0f);
    mone = _mm256_set1_ps(-1.0f);
  }
};

// 8 codes (int32) -> 8 code book values (SYM must equal f.sym)
template <bool SYM>
__attribute__((always_inline)) inline __m256 f8_decode(__m256i q, const F8V& f) {
  if (!SYM) return _mm256_castsi256_ps(_mm256_sll_epi32(_mm256_add_epi32(q, f.off), f.s));
  const __m256i d = _mm256_sub_epi32(q, f.c127);
  const __m256i k = _mm256_min_epi32(_mm256_abs_epi32(d), f.c127);
  __m256i b = _mm256_sll_epi32(_mm256_add_epi32(k, f.off), f.s);
  b = _mm256_andnot_si256(_mm256_cmpeq_epi32(k, f.zero), b);
  return _mm256_castsi256_ps(_mm256_or_si256(b, _mm256_and_si256(d, f.sgn)));
}

// nearest codes (int32) of 8 normalised finite values. CLAMP: clamp to [-1, 1] first;
// without it |x| must be below 1 + 2^-6 (x * (1 / absmax) is at most a few ulps past 1).
template <bool CLAMP, bool SYM>
__attribute__((always_inline)) inline __m256i f8_encode(__m256 x, const F8V& f) {
  if (!SYM) {
    if (CLAMP) x = _mm256_min_ps(x, f.one);
    const __m256i u = _mm256_max_epi32(_mm256_castps_si256(x), f.zero);  // x < 0 -> 0
    const __m256i k = _mm256_sub_epi32(_mm256_srl_epi32(_mm256_add_epi32(u, f.hm1), f.s), f.off);
    return _mm256_max_epi32(k, f.zero);
  }
  if (CLAMP) x = _mm256_min_ps(_mm256_max_ps(x, f.mone), f.one);
  const __m256i xi = _mm256_castps_si256(x);
  const __m256i u = _mm256_and_si256(xi, f.absm);
  const __m256i nm = _mm256_srai_epi32(xi, 31);  // -1 for x < 0 (ties away from 0 there)
  __m256i k = _mm256_sub_epi32(_mm256_srl_epi32(_mm256_sub_epi32(_mm256_add_epi32(u, f.hm1), nm), f.s), f.off);
  // |x| past the midpoint between 0 and magnitude 1 (at it for x < 0) is at least 1
  k = _mm256_max_epi32(k, _mm256_sub_epi32(f.zero, _mm256_cmpgt_epi32(u, _mm256_add_epi32(f.mid, nm))));
  return _mm256_add_epi32(f.c127, _mm256_sub_epi32(_mm256_xor_si256(k, nm), nm));
}

// 32 codes (bytes) -> 4 x 8 values
template <bool SYM>
__attribute__((always_inline)) inline void f8x32(const uint8_t* c, const F8V& f, __m256 out[4]) {
  for (int k = 0; k < 4; ++k)
    out[k] = f8_decode<SYM>(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(c + 8 * k))), f);
}
#endif

constexpr int64_t FUNIT = 32;

// One block's new state in flight between the update and the requantization.
struct Slot {
  float* s0;  // new exp_avg
  float* s1;  // new exp_avg_sq
  float* sp;  // new param
  float am[2];
};

template <int BITS>
struct AdamWFast {
  const float* mids0;
  const float* mids1;
  F8V fa, fb;  // 8-bit: the float maps, decoded and encoded in registers
  const Q4V q40, q41;
  const D4V d40, d41;
  __m256 vdecay, vb1, vomb1, vb2, vomb2, vibc2, veps, vss, vgs;

  AdamWFast(const QTab& t0, const QTab& t1, const FMap* g0, const FMap* g1, const float* h)
      : mids0(t0.mids), mids1(t1.mids), q40(t0.mids), q41(t1.mids),
        d40(t0.values), d41(t1.values) {
    if (BITS == 8) {  // run() checked that both are float maps
      fa = F8V(*g0);
      fb = F8V(*g1);
    }
    vdecay = _mm256_set1_ps(h[0]);
    vb1 = _mm256_set1_ps(h[1]);
    vomb1 = _mm256_set1_ps(h[2]);
    vb2 = _mm256_set1_ps(h[3]);
    vomb2 = _mm256_set1_ps(h[4]);
    vibc2 = _mm256_set1_ps(h[5]);
    veps = _mm256_set1_ps(h[6]);
    vss = _mm256_set1_ps(h[7]);
    vgs = _mm256_set1_ps(h[8]);
  }

  // ---- the update (same operations as the eager path, no fma) of 32 elements at i;
  // m0, v0: the old states' code book values (not yet times absmax)
  __attribute__((always_inline)) inline void update_unit(int64_t i, const __m256* m0, const __m256* v0,
                                                         __m256 a0, __m256 a1, const float* g, const float* P,
                                                         const Slot& o, __m256i& mx0, __m256i& mx1) const {
    for (int k = 0; k < 4; ++k) update_group(i + 8 * k, m0[k], v0[k], a0, a1, g, P, o, mx0, mx1);
  }

  __attribute__((always_inline)) inline void update_group(int64_t j, __m256 m0k, __m256 v0k, __m256 a0, __m256 a1,
                                                          const float* g, const float* P, const Slot& o,
                                                          __m256i& mx0, __m256i& mx1) const {
    update_tail(j, update_head(j, m0k, v0k, a0, a1, g, o, mx0, mx1), P, o);
  }

  // an update in two halves, so that a pipelined loop can put work between them: the
  // new states, their absmax and the division m / den (returned); then the parameter.
  // |m| and v (>= 0 or NaN) as unsigned ints: the max is the absmax, NaN/Inf >= 0x7f800000
  __attribute__((always_inline)) inline __m256 update_head(int64_t j, __m256 m0k, __m256 v0k, __m256 a0, __m256 a1,
                                                           const float* g, const Slot& o, __m256i& mx0,
                                                           __m256i& mx1) const {
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g + j), vgs);
    const __m256 m = _mm256_add_ps(_mm256_mul_ps(vb1, _mm256_mul_ps(m0k, a0)), _mm256_mul_ps(vomb1, gi));
    const __m256 v =
        _mm256_add_ps(_mm256_mul_ps(vb2, _mm256_mul_ps(v0k, a1)), _mm256_mul_ps(vomb2, _mm256_mul_ps(gi, gi)));
    const __m256 den = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(v), vibc2), veps);
    _mm256_store_ps(o.s0 + j, m);
    _mm256_store_ps(o.s1 + j, v);
    mx0 = _mm256_max_epu32(mx0, _mm256_castps_si256(_mm256_and_ps(m, absm)));
    mx1 = _mm256_max_epu32(mx1, _mm256_castps_si256(v));
    return _mm256_div_ps(m, den);
  }

  __attribute__((always_inline)) inline void update_tail(int64_t j, __m256 q, const float* P, const Slot& o) const {
    const __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(P + j), vdecay);
    _mm256_store_ps(o.sp + j, _mm256_sub_ps(pi, _mm256_mul_ps(vss, q)));
  }

  static bool finish_absmax(__m256i mx0, __m256i mx1, Slot& o) {
    alignas(32) uint32_t u0[8], u1[8];
    _mm256_store_si256((__m256i*)u0, mx0);
    _mm256_store_si256((__m256i*)u1, mx1);
    uint32_t r0 = 0, r1 = 0;
    for (int k = 0; k < 8; ++k) {
      r0 = u0[k] > r0 ? u0[k] : r0;
      r1 = u1[k] > r1 ? u1[k] : r1;
    }
    o.am[0] = u2f(r0);
    o.am[1] = u2f(r1);
    return r0 < 0x7f800000u && r1 < 0x7f800000u;
  }

  __attribute__((always_inline)) inline void encode_group(int64_t j, const Slot& o, __m256 iv0, __m256 iv1,
                                                          __m256i& r0, __m256i& r1) const {
    const __m256 x0 = _mm256_mul_ps(_mm256_load_ps(o.s0 + j), iv0), x1 = _mm256_mul_ps(_mm256_load_ps(o.s1 + j), iv1);
    if (BITS == 8) {
      r0 = f8_encode<false, true>(x0, fa);
      r1 = f8_encode<false, false>(x1, fb);
    } else {
      r0 = q4v(x0, q40);
      r1 = q4v(x1, q41);
    }
  }

  __attribute__((always_inline)) inline void store_unit(int64_t i, const Slot& o, const __m256i* r0,
                                                        const __m256i* r1, uint8_t* c0, uint8_t* c1, float* P) const {
    if (BITS == 8) {
      pack8x32(c0 + i, r0[0], r0[1], r0[2], r0[3]);
      pack8x32(c1 + i, r1[0], r1[1], r1[2], r1[3]);
    } else {
      pack4x32(c0 + i / 2, r0[0], r0[1], r0[2], r0[3]);
      pack4x32(c1 + i / 2, r1[0], r1[1], r1[2], r1[3]);
    }
    for (int k = 0; k < 4; ++k) _mm256_storeu_ps(P + i + 8 * k, _mm256_load_ps(o.sp + i + 8 * k));
  }

  // ---- requantization of 32 elements at i (4-bit, or 8-bit float maps), with their params
  __attribute__((always_inline)) inline void commit_unit(int64_t i, const Slot& o, __m256 iv0, __m256 iv1,
                                                         uint8_t* c0, uint8_t* c1, float* P) const {
    __m256i r0[4], r1[4];
    for (int k = 0; k < 4; ++k) encode_group(i + 8 * k, o, iv0, iv1, r0[k], r1[k]);
    store_unit(i, o, r0, r1, c0, c1, P);
  }

  // the old states' code book values of 32 elements at i (4-bit, or 8-bit float maps)
  __attribute__((always_inline)) inline void decode_unit(int64_t i, const uint8_t* c0, const uint8_t* c1,
                                                         __m256* m0, __m256* v0) const {
    if (BITS == 8) {
      f8x32<true>(c0 + i, fa, m0);
      f8x32<false>(c1 + i, fb, v0);
    } else {
      d4x32(c0 + i / 2, d40, m0);
      d4x32(c1 + i / 2, d41, v0);
    }
  }

  static float inv_of(float am) { return am > 0.0f ? 1.0f / am : 0.0f; }

  // Update of one block into o. Returns false when a new state element is non-finite
  // (o then holds garbage).
  bool update(const float* g, const float* P, const uint8_t* c0, const uint8_t* c1, float am0, float am1,
              int64_t block, Slot& o) const {
    const __m256 a0 = _mm256_set1_ps(am0), a1 = _mm256_set1_ps(am1);
    __m256i mx0 = _mm256_setzero_si256(), mx1 = _mm256_setzero_si256();
    for (int64_t i = 0; i < block; i += FUNIT) {
      __m256 m0[4], v0[4];
      decode_unit(i, c0, c1, m0, v0);
      update_unit(i, m0, v0, a0, a1, g, P, o, mx0, mx1);
    }
    return finish_absmax(mx0, mx1, o);
  }

  // Requantization of a block updated into o, and its new params and absmax.
  void commit(float* P, uint8_t* c0, uint8_t* c1, float* am0p, float* am1p, int64_t block, const Slot& o) const {
    const float inv0 = inv_of(o.am[0]), inv1 = inv_of(o.am[1]);
    if (!(inv0 < INFINITY && inv1 < INFINITY)) {  // absmax so small that 1/absmax overflows
      requant_exact(o.s0, block, inv0, mids0, BITS, c0, 0);
      requant_exact(o.s1, block, inv1, mids1, BITS, c1, 0);
      std::memcpy(P, o.sp, sizeof(float) * block);
    } else {
      const __m256 iv0 = _mm256_set1_ps(inv0), iv1 = _mm256_set1_ps(inv1);
      for (int64_t i = 0; i < block; i += FUNIT) commit_unit(i, o, iv0, iv1, c0, c1, P);
    }
    *am0p = o.am[0];
    *am1p = o.am[1];
  }

  // 4-bit and 8-bit float maps: update of one block (into o) in the same loop as the
  // commit of another (from q): the sqrt and the division run in their own unit, the
  // requantization on the vector pipes, so the two overlap.
  bool update_commit(const float* g, const float* P, const uint8_t* c0, const uint8_t* c1, float am0, float am1,
                     int64_t block, Slot& o, float* qP, uint8_t* qc0, uint8_t* qc1,
                     float* qam0p, float* qam1p, const Slot& q) const {
    const float inv0 = inv_of(q.am[0]), inv1 = inv_of(q.am[1]);
    if (!(inv0 < INFINITY && inv1 < INFINITY)) {
      commit(qP, qc0, qc1, qam0p, qam1p, block, q);
      return update(g, P, c0, c1, am0, am1, block, o);
    }
    const __m256 iv0 = _mm256_set1_ps(inv0), iv1 = _mm256_set1_ps(inv1);
    const __m256 a0 = _mm256_set1_ps(am0), a1 = _mm256_set1_ps(am1);
    __m256i mx0 = _mm256_setzero_si256(), mx1 = _mm256_setzero_si256();
    for (int64_t i = 0; i < block; i += FUNIT) {
      __m256 m0[4], v0[4];
      decode_unit(i, c0, c1, m0, v0);
      // one group of 8 updated, then one group of the other block requantized: the
      // sqrt/division chains of the update wait in the scheduler among independent
      // integer work instead of ahead of it
      // software pipelining: the divisions are issued first and consumed last, so the
      // requantization of the other block runs while the divider works
      __m256i r0[4], r1[4];
      __m256 dq[4];
      for (int k = 0; k < 4; ++k) dq[k] = update_head(i + 8 * k, m0[k], v0[k], a0, a1, g, o, mx0, mx1);
      for (int k = 0; k < 4; ++k) encode_group(i + 8 * k, q, iv0, iv1, r0[k], r1[k]);
      store_unit(i, q, r0, r1, qc0, qc1, qP);
      for (int k = 0; k < 4; ++k) update_tail(i + 8 * k, dq[k], P, o);
    }
    *qam0p = q.am[0];
    *qam1p = q.am[1];
    return finish_absmax(mx0, mx1, o);
  }
};
#endif

enum Algo { ADAMW = 0, SGD = 1, LION = 2 };

template <int BITS>
void run(int64_t algo, float* P, const float* G, int64_t n, int64_t block, std::vector<uint8_t*> codes,
         std::vector<float*> absmax, std::vector<QTab> tabs, uint8_t* redo, const std::vector<double>& hp,
         const FMap* g0, const FMap* g1) {
  const int64_t nb = (n + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, 16384 / block);
  float hf[16] = {0};
  for (size_t k = 0; k < hp.size() && k < 16; ++k) hf[k] = (float)hp[k];
#if defined(__AVX2__)
  const bool fast_ok = algo == ADAMW && block % FUNIT == 0 &&
                       (BITS == 4 || (g0 != nullptr && g0->ok && g0->sym && g1 != nullptr && g1->ok && !g1->sym));
#endif
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    // block buffers, spaced so that equal indices do not share their low 12 address bits
    // (no false store-to-load dependencies between them)
    constexpr int64_t STRIDE = MAXB + 32;
    alignas(64) float buf[6 * STRIDE];
    alignas(64) int32_t tmp[MAXB];
    float* const s0 = buf;
    float* const s1 = buf + STRIDE;
    float* const np = buf + 2 * STRIDE;
#if defined(__AVX2__)
    std::unique_ptr<AdamWFast<BITS>> fast;
    if (fast_ok) fast.reset(new AdamWFast<BITS>(tabs[0], tabs[1], g0, g1, hf));
    // the blocks of a chunk are pipelined, the update of block b together with the
    // requantization of the previous one (`pend`, in the other slot)
    Slot slots[2] = {{buf, buf + STRIDE, buf + 2 * STRIDE, {0, 0}},
                     {buf + 3 * STRIDE, buf + 4 * STRIDE, buf + 5 * STRIDE, {0, 0}}};
    int64_t pend = -1;  // block whose new state waits in slots[pend_slot]
    int pend_slot = 0;
    auto flush = [&]() {
      if (pend < 0) return;
      const int64_t st = pend * block;
      fast->commit(P + st, codes[0] + st * BITS / 8, codes[1] + st * BITS / 8, absmax[0] + pend, absmax[1] + pend,
                   block, slots[pend_slot]);
      pend = -1;
    };
#endif
    // Every algorithm ends a block the same way: if a new state went non-finite, leave
    // the block untouched and mark it for the exact slow path; else write the params
    // and requantize the states.
    auto commit_block = [&](int64_t b, int64_t start, int64_t cnt, int nstates) {
      float* states[2] = {s0, s1};
      float am[2] = {0.0f, 0.0f};
      bool bad = false;
      for (int k = 0; k < nstates; ++k) am[k] = absmax_check(states[k], cnt, &bad);
      if (bad) {
        redo[b] = 1;
        return;
      }
      std::memcpy(P + start, np, sizeof(float) * cnt);
      for (int k = 0; k < nstates; ++k) {
        quant_block<BITS>(states[k], cnt, block, am[k], tabs[k], codes[k], start, tmp);
        absmax[k][b] = am[k];
      }
    };
    for (int64_t b = b0; b < b1; ++b) {
      if (redo[b]) continue;
      const int64_t start = b * block;
      const int64_t cnt = std::min(block, n - start);
      const float* g = G + start;
      const float* p = P + start;
#if defined(__AVX2__)
      if (fast && cnt == block) {
        uint8_t* c0 = codes[0] + start * BITS / 8;
        uint8_t* c1 = codes[1] + start * BITS / 8;
        const int sl = pend < 0 ? 0 : 1 - pend_slot;
        bool ok;
        if (pend < 0) {
          ok = fast->update(g, p, c0, c1, absmax[0][b], absmax[1][b], block, slots[sl]);
        } else {
          const int64_t qs = pend * block;
          ok = fast->update_commit(g, p, c0, c1, absmax[0][b], absmax[1][b], block, slots[sl], P + qs,
                                   codes[0] + qs * BITS / 8, codes[1] + qs * BITS / 8, absmax[0] + pend,
                                   absmax[1] + pend, slots[pend_slot]);
          pend = -1;
        }
        if (ok) {
          pend = b;
          pend_slot = sl;
        } else {
          redo[b] = 1;
        }
        continue;
      }
      flush();  // the generic code below uses the slot buffers
      if (algo == ADAMW && cnt == block && block % 8 == 0) {
        if (!adamw_block_avx<BITS>(g, P + start, codes[0] + start * BITS / 8, codes[1] + start * BITS / 8,
                                   absmax[0] + b, absmax[1] + b, tabs[0], tabs[1], hf, block, s0, s1, np))
          redo[b] = 1;
        continue;
      }
#endif
      if (algo == ADAMW) {
        const float decay = (float)hp[0], b1c = (float)hp[1], omb1 = (float)hp[2], b2c = (float)hp[3],
                    omb2 = (float)hp[4], ibc2 = (float)hp[5], eps = (float)hp[6], ss = (float)hp[7],
                    gs = (float)hp[8];
        dequant_any<BITS>(codes[0], start, cnt, absmax[0][b], tabs[0].values, s0);
        dequant_any<BITS>(codes[1], start, cnt, absmax[1][b], tabs[1].values, s1);
        int64_t i0 = 0;
#if defined(__AVX2__)
        {
          const __m256 vdecay = _mm256_set1_ps(decay), vb1 = _mm256_set1_ps(b1c), vomb1 = _mm256_set1_ps(omb1),
                       vb2 = _mm256_set1_ps(b2c), vomb2 = _mm256_set1_ps(omb2), vibc2 = _mm256_set1_ps(ibc2),
                       veps = _mm256_set1_ps(eps), vss = _mm256_set1_ps(ss), vgs = _mm256_set1_ps(gs);
          for (; i0 + 8 <= cnt; i0 += 8) {
            const __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g + i0), vgs);
            __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(p + i0), vdecay);
            const __m256 m = _mm256_add_ps(_mm256_mul_ps(vb1, _mm256_loadu_ps(s0 + i0)), _mm256_mul_ps(vomb1, gi));
            const __m256 v = _mm256_add_ps(_mm256_mul_ps(vb2, _mm256_loadu_ps(s1 + i0)),
                                           _mm256_mul_ps(vomb2, _mm256_mul_ps(gi, gi)));
            const __m256 den = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(v), vibc2), veps);
            pi = _mm256_sub_ps(pi, _mm256_mul_ps(vss, _mm256_div_ps(m, den)));
            _mm256_storeu_ps(s0 + i0, m);
            _mm256_storeu_ps(s1 + i0, v);
            _mm256_storeu_ps(np + i0, pi);
          }
        }
#endif
        for (int64_t i = i0; i < cnt; ++i) {
          const float gi = g[i] * gs;
          float pi = p[i] * decay;
          const float m = b1c * s0[i] + omb1 * gi;
          const float v = b2c * s1[i] + omb2 * (gi * gi);
          const float den = std::sqrt(v) * ibc2 + eps;
          pi = pi - ss * (m / den);
          s0[i] = m;
          s1[i] = v;
          np[i] = pi;
        }
        commit_block(b, start, cnt, 2);
      } else if (algo == SGD) {
        const float lr = (float)hp[0], mom = (float)hp[1], omd = (float)hp[2], wd = (float)hp[3],
                    gs = (float)hp[4];
        const bool nesterov = hp[5] != 0.0, first = hp[6] != 0.0, use_wd = wd != 0.0f;
        if (!first) dequant_any<BITS>(codes[0], start, cnt, absmax[0][b], tabs[0].values, s0);
        int64_t i0 = 0;
#if defined(__AVX2__)
        if (!first && !nesterov) {
          const __m256 vlr = _mm256_set1_ps(lr), vmom = _mm256_set1_ps(mom), vomd = _mm256_set1_ps(omd),
                       vwd = _mm256_set1_ps(wd), vgs = _mm256_set1_ps(gs);
          for (; i0 + 8 <= cnt; i0 += 8) {
            const __m256 pv = _mm256_loadu_ps(p + i0);
            __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g + i0), vgs);
            if (use_wd) gi = _mm256_add_ps(gi, _mm256_mul_ps(vwd, pv));
            const __m256 buf = _mm256_add_ps(_mm256_mul_ps(vmom, _mm256_loadu_ps(s0 + i0)), _mm256_mul_ps(vomd, gi));
            _mm256_storeu_ps(np + i0, _mm256_sub_ps(pv, _mm256_mul_ps(vlr, buf)));
            _mm256_storeu_ps(s0 + i0, buf);
          }
        }
#endif
        for (int64_t i = i0; i < cnt; ++i) {
          float gi = g[i] * gs;
          if (use_wd) gi = gi + wd * p[i];
          const float buf = first ? gi : mom * s0[i] + omd * gi;
          const float d = nesterov ? gi + mom * buf : buf;
          np[i] = p[i] - lr * d;
          s0[i] = buf;
        }
        commit_block(b, start, cnt, 1);
      } else {  // LION
        const float decay = (float)hp[0], lr = (float)hp[1], b1c = (float)hp[2], omb1 = (float)hp[3],
                    b2c = (float)hp[4], omb2 = (float)hp[5], gs = (float)hp[6];
        dequant_any<BITS>(codes[0], start, cnt, absmax[0][b], tabs[0].values, s0);
        int64_t i0 = 0;
#if defined(__AVX2__)
        {
          const __m256 vdecay = _mm256_set1_ps(decay), vlr = _mm256_set1_ps(lr), vb1 = _mm256_set1_ps(b1c),
                       vomb1 = _mm256_set1_ps(omb1), vb2 = _mm256_set1_ps(b2c), vomb2 = _mm256_set1_ps(omb2),
                       vgs = _mm256_set1_ps(gs), vone = _mm256_set1_ps(1.0f), vz = _mm256_setzero_ps();
          for (; i0 + 8 <= cnt; i0 += 8) {
            const __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g + i0), vgs);
            __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(p + i0), vdecay);
            const __m256 m0 = _mm256_loadu_ps(s0 + i0);
            const __m256 c = _mm256_add_ps(_mm256_mul_ps(vb1, m0), _mm256_mul_ps(vomb1, gi));
            const __m256 sg = _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(c, vz, _CMP_GT_OQ), vone),
                                            _mm256_and_ps(_mm256_cmp_ps(c, vz, _CMP_LT_OQ), vone));
            pi = _mm256_sub_ps(pi, _mm256_mul_ps(vlr, sg));
            _mm256_storeu_ps(s0 + i0, _mm256_add_ps(_mm256_mul_ps(vb2, m0), _mm256_mul_ps(vomb2, gi)));
            _mm256_storeu_ps(np + i0, pi);
          }
        }
#endif
        for (int64_t i = i0; i < cnt; ++i) {
          const float gi = g[i] * gs;
          float pi = p[i] * decay;
          const float c = b1c * s0[i] + omb1 * gi;
          const float sg = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
          pi = pi - lr * sg;
          s0[i] = b2c * s0[i] + omb2 * gi;
          np[i] = pi;
        }
        commit_block(b, start, cnt, 1);
      }
    }
#if defined(__AVX2__)
    flush();
#endif
  });
}

void step(int64_t algo, torch::Tensor p, torch::Tensor g, std::vector<torch::Tensor> codes,
          std::vector<torch::Tensor> absmax, std::vector<torch::Tensor> values, std::vector<torch::Tensor> table,
          std::vector<torch::Tensor> mids, std::vector<int64_t> tparams, int64_t bits, int64_t block,
          torch::Tensor redo, std::vector<double> hp) {
  TORCH_CHECK(p.is_contiguous() && g.is_contiguous(), "p and g must be contiguous");
  TORCH_CHECK(p.scalar_type() == torch::kFloat32 && g.scalar_type() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(block > 0 && block <= MAXB && block % 2 == 0, "bad block size");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  const size_t ns = codes.size();
  TORCH_CHECK(absmax.size() == ns && values.size() == ns && table.size() == ns && mids.size() == ns &&
                  tparams.size() == 4 * ns,
              "state list sizes differ");
  TORCH_CHECK(ns == (algo == ADAMW ? 2u : 1u), "wrong number of states for the algorithm");
  const int64_t n = p.numel();
  TORCH_CHECK(g.numel() == n, "grad size differs");
  const int64_t nb = (n + block - 1) / block;
  TORCH_CHECK(redo.numel() == nb && redo.scalar_type() == torch::kUInt8, "redo must be uint8[nblocks]");
  std::vector<uint8_t*> cp;
  std::vector<float*> ap;
  std::vector<QTab> tabs;
  for (size_t k = 0; k < ns; ++k) {
    TORCH_CHECK(codes[k].is_contiguous() && codes[k].scalar_type() == torch::kUInt8, "codes must be uint8");
    TORCH_CHECK(codes[k].numel() == nb * block * bits / 8, "codes size differs");
    TORCH_CHECK(absmax[k].is_contiguous() && absmax[k].numel() == nb && absmax[k].scalar_type() == torch::kFloat32,
                "absmax must be fp32[nblocks]");
    TORCH_CHECK(values[k].numel() == (1 << bits), "map size differs from bits");
    cp.push_back(codes[k].data_ptr<uint8_t>());
    ap.push_back(absmax[k].data_ptr<float>());
    tabs.push_back(make_tab(values[k], table[k], mids[k], tparams, k));
  }
  if (n == 0) return;
  const FMap* g0 = nullptr;
  const FMap* g1 = nullptr;
  if (bits == 8 && algo == ADAMW) {
    g0 = &fmap_cached(tabs[0].values);
    g1 = &fmap_cached(tabs[1].values);
  }
  if (bits == 8)
    run<8>(algo, p.data_ptr<float>(), g.data_ptr<float>(), n, block, cp, ap, tabs, redo.data_ptr<uint8_t>(), hp, g0,
           g1);
  else
    run<4>(algo, p.data_ptr<float>(), g.data_ptr<float>(), n, block, cp, ap, tabs, redo.data_ptr<uint8_t>(), hp, g0,
           g1);
}

// The float-map codec on its own, for tests: codes (int32) of normalised x, or -1 for all
// when `values` is not a float map or AVX2 is missing.
torch::Tensor float_map_codes(torch::Tensor x, torch::Tensor values) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat32, "x must be contiguous fp32");
  TORCH_CHECK(values.is_contiguous() && values.numel() == 256 && values.scalar_type() == torch::kFloat32,
              "values must be 256 fp32");
  auto out = torch::full({x.numel()}, -1, torch::kInt32);
  const FMap& f = fmap_cached(values.data_ptr<float>());
  if (!f.ok) return out;
#if defined(__AVX2__)
  const F8V v(f);
  const float* px = x.data_ptr<float>();
  int32_t* po = out.data_ptr<int32_t>();
  const int64_t n = x.numel();
  at::parallel_for(0, n / 8, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i)
      _mm256_storeu_si256((__m256i*)(po + 8 * i), v.sym ? f8_encode<true, true>(_mm256_loadu_ps(px + 8 * i), v)
                                                   : f8_encode<true, false>(_mm256_loadu_ps(px + 8 * i), v));
  });
  for (int64_t i = n / 8 * 8; i < n; ++i) {
    alignas(32) float t[8] = {px[i], 0, 0, 0, 0, 0, 0, 0};
    alignas(32) int32_t r[8];
    _mm256_store_si256((__m256i*)r, v.sym ? f8_encode<true, true>(_mm256_load_ps(t), v)
                                          : f8_encode<true, false>(_mm256_load_ps(t), v));
    po[i] = r[0];
  }
#endif
  return out;
}

// ... and the code book values of codes (int32 in [0, 256)), or NaN without AVX2
torch::Tensor float_map_values(torch::Tensor codes, torch::Tensor values) {
  TORCH_CHECK(codes.is_contiguous() && codes.scalar_type() == torch::kInt32, "codes must be contiguous int32");
  TORCH_CHECK(values.is_contiguous() && values.numel() == 256 && values.scalar_type() == torch::kFloat32,
              "values must be 256 fp32");
  TORCH_CHECK(codes.numel() == 0 || (codes.min().item<int32_t>() >= 0 && codes.max().item<int32_t>() < 256),
              "codes must be in [0, 256)");
  const int64_t n = codes.numel(), n8 = (n + 7) / 8 * 8;
  auto padded = torch::zeros({n8}, torch::kInt32);
  padded.narrow(0, 0, n).copy_(codes);
  auto out = torch::full({n8}, NAN, torch::kFloat32);
  const FMap& f = fmap_cached(values.data_ptr<float>());
  if (!f.ok) return out.narrow(0, 0, n).clone();
#if defined(__AVX2__)
  const F8V v(f);
  const int32_t* pc = padded.data_ptr<int32_t>();
  float* po = out.data_ptr<float>();
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256i q = _mm256_loadu_si256((const __m256i*)(pc + i));
    _mm256_storeu_ps(po + i, v.sym ? f8_decode<true>(q, v) : f8_decode<false>(q, v));
  }
#endif
  return out.narrow(0, 0, n).clone();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step", &step, "fused block-wise quantized optimizer step (CPU)");
  m.def("float_map_codes", &float_map_codes, "float-map encoder (tests)");
  m.def("float_map_values", &float_map_values, "float-map decoder (tests)");
}
