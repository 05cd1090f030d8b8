// Fused CPU kernels for memfit.codec: block-wise int / fp8 quantization and 1-bit
// packing. Arithmetic mirrors memfit/codec/_eager.py exactly (fp32, no FMA: build with
// -ffp-contract=off), so round-to-nearest gives the same codes, scales and offsets.
//
// One pass per block: min/max (+ non-finite flag) over the block, scale, quantize and
// pack, written straight to the output. Blocks are split over threads with
// at::parallel_for (OpenMP; honours torch.set_num_threads). Inner loops are plain
// fixed-width loops over small stack arrays so that -O3 vectorizes them.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace {

// Fresh memory is expensive on many machines: every 4 KiB page faults on first touch
// (measured here: writing a fresh 48 MB tensor ran at 0.8 GB/s, against 2.9 GB/s into
// an existing one). Plain autograd never allocates in backward for its saved tensors,
// but decompression must, so large outputs ask the kernel for transparent huge pages:
// 512x fewer faults (2.1 GB/s in the same test). A hint only; harmless if THP is off.
torch::Tensor empty_for_output(int64_t n, const torch::TensorOptions& options) {
  auto out = torch::empty({n}, options);
#ifdef __linux__
  const size_t huge = size_t(1) << 21;
  const size_t nbytes = static_cast<size_t>(out.numel()) * out.element_size();
  if (nbytes >= 2 * huge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (p + huge - 1) & ~(huge - 1);
    const uintptr_t last = (p + nbytes) & ~(huge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

constexpr int64_t CH = 256;  // elements per inner chunk (a multiple of 8)

// ---------------------------------------------------------------- element types
// GCC/Clang vector extensions: 8 fp32 lanes (one AVX register, two SSE ones).
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));

template <class V, class P>
inline V vload(const P* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <class V, class P>
inline void vstore(P* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <class To, class From>
inline To bitcast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}

// Each element type: storage type T, scalar load/store, and 8-wide load8/store8.
struct F32 {
  using T = float;
  static inline float load(T v) { return v; }
  static inline T store(float f) { return f; }
  static inline v8f load8(const T* p) { return vload<v8f>(p); }
  static inline void store8(T* p, v8f v) { vstore(p, v); }
};

struct BF16 {
  using T = uint16_t;
  static inline float load(T v) { return bitcast<float>(static_cast<uint32_t>(v) << 16); }
  static inline T store(float f) {  // round to nearest even, NaN -> 0x7FC0, as c10::BFloat16
    const uint32_t u = bitcast<uint32_t>(f);
    if (f != f) return 0x7FC0;
    return static_cast<T>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  static inline v8f load8(const T* p) {
    return bitcast<v8f>(__builtin_convertvector(vload<v8u16>(p), v8u32) << 16);
  }
  static inline void store8(T* p, v8f v) {
    const v8u32 u = bitcast<v8u32>(v);
    v8u32 r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const v8u32 qnan = {0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u};
    r = bitcast<v8u32>(v != v) ? qnan : r;
    vstore(p, __builtin_convertvector(r, v8u16));
  }
};

#if defined(__F16C__)
// Hardware conversions (vcvtph2ps / vcvtps2ph, IEEE round to nearest even: the same
// results as c10::Half).
struct F16 {
  using T = uint16_t;
  static inline float load(T v) { return _cvtsh_ss(v); }
  static inline T store(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
  static inline v8f load8(const T* p) {
    return bitcast<v8f>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static inline void store8(T* p, v8f v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(bitcast<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
  }
};
#else
struct F16 {
  using T = c10::Half;
  static inline float load(T v) { return static_cast<float>(v); }
  static inline T store(float f) { return c10::Half(f); }
  static inline v8f load8(const T* p) {
    float t[8];
    for (int k = 0; k < 8; ++k) t[k] = static_cast<float>(p[k]);
    return vload<v8f>(t);
  }
  static inline void store8(T* p, v8f v) {
    for (int k = 0; k < 8; ++k) p[k] = c10::Half(v[k]);
  }
};
#endif

inline bool is_finite(float x) { return std::fabs(x) <= std::numeric_limits<float>::max(); }

inline v8f splat(float f) { return v8f{f, f, f, f, f, f, f, f}; }

// ---------------------------------------------------------------- block min / max
// Min and max over the finite elements of x[0, n); lo = hi = 0 when there are none.
// Returns whether any element was non-finite.
template <class E>
inline bool block_min_max(const typename E::T* x, int64_t n, float& lo, float& hi) {
  constexpr float INF = std::numeric_limits<float>::infinity();
  v8f mn = {INF, INF, INF, INF, INF, INF, INF, INF};
  v8f mx = -mn;
  v8i bad = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t nv = n / 8 * 8;
  for (int64_t j = 0; j < nv; j += 8) {
    const v8f v = E::load8(x + j);
    mn = v < mn ? v : mn;  // NaN never wins a comparison
    mx = v > mx ? v : mx;
    const v8f d = v - v;   // NaN exactly for +-inf and NaN
    bad |= d != d;
  }
  float a = INF, b = -INF;
  int any_bad = 0;
  for (int k = 0; k < 8; ++k) {
    a = mn[k] < a ? mn[k] : a;
    b = mx[k] > b ? mx[k] : b;
    any_bad |= bad[k];
  }
  for (int64_t j = nv; j < n; ++j) {
    const float v = E::load(x[j]);
    a = v < a ? v : a;
    b = v > b ? v : b;
    any_bad |= !is_finite(v);
  }
  if (any_bad) {  // rare: redo, skipping the infinities (NaNs are skipped already)
    a = INF;
    b = -INF;
    for (int64_t j = 0; j < n; ++j) {
      const float v = E::load(x[j]);
      if (is_finite(v)) {
        a = v < a ? v : a;
        b = v > b ? v : b;
      }
    }
  }
  if (a > b) { a = 0.0f; b = 0.0f; }  // no finite element
  lo = a;
  hi = b;
  return any_bad != 0;
}

// ---------------------------------------------------------------- stochastic noise
inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint32_t fmix32(uint32_t h) {  // murmur3 finalizer
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// u in [0, 1) (24 random bits) for global element index idx: a counter-based hash of
// (seed, idx), so the noise does not depend on how blocks are split over threads.
inline float noise_at(uint32_t k0, uint32_t k1, uint32_t lo32, uint32_t hi32) {
  const uint32_t h = fmix32((lo32 ^ k0) + (hi32 + k1) * 0x9E3779B1u);
  return static_cast<float>(static_cast<int32_t>(h >> 8)) * (1.0f / 16777216.0f);
}

inline void fill_noise(float* u, int64_t len, uint64_t idx0, uint32_t k0, uint32_t k1) {
  const uint32_t hi = static_cast<uint32_t>(idx0 >> 32);
  if (static_cast<uint32_t>((idx0 + len - 1) >> 32) == hi) {
    const uint32_t lo = static_cast<uint32_t>(idx0);
    for (int64_t k = 0; k < len; ++k) u[k] = noise_at(k0, k1, lo + static_cast<uint32_t>(k), hi);
  } else {  // the chunk straddles a multiple of 2**32
    for (int64_t k = 0; k < len; ++k) {
      const uint64_t i = idx0 + static_cast<uint64_t>(k);
      u[k] = noise_at(k0, k1, static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32));
    }
  }
}

// ---------------------------------------------------------------- packing
// q[0, len) (len a multiple of 8) -> codes, element 8/BITS*i + j in bits [BITS*j, BITS*(j+1)).
template <int BITS>
inline void pack_chunk(const uint8_t* q, int64_t len, uint8_t* out) {
  if constexpr (BITS == 8) {
    std::memcpy(out, q, len);
  } else if constexpr (BITS == 4) {
    uint16_t w[CH / 2];
    std::memcpy(w, q, len);
    for (int64_t i = 0; i < len / 2; ++i) out[i] = static_cast<uint8_t>(w[i] | (w[i] >> 4));
  } else {
    uint32_t w[CH / 4];
    std::memcpy(w, q, len);
    for (int64_t i = 0; i < len / 4; ++i) {
      uint32_t v = w[i] | (w[i] >> 6);
      out[i] = static_cast<uint8_t>(v | (v >> 12));
    }
  }
}

// codes for elements [0, len) -> q[0, len rounded up to a whole byte of codes)
template <int BITS>
inline void unpack_chunk(const uint8_t* c, int64_t len, uint8_t* q) {
  if constexpr (BITS == 8) {
    std::memcpy(q, c, len);
  } else if constexpr (BITS == 4) {
    const int64_t nbytes = (len + 1) / 2;
    uint16_t w[CH / 2];
    for (int64_t i = 0; i < nbytes; ++i) {
      const uint16_t v = c[i];
      w[i] = static_cast<uint16_t>((v | (v << 4)) & 0x0F0Fu);
    }
    std::memcpy(q, w, nbytes * 2);
  } else {
    const int64_t nbytes = (len + 3) / 4;
    uint32_t w[CH / 4];
    for (int64_t i = 0; i < nbytes; ++i) {
      const uint32_t v = c[i];
      w[i] = (v | (v << 6) | (v << 12) | (v << 18)) & 0x03030303u;
    }
    std::memcpy(q, w, nbytes * 4);
  }
}

// ---------------------------------------------------------------- int quantize
struct QParams {
  int64_t block;
  bool symmetric;
  bool stochastic;
  float levels;  // divisor of the scale: 2**bits - 1, or mid for symmetric
  float off;     // 0, or mid for symmetric
  float top;     // largest code
  uint32_t k0, k1;
};

// Quantize one block: x[0, block) readable, of which [0, nvalid) are real (the rest
// are zero padding, quantized as 0.0 like the eager reference does).
template <class E, int BITS>
inline void quant_block(const typename E::T* x, int64_t nvalid, const QParams& p, uint64_t idx0,
                        uint8_t* codes, float* scale_out, float* lo_out, bool* nf_out) {
  float lo, hi;
  *nf_out = block_min_max<E>(x, nvalid, lo, hi);
  float scale;
  if (p.symmetric) {
    scale = std::max(std::fabs(lo), std::fabs(hi)) / p.levels;
  } else {
    scale = (hi - lo) / p.levels;
  }
  const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
  *scale_out = scale;
  if (lo_out) *lo_out = lo;
  const float sub = p.symmetric ? 0.0f : lo;  // x - 0 == x exactly
  const v8f vsub = splat(sub), vinv = splat(inv), voff = splat(p.off), vtop = splat(p.top);
  const v8f half = splat(0.5f), zero = splat(0.0f);
  alignas(64) uint8_t q[CH];
  alignas(64) float u[CH];
  alignas(64) float f[CH];
  for (int64_t c0 = 0; c0 < p.block; c0 += CH) {
    const int64_t len = std::min(CH, p.block - c0);
    const typename E::T* xc = x + c0;
    if (p.stochastic) fill_noise(u, len, idx0 + static_cast<uint64_t>(c0), p.k0, p.k1);
    for (int64_t k = 0; k < len; k += 8) {
      const v8f r = p.stochastic ? vload<v8f>(u + k) : half;
      v8f v = ((E::load8(xc + k) - vsub) * vinv + voff) + r;
      v = v > zero ? v : zero;  // also maps NaN to 0
      v = v < vtop ? v : vtop;
      vstore(f + k, v);
    }
    // v >= 0, so truncation is the floor; a plain loop, which the compiler narrows
    // to bytes with packs (a vector-extension convert would be scalarized).
    for (int64_t k = 0; k < len; ++k) q[k] = static_cast<uint8_t>(static_cast<int32_t>(f[k]));
    pack_chunk<BITS>(q, len, codes + c0 * BITS / 8);
  }
}

// Per-channel scaling (``ci``, one multiplier per column of rows of ``C`` elements, or
// null): such blocks are multiplied into a zero-padded fp32 copy first, as is the last
// partial block, so that quant_block sees what the eager reference quantizes.
template <class E, int BITS>
void quantize_int_impl(const torch::Tensor& x, const QParams& p, const float* ci, int64_t C,
                       torch::Tensor& codes, torch::Tensor& scale, float* lo_ptr, torch::Tensor& nf) {
  using T = typename E::T;
  const int64_t n = x.numel();
  const int64_t block = p.block;
  const int64_t nb = (n + block - 1) / block;
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  bool* np = nf.data_ptr<bool>();
  const int64_t grain = std::max<int64_t>(1, 32768 / block);
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block;
      const int64_t nvalid = std::min(block, n - start);
      uint8_t* cb = cp + start * BITS / 8;
      float* lb = lo_ptr ? lo_ptr + b : nullptr;
      if (nvalid == block && ci == nullptr) {
        quant_block<E, BITS>(xp + start, block, p, static_cast<uint64_t>(start), cb, sp + b, lb, np + b);
        continue;
      }
      buf.resize(block);
      float* f = buf.data();
      const T* xs = xp + start;
      if (ci != nullptr) {
        int64_t c = start % C;
        for (int64_t j = 0; j < nvalid;) {  // runs of one row: a plain, vectorizable loop
          const int64_t run = std::min(nvalid - j, C - c);
          for (int64_t k = 0; k < run; ++k) f[j + k] = E::load(xs[j + k]) * ci[c + k];
          j += run;
          c = 0;
        }
      } else {
        for (int64_t j = 0; j < nvalid; ++j) f[j] = E::load(xs[j]);
      }
      std::fill(f + nvalid, f + block, 0.0f);
      quant_block<F32, BITS>(f, nvalid, p, static_cast<uint64_t>(start), cb, sp + b, lb, np + b);
    }
  });
}

template <class E>
void quantize_int_bits(int64_t bits, const torch::Tensor& x, const QParams& p, const float* ci, int64_t C,
                       torch::Tensor& codes, torch::Tensor& scale, float* lo_ptr, torch::Tensor& nf) {
  if (bits == 8) quantize_int_impl<E, 8>(x, p, ci, C, codes, scale, lo_ptr, nf);
  else if (bits == 4) quantize_int_impl<E, 4>(x, p, ci, C, codes, scale, lo_ptr, nf);
  else quantize_int_impl<E, 2>(x, p, ci, C, codes, scale, lo_ptr, nf);
}

// The per-column multipliers of an optional ``[C]`` fp32 tensor, or null; checks that
// ``n`` elements are whole rows of C.
const float* column_factors(const std::optional<torch::Tensor>& t, int64_t n, int64_t& C) {
  C = 1;
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->is_contiguous(),
              "channel factors must be a contiguous 1-D float32 CPU tensor");
  C = t->numel();
  TORCH_CHECK(C > 0 && n % C == 0, "the tensor is not whole rows of ", C, " channels");
  return t->data_ptr<float>();
}

void check_input(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "memfit cpp kernels: tensor must be on the CPU");
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "memfit cpp kernels: need a contiguous 1-D tensor");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "memfit cpp kernels: need float32, bfloat16 or float16, got ", dt);
}

