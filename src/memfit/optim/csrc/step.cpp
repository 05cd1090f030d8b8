// Fused CPU optimizer steps for memfit.optim with block-wise quantized states.
//
// One pass per block of `block` elements, split over threads with at::parallel_for:
//   1. dequantize the block's states (code book value * absmax) into stack buffers,
//   2. update param and states in fp32 (AdamW, SGD with momentum, or Lion),
//   3. if any new state element is non-finite: write NOTHING for this block and flag
//      it in `redo` (Python redoes it on the eager path, which keeps non-finite state
//      elements exactly in a side table); blocks already flagged on entry are skipped,
//   4. else store the params, compute the new absmax and requantize to nearest with a
//      lookup table (sign/exponent/top-mantissa bits -> code of the cell's lower end
//      and the one midpoint inside it; see memfit/codec/dynamic.py).
//
// The arithmetic mirrors memfit/optim/_eager.py operation by operation in fp32 with no
// fused multiply-add (built with -ffp-contract=off), so both paths give identical bits.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
  const __m256 inv0 = _mm256_set1_ps(am0 > 0.0f ? 1.0f / am0 : 0.0f);
  const __m256 inv1 = _mm256_set1_ps(am1 > 0.0f ? 1.0f / am1 : 0.0f);
  if (BITS == 8) {
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
#if defined(__AVX2__)
  if (BITS == 4) quant16_avx(x, cnt, inv, t, tmp);
  else quant_avx(x, cnt, inv, t, tmp);
#else
  if (BITS == 4) for (int64_t i = 0; i < cnt; ++i) tmp[i] = quant_count(x[i] * inv, t, 15);
  else for (int64_t i = 0; i < cnt; ++i) tmp[i] = quant_one(x[i] * inv, t);
#endif
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

enum Algo { ADAMW = 0, SGD = 1, LION = 2 };

template <int BITS>
void run(int64_t algo, float* P, const float* G, int64_t n, int64_t block, std::vector<uint8_t*> codes,
         std::vector<float*> absmax, std::vector<QTab> tabs, uint8_t* redo, const std::vector<double>& hp) {
  const int64_t nb = (n + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, 16384 / block);
  float hf[16] = {0};
  for (size_t k = 0; k < hp.size() && k < 16; ++k) hf[k] = (float)hp[k];
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    alignas(64) float s0[MAXB];
    alignas(64) float s1[MAXB];
    alignas(64) float np[MAXB];
    alignas(64) int32_t tmp[MAXB];
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
  if (bits == 8)
    run<8>(algo, p.data_ptr<float>(), g.data_ptr<float>(), n, block, cp, ap, tabs, redo.data_ptr<uint8_t>(), hp);
  else
    run<4>(algo, p.data_ptr<float>(), g.data_ptr<float>(), n, block, cp, ap, tabs, redo.data_ptr<uint8_t>(), hp);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step", &step, "fused block-wise quantized optimizer step (CPU)");
}