std::vector<torch::Tensor> quantize_int(const torch::Tensor& x, int64_t bits, int64_t block,
                                        bool symmetric, bool stochastic, int64_t seed,
                                        const std::optional<torch::Tensor>& col_inv) {
  check_input(x);
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "bits must be 8, 4 or 2");
  TORCH_CHECK(block >= 8 && block % 8 == 0, "block must be a positive multiple of 8");
  const int64_t n = x.numel();
  const int64_t nb = (n + block - 1) / block;
  auto f32 = x.options().dtype(at::kFloat);
  auto codes = empty_for_output(nb * block * bits / 8, x.options().dtype(at::kByte));
  auto scale = torch::empty({nb}, f32);
  auto lo = symmetric ? torch::Tensor() : torch::empty({nb}, f32);
  auto nf = torch::empty({nb}, x.options().dtype(at::kBool));
  QParams p;
  p.block = block;
  p.symmetric = symmetric;
  p.stochastic = stochastic;
  const int64_t mid = (int64_t{1} << (bits - 1)) - 1;
  p.levels = symmetric ? static_cast<float>(mid) : static_cast<float>((1 << bits) - 1);
  p.off = symmetric ? static_cast<float>(mid) : 0.0f;
  p.top = symmetric ? static_cast<float>(2 * mid) : static_cast<float>((1 << bits) - 1);
  const uint64_t k = splitmix64(static_cast<uint64_t>(seed));
  p.k0 = static_cast<uint32_t>(k);
  p.k1 = static_cast<uint32_t>(k >> 32);
  float* lo_ptr = symmetric ? nullptr : lo.data_ptr<float>();
  int64_t C;
  const float* ci = column_factors(col_inv, n, C);
  switch (x.scalar_type()) {
    case at::kFloat: quantize_int_bits<F32>(bits, x, p, ci, C, codes, scale, lo_ptr, nf); break;
    case at::kBFloat16: quantize_int_bits<BF16>(bits, x, p, ci, C, codes, scale, lo_ptr, nf); break;
    default: quantize_int_bits<F16>(bits, x, p, ci, C, codes, scale, lo_ptr, nf); break;
  }
  return {codes, scale, lo, nf};
}

// ---------------------------------------------------------------- int dequantize
template <class E, int BITS>
void dequantize_int_impl(const uint8_t* cp, const float* sp, const float* lp, const float* cs, int64_t C,
                         int64_t block, int64_t n, float mid, typename E::T* op) {
  const int64_t nb = (n + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, 32768 / block);
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    alignas(64) uint8_t q[CH];
    alignas(64) float fbuf[CH];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block;
      const int64_t nvalid = std::min(block, n - start);
      const float scale = sp[b];
      const uint8_t* cb = cp + start * BITS / 8;
      typename E::T* ob = op + start;
      for (int64_t c0 = 0; c0 < nvalid; c0 += CH) {
        const int64_t len = std::min(CH, nvalid - c0);
        unpack_chunk<BITS>(cb + c0 * BITS / 8, len, q);
        typename E::T* oc = ob + c0;
        // plain loops: the compiler vectorizes the byte -> float widening
        float* f = std::is_same<E, F32>::value ? reinterpret_cast<float*>(oc) : fbuf;
        if (lp) {
          const float lo = lp[b];
          for (int64_t k = 0; k < len; ++k) f[k] = lo + static_cast<float>(q[k]) * scale;
        } else {
          for (int64_t k = 0; k < len; ++k) f[k] = (static_cast<float>(q[k]) - mid) * scale;
        }
        if (cs != nullptr) {  // per-channel scaling, undone in fp32 before the output cast
          int64_t c = (start + c0) % C;
          for (int64_t k = 0; k < len;) {
            const int64_t run = std::min(len - k, C - c);
            for (int64_t r = 0; r < run; ++r) f[k + r] *= cs[c + r];
            k += run;
            c = 0;
          }
        }
        if (!std::is_same<E, F32>::value) {
          int64_t k = 0;
          for (; k + 8 <= len; k += 8) E::store8(oc + k, vload<v8f>(f + k));
          for (; k < len; ++k) oc[k] = E::store(f[k]);
        }
      }
    }
  });
}

template <class E>
void dequantize_int_bits(int64_t bits, const uint8_t* cp, const float* sp, const float* lp, const float* cs,
                         int64_t C, int64_t block, int64_t n, float mid, void* op) {
  auto o = static_cast<typename E::T*>(op);
  if (bits == 8) dequantize_int_impl<E, 8>(cp, sp, lp, cs, C, block, n, mid, o);
  else if (bits == 4) dequantize_int_impl<E, 4>(cp, sp, lp, cs, C, block, n, mid, o);
  else dequantize_int_impl<E, 2>(cp, sp, lp, cs, C, block, n, mid, o);
}

void check_codes(const torch::Tensor& codes, const torch::Tensor& scale, int64_t bits, int64_t block, int64_t n) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "codes must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), "scale must be contiguous float32");
  TORCH_CHECK(block >= 8 && block % 8 == 0, "block must be a positive multiple of 8");
  const int64_t nb = scale.numel();
  TORCH_CHECK(n <= nb * block && n > (nb - 1) * block, "n does not match the number of blocks");
  TORCH_CHECK(codes.numel() == nb * block * bits / 8, "codes has the wrong length");
}

torch::Tensor dequantize_int(const torch::Tensor& codes, const torch::Tensor& scale,
                             const std::optional<torch::Tensor>& lo, int64_t bits, int64_t block, int64_t n,
                             at::ScalarType out_dtype, const std::optional<torch::Tensor>& col_scale) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "bits must be 8, 4 or 2");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "out dtype must be float32, bfloat16 or float16");
  auto out = empty_for_output(n, codes.options().dtype(out_dtype));
  if (n == 0) return out;
  check_codes(codes, scale, bits, block, n);
  const float* lp = nullptr;
  if (lo.has_value() && lo->defined()) {
    TORCH_CHECK(lo->scalar_type() == at::kFloat && lo->is_contiguous() && lo->numel() == scale.numel(),
                "lo must be contiguous float32 with one value per block");
    lp = lo->data_ptr<float>();
  }
  const float mid = static_cast<float>((1 << (bits - 1)) - 1);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  int64_t C;
  const float* cs = column_factors(col_scale, n, C);
  switch (out_dtype) {
    case at::kFloat: dequantize_int_bits<F32>(bits, cp, sp, lp, cs, C, block, n, mid, out.data_ptr()); break;
    case at::kBFloat16: dequantize_int_bits<BF16>(bits, cp, sp, lp, cs, C, block, n, mid, out.data_ptr()); break;
    default: dequantize_int_bits<F16>(bits, cp, sp, lp, cs, C, block, n, mid, out.data_ptr()); break;
  }
  return out;
}

// ---------------------------------------------------------------- fp8 (e4m3fn)
constexpr float FP8_MAX = 448.0f;

template <class E>
void quantize_fp8_impl(const torch::Tensor& x, int64_t block, uint8_t* cp, float* sp, bool* np) {
  using T = typename E::T;
  const int64_t n = x.numel();
  const int64_t nb = (n + block - 1) / block;
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 32768 / block);
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block;
      const int64_t nvalid = std::min(block, n - start);
      float lo, hi;
      np[b] = block_min_max<E>(xp + start, nvalid, lo, hi);
      const float scale = std::max(std::fabs(lo), std::fabs(hi)) / FP8_MAX;
      const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
      sp[b] = scale;
      uint8_t* cb = cp + start;
      for (int64_t j = 0; j < block; ++j) {
        float v = j < nvalid ? E::load(xp[start + j]) * inv : 0.0f;
        v = v != v ? 0.0f : std::min(std::max(v, -FP8_MAX), FP8_MAX);
        cb[j] = c10::Float8_e4m3fn(v).x;
      }
    }
  });
}

std::vector<torch::Tensor> quantize_fp8(const torch::Tensor& x, int64_t block) {
  check_input(x);
  TORCH_CHECK(block >= 8 && block % 8 == 0, "block must be a positive multiple of 8");
  const int64_t n = x.numel();
  const int64_t nb = (n + block - 1) / block;
  auto codes = empty_for_output(nb * block, x.options().dtype(at::kByte));
  auto scale = torch::empty({nb}, x.options().dtype(at::kFloat));
  auto nf = torch::empty({nb}, x.options().dtype(at::kBool));
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  bool* np = nf.data_ptr<bool>();
  switch (x.scalar_type()) {
    case at::kFloat: quantize_fp8_impl<F32>(x, block, cp, sp, np); break;
    case at::kBFloat16: quantize_fp8_impl<BF16>(x, block, cp, sp, np); break;
    default: quantize_fp8_impl<F16>(x, block, cp, sp, np); break;
  }
  return {codes, scale, nf};
}

template <class E>
void dequantize_fp8_impl(const uint8_t* cp, const float* sp, int64_t block, int64_t n, void* op) {
  float lut[256];  // exact e4m3fn -> fp32 table
  for (int i = 0; i < 256; ++i) lut[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
  auto o = static_cast<typename E::T*>(op);
  const int64_t nb = (n + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, 32768 / block);
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block;
      const int64_t nvalid = std::min(block, n - start);
      const float scale = sp[b];
      for (int64_t j = 0; j < nvalid; ++j) o[start + j] = E::store(lut[cp[start + j]] * scale);
    }
  });
}

torch::Tensor dequantize_fp8(const torch::Tensor& codes, const torch::Tensor& scale, int64_t block, int64_t n,
                             at::ScalarType out_dtype) {
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "out dtype must be float32, bfloat16 or float16");
  auto out = empty_for_output(n, codes.options().dtype(out_dtype));
  if (n == 0) return out;
  check_codes(codes, scale, 8, block, n);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  switch (out_dtype) {
    case at::kFloat: dequantize_fp8_impl<F32>(cp, sp, block, n, out.data_ptr()); break;
    case at::kBFloat16: dequantize_fp8_impl<BF16>(cp, sp, block, n, out.data_ptr()); break;
    default: dequantize_fp8_impl<F16>(cp, sp, block, n, out.data_ptr()); break;
  }
  return out;
}

// ---------------------------------------------------------------- 1-bit masks
// Byte i = OR_j (uint8)(x[8i + j] << j), exactly as the eager reference (also for
// bytes other than 0/1). With the 8 input bytes as a little-endian word w, the term
// for byte j is (w >> 7j) masked to bits [j, 8).
inline uint8_t pack8(uint64_t w) {
  uint64_t r = w & 0xFFu;
  r |= (w >> 7) & 0xFEu;
  r |= (w >> 14) & 0xFCu;
  r |= (w >> 21) & 0xF8u;
  r |= (w >> 28) & 0xF0u;
  r |= (w >> 35) & 0xE0u;
  r |= (w >> 42) & 0xC0u;
  r |= (w >> 49) & 0x80u;
  return static_cast<uint8_t>(r);
}

torch::Tensor pack_bits(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 1 && x.is_contiguous(), "need a contiguous 1-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kBool || x.scalar_type() == at::kByte, "need a bool or uint8 tensor");
  const int64_t n = x.numel();
  const int64_t nbytes = (n + 7) / 8;
  auto out = torch::empty({nbytes}, x.options().dtype(at::kByte));
  const uint8_t* xp = reinterpret_cast<const uint8_t*>(x.data_ptr());
  uint8_t* op = out.data_ptr<uint8_t>();
  const int64_t full = n / 8;
  const bool is_bool = x.scalar_type() == at::kBool;
  at::parallel_for(0, full, 65536, [&](int64_t i0, int64_t i1) {
#if defined(__AVX2__)
    if (is_bool) {  // bytes are 0/1: shift bit 0 up to bit 7, gather 32 of them at once
      int64_t i = i0;
      for (; i + 4 <= i1; i += 4) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + i * 8));
        const uint32_t m = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_slli_epi16(v, 7)));
        std::memcpy(op + i, &m, 4);
      }
      for (; i < i1; ++i) {
        uint64_t w;
        std::memcpy(&w, xp + i * 8, 8);
        op[i] = pack8(w);
      }
      return;
    }
#endif
    for (int64_t c0 = i0; c0 < i1; c0 += CH) {
      const int64_t len = std::min(CH, i1 - c0);
      uint64_t w[CH];
      std::memcpy(w, xp + c0 * 8, len * 8);
      for (int64_t i = 0; i < len; ++i) op[c0 + i] = pack8(w[i]);
    }
  });
  if (full < nbytes) {
    uint8_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tail, xp + full * 8, n - full * 8);
    uint64_t w;
    std::memcpy(&w, tail, 8);
    op[full] = pack8(w);
  }
  return out;
}

inline uint64_t unpack8(uint8_t c) {
  // broadcast, keep bit j in byte j, then turn each non-zero byte into 1
  const uint64_t y = (static_cast<uint64_t>(c) * 0x0101010101010101ull) & 0x8040201008040201ull;
  return ((y + 0x7F7F7F7F7F7F7F7Full) >> 7) & 0x0101010101010101ull;
}

torch::Tensor unpack_bits(const torch::Tensor& codes, int64_t n) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "codes must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(n >= 0 && (n + 7) / 8 <= codes.numel(), "n is larger than the codes hold");
  auto out = empty_for_output(n, codes.options().dtype(at::kBool));
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  uint8_t* op = reinterpret_cast<uint8_t*>(out.data_ptr());
  const int64_t full = n / 8;
  at::parallel_for(0, full, 65536, [&](int64_t i0, int64_t i1) {
    for (int64_t c0 = i0; c0 < i1; c0 += CH) {
      const int64_t len = std::min(CH, i1 - c0);
      uint64_t w[CH];
      for (int64_t i = 0; i < len; ++i) w[i] = unpack8(cp[c0 + i]);
      std::memcpy(op + c0 * 8, w, len * 8);
    }
  });
  if (full * 8 < n) {
    const uint64_t w = unpack8(cp[full]);
    std::memcpy(op + full * 8, &w, n - full * 8);
  }
  return out;
}


// ---------------------------------------------------------------- channel absmax
// Largest |x| of each column of a row-major [rows, C] tensor: one pass. Row ranges are
// split over threads, each keeping its own column maxima, then combined. NaNs never
// win a comparison (a NaN-only column gives 0); infinities do.
template <class E>
void channel_absmax_rows(const typename E::T* x, int64_t r0, int64_t r1, int64_t C, float* m) {
  for (int64_t r = r0; r < r1; ++r) {
    const typename E::T* row = x + r * C;
    for (int64_t j = 0; j < C; ++j) {
      const float v = std::fabs(E::load(row[j]));
      m[j] = m[j] < v ? v : m[j];
    }
  }
}

torch::Tensor channel_absmax(const torch::Tensor& x, int64_t C) {
  check_input(x);
  TORCH_CHECK(C > 0 && x.numel() % C == 0, "channel_absmax: numel must be a multiple of C");
  const int64_t rows = x.numel() / C;
  const int64_t threads = at::get_num_threads();
  auto partial = torch::zeros({threads, C}, x.options().dtype(at::kFloat));
  float* pp = partial.data_ptr<float>();
  // Rows go to threads in ranges of at least about 256 K elements: smaller tensors are
  // done by one thread, for which waking the others costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / C);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    float* m = pp + at::get_thread_num() * C;
    switch (x.scalar_type()) {
      case at::kFloat: channel_absmax_rows<F32>(x.data_ptr<float>(), r0, r1, C, m); break;
      case at::kBFloat16:
        channel_absmax_rows<BF16>(reinterpret_cast<const uint16_t*>(x.data_ptr()), r0, r1, C, m);
        break;
      default: channel_absmax_rows<F16>(reinterpret_cast<const F16::T*>(x.data_ptr()), r0, r1, C, m); break;
    }
  });
  for (int64_t t = 1; t < threads; ++t)  // thread 0's row collects the others
    for (int64_t j = 0; j < C; ++j) pp[j] = pp[j] < pp[t * C + j] ? pp[t * C + j] : pp[j];
  return partial[0].clone();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "memfit fused CPU codec kernels";
  using gil = py::call_guard<py::gil_scoped_release>;
  m.def("quantize_int", &quantize_int, gil(), "block-wise int quantize -> [codes, scale, lo|undefined, nonfinite]");
  m.def("dequantize_int", &dequantize_int, gil(), "block-wise int dequantize");
  m.def("quantize_fp8", &quantize_fp8, gil(), "block-wise fp8 e4m3 quantize -> [codes, scale, nonfinite]");
  m.def("dequantize_fp8", &dequantize_fp8, gil(), "block-wise fp8 e4m3 dequantize");
  m.def("pack_bits", &pack_bits, gil(), "1-bit packing");
  m.def("unpack_bits", &unpack_bits, gil(), "1-bit unpacking");
  m.def("channel_absmax", &channel_absmax, gil(), "largest |x| of each column of a [rows, C] tensor");
}
