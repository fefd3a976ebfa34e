// CRC32C (Castagnoli, reflected polynomial 0x82F63B78) of a byte buffer: the
// payload checksum of the channel protocol (docs/protocol.md, version 2).
//
// Two implementations, chosen once at load time:
//   * SSE4.2: the `crc32` instruction on 8 bytes at a time, three independent
//     streams interleaved (the instruction has a latency of 3 cycles and a
//     throughput of 1 per cycle, so one stream would run at a third of the
//     possible speed). A block of 3 lanes is combined into one CRC by shifting
//     the earlier lanes' CRC over the later lanes' length: shifting a raw CRC
//     register over n zero bytes is a multiplication by x^(8n) mod P, done
//     here through a 4 x 256 table per lane length (built at load time with a
//     bitwise GF(2) multiply). The function carries target("sse4.2") so the
//     portable build (no -msse4.2) still contains it; __builtin_cpu_supports
//     decides whether it runs.
//   * VPCLMULQDQ + AVX-512 (n >= kFoldMin): carry-less-multiply folding of
//     4 x 64-byte accumulators, the last 16 bytes reduced with `crc32`; about
//     2x the SSE4.2 code in cache (see crc_vpclmul).
//   * PCLMULQDQ 4 x 128-bit folding: tested and callable, not dispatched.
//   * Portable: slicing-by-8 tables.
// Both are exposed as the op `sft::crc32c(Tensor data, int init) -> int` and as
// the C function `sft_crc32c(init, ptr, len)` (called through ctypes by the
// channel, which avoids building a tensor per small buffer; ctypes drops the
// GIL during the call).
#include "crc32c.h"

#include <torch/library.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <nmmintrin.h>
#define SFT_HAVE_SSE42_PATH 1
#else
#define SFT_HAVE_SSE42_PATH 0
#endif

namespace sft::cpu {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // CRC32C, reflected
constexpr size_t kLong = 8192;           // bytes per lane, big blocks
constexpr size_t kShort = 256;           // bytes per lane, small blocks

// a * b mod P, polynomials in the reflected representation (bit 31 = x^0).
uint32_t mulmod(uint32_t a, uint32_t b) {
  uint32_t prod = 0;
  for (int i = 0; i < 32; ++i) {
    if (a & 0x80000000u) prod ^= b;
    a <<= 1;
    b = (b >> 1) ^ ((b & 1u) ? kPoly : 0u);  // b *= x
  }
  return prod;
}

// x^(8 n) mod P: the multiplier that shifts a raw CRC register over n zero bytes.
uint32_t x8n(size_t n) {
  uint32_t result = 0x80000000u;  // x^0
  uint32_t power = 0x00800000u;   // x^8
  while (n) {
    if (n & 1) result = mulmod(result, power);
    power = mulmod(power, power);
    n >>= 1;
  }
  return result;
}

struct Tables {
  uint32_t slice[8][256];       // slicing-by-8
  uint32_t shift_long[4][256];  // c -> c * x^(8 kLong) mod P, byte by byte
  uint32_t shift_short[4][256];
  bool sse42 = false;
  bool pclmul = false;   // PCLMULQDQ + SSE4.2: 4 x 128-bit folding
  bool vpclmul = false;  // VPCLMULQDQ + AVX-512: 4 x 512-bit folding
  // Fold constants, one pair {lo, hi} per fold distance D (bytes): folding a
  // 16-byte chunk X = L x^64 + H forward by D bytes multiplies it by x^(8D);
  // with reflected operands, clmul(L, k_lo) ^ clmul(H, k_hi) lands in the frame
  // of the chunk D bytes later when k_lo = x^(8D+32) mod P, k_hi = x^(8D-32)
  // mod P, each stored one bit up (bit 32-d for x^d; see fold_const).
  uint64_t fold16[2], fold32[2], fold48[2], fold64[2], fold256[2];

  Tables() {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t c = b;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ ((c & 1u) ? kPoly : 0u);
      slice[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; ++b)
      for (int t = 1; t < 8; ++t) slice[t][b] = (slice[t - 1][b] >> 8) ^ slice[0][slice[t - 1][b] & 0xFF];
    const uint32_t kl = x8n(kLong), ks = x8n(kShort);
    for (int k = 0; k < 4; ++k)
      for (uint32_t b = 0; b < 256; ++b) {
        shift_long[k][b] = mulmod(b << (8 * k), kl);
        shift_short[k][b] = mulmod(b << (8 * k), ks);
      }
    fold_const(fold16, 16);
    fold_const(fold32, 32);
    fold_const(fold48, 48);
    fold_const(fold64, 64);
    fold_const(fold256, 256);
#if SFT_HAVE_SSE42_PATH
    __builtin_cpu_init();
    sse42 = __builtin_cpu_supports("sse4.2");
    pclmul = sse42 && __builtin_cpu_supports("pclmul");
    vpclmul = pclmul && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("vpclmulqdq");
#endif
  }

  // x8n() values have bit 31 = x^0 (bit i = x^(31-i)); shifted up one bit, bit
  // j = x^(32-j). A 64-bit reflected data qword has bit i = x^(63-i), so the
  // clmul product has bit k = x^(95-k) of L*K; read in the 128-bit data frame
  // (bit k = x^(127-k)) it is L*K*x^32, hence the -32 in the exponents.
  static void fold_const(uint64_t (&k)[2], size_t d) {
    k[0] = static_cast<uint64_t>(x8n(d + 4)) << 1;  // x^(8d+32): first qword (weight x^64)
    k[1] = static_cast<uint64_t>(x8n(d - 4)) << 1;  // x^(8d-32): second qword (weight x^0)
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

inline uint32_t shift(const uint32_t (&t)[4][256], uint32_t c) {
  return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
}

inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Raw register in, raw register out (no pre/post inversion).
uint32_t crc_portable(uint32_t c, const uint8_t* p, size_t n) {
  const auto& t = tables().slice;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    c = (c >> 8) ^ t[0][(c ^ *p++) & 0xFF];
    --n;
  }
  while (n >= 8) {
    const uint64_t v = load64(p) ^ c;
    c = t[7][v & 0xFF] ^ t[6][(v >> 8) & 0xFF] ^ t[5][(v >> 16) & 0xFF] ^ t[4][(v >> 24) & 0xFF] ^
        t[3][(v >> 32) & 0xFF] ^ t[2][(v >> 40) & 0xFF] ^ t[1][(v >> 48) & 0xFF] ^ t[0][v >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xFF];
  return c;
}

#if SFT_HAVE_SSE42_PATH
template <size_t Lane>
__attribute__((target("sse4.2"), always_inline)) inline uint64_t three_lanes(uint64_t c0, const uint8_t* p,
                                                                             const uint32_t (&sh)[4][256]) {
  uint64_t c1 = 0, c2 = 0;
  for (size_t i = 0; i < Lane; i += 8) {
    c0 = _mm_crc32_u64(c0, load64(p + i));
    c1 = _mm_crc32_u64(c1, load64(p + Lane + i));
    c2 = _mm_crc32_u64(c2, load64(p + 2 * Lane + i));
  }
  // crc(A B C) = shift(shift(crcA, |B|) ^ crcB, |C|) ^ crcC on raw registers.
  uint32_t c = shift(sh, static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
  return shift(sh, c) ^ static_cast<uint32_t>(c2);
}

__attribute__((target("sse4.2"))) uint32_t crc_sse42(uint32_t crc, const uint8_t* p, size_t n) {
  const Tables& t = tables();
  uint64_t c = crc;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
    --n;
  }
  while (n >= 3 * kLong) {
    c = three_lanes<kLong>(c, p, t.shift_long);
    p += 3 * kLong;
    n -= 3 * kLong;
  }
  while (n >= 3 * kShort) {
    c = three_lanes<kShort>(c, p, t.shift_short);
    p += 3 * kShort;
    n -= 3 * kShort;
  }
  while (n >= 8) {
    c = _mm_crc32_u64(c, load64(p));
    p += 8;
    n -= 8;
  }
  while (n--) c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
  return static_cast<uint32_t>(c);
}

// Carry-less-multiply folding (Intel, "Fast CRC Computation for Generic
// Polynomials Using PCLMULQDQ"). The raw CRC register after a message M with
// start state c equals the CRC with start state 0 of M with c XORed into its
// first 4 bytes, and that is (M' x^32 mod P). Folding replaces a leading chunk X
// by a polynomial congruent to X x^(8D) mod P, XORed into the chunk D bytes
// later, so it keeps M' mod P; once one 16-byte chunk V is left, the CRC
// instruction over V's 16 bytes from state 0 gives V x^32 mod P, i.e. the
// register after the folded prefix. The tail (< one block) continues with the
// SSE4.2 code from there.
__attribute__((target("pclmul,sse4.2"), always_inline)) inline __m128i fold128(__m128i x, __m128i k) {
  return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}

__attribute__((target("pclmul,sse4.2"))) inline __m128i kvec(const uint64_t (&k)[2]) {
  return _mm_set_epi64x(static_cast<long long>(k[1]), static_cast<long long>(k[0]));
}

__attribute__((target("pclmul,sse4.2"))) inline uint32_t crc_of_chunk(__m128i v) {
  uint64_t c = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(v)));
  c = _mm_crc32_u64(c, static_cast<uint64_t>(_mm_extract_epi64(v, 1)));
  return static_cast<uint32_t>(c);
}

__attribute__((target("sse4.2"), always_inline)) inline __m128i loadu128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// 4 x 128-bit accumulators (64 bytes a round). Needs n >= 64.
__attribute__((target("pclmul,sse4.2"))) uint32_t crc_pclmul(uint32_t crc, const uint8_t* p, size_t n) {
  if (n < 64) return crc_sse42(crc, p, n);
  const Tables& t = tables();
  __m128i a0 = _mm_xor_si128(loadu128(p), _mm_cvtsi32_si128(static_cast<int>(crc)));
  __m128i a1 = loadu128(p + 16), a2 = loadu128(p + 32), a3 = loadu128(p + 48);
  p += 64;
  n -= 64;
  const __m128i k64 = kvec(t.fold64);
  while (n >= 64) {
    a0 = _mm_xor_si128(fold128(a0, k64), loadu128(p));
    a1 = _mm_xor_si128(fold128(a1, k64), loadu128(p + 16));
    a2 = _mm_xor_si128(fold128(a2, k64), loadu128(p + 32));
    a3 = _mm_xor_si128(fold128(a3, k64), loadu128(p + 48));
    p += 64;
    n -= 64;
  }
  const __m128i v = _mm_xor_si128(_mm_xor_si128(fold128(a0, kvec(t.fold48)), fold128(a1, kvec(t.fold32))),
                                  _mm_xor_si128(fold128(a2, kvec(t.fold16)), a3));
  return crc_sse42(crc_of_chunk(v), p, n);
}

#define SFT_AVX512_TARGET "avx512f,avx512bw,avx512vl,vpclmulqdq,pclmul,sse4.2"

__attribute__((target(SFT_AVX512_TARGET), always_inline)) inline __m512i fold512(__m512i x, __m512i k,
                                                                                   __m512i next) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11),
                                   next, 0x96);
}

__attribute__((target(SFT_AVX512_TARGET))) inline __m512i kvec512(const uint64_t (&k)[2]) {
  return _mm512_broadcast_i32x4(_mm_set_epi64x(static_cast<long long>(k[1]), static_cast<long long>(k[0])));
}

__attribute__((target(SFT_AVX512_TARGET), always_inline)) inline __m512i loadu512(const uint8_t* p) { return _mm512_loadu_si512(reinterpret_cast<const void*>(p)); }

// 4 x 512-bit accumulators (256 bytes a round). Needs n >= 256. Bound by the
// clmul throughput on Zen 4: 8 accumulators measured the same (~54 GB/s in cache).
__attribute__((target(SFT_AVX512_TARGET))) uint32_t crc_vpclmul(uint32_t crc, const uint8_t* p, size_t n) {
  if (n < 256) return crc_sse42(crc, p, n);
  const Tables& t = tables();
  __m512i a0 = _mm512_xor_si512(loadu512(p), _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(crc))));
  __m512i a1 = loadu512(p + 64), a2 = loadu512(p + 128), a3 = loadu512(p + 192);
  p += 256;
  n -= 256;
  const __m512i k256 = kvec512(t.fold256);
  while (n >= 256) {
    a0 = fold512(a0, k256, loadu512(p));
    a1 = fold512(a1, k256, loadu512(p + 64));
    a2 = fold512(a2, k256, loadu512(p + 128));
    a3 = fold512(a3, k256, loadu512(p + 192));
    p += 256;
    n -= 256;
  }
  const __m512i k64 = kvec512(t.fold64);
  a1 = fold512(a0, k64, a1);
  a2 = fold512(a1, k64, a2);
  __m512i a = fold512(a2, k64, a3);
  while (n >= 64) {
    a = fold512(a, k64, loadu512(p));
    p += 64;
    n -= 64;
  }
  // The four 128-bit lanes of a sit at offsets 0, 16, 32, 48 of the last 64 bytes.
  const __m128i v = _mm_xor_si128(
      _mm_xor_si128(fold128(_mm512_extracti32x4_epi32(a, 0), kvec(t.fold48)),
                    fold128(_mm512_extracti32x4_epi32(a, 1), kvec(t.fold32))),
      _mm_xor_si128(fold128(_mm512_extracti32x4_epi32(a, 2), kvec(t.fold16)), _mm512_extracti32x4_epi32(a, 3)));
  return crc_sse42(crc_of_chunk(v), p, n);
}
#endif

constexpr size_t kFoldMin = 512;  // below this the SSE4.2 3-lane code is as fast

}  // namespace

// CRC32C of n bytes at p, continuing from the CRC `init` of the bytes before
// (0 for a fresh CRC): crc32c(A + B) == crc32c(B, init = crc32c(A)).
uint32_t crc32c(uint32_t init, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~init;
#if SFT_HAVE_SSE42_PATH
  const Tables& t = tables();
  // The 128-bit PCLMULQDQ folding is not dispatched: on Zen 4 it measured
  // 14.5 GB/s against 27.5 for the 3-lane crc32 code (bench/crc32c.py); it stays
  // callable as sft_crc32c_pclmul.
  if (n >= kFoldMin && t.vpclmul) return ~crc_vpclmul(c, p, n);
  if (t.sse42) return ~crc_sse42(c, p, n);
#endif
  return ~crc_portable(c, p, n);
}

namespace {

int64_t crc32c_op(const at::Tensor& data, int64_t init) {
  TORCH_CHECK(data.device().is_cpu(), "sft::crc32c: data must be a CPU tensor, got ", data.device());
  TORCH_CHECK(data.scalar_type() == at::kByte, "sft::crc32c: data must be uint8, got ", data.scalar_type());
  TORCH_CHECK(data.is_contiguous(), "sft::crc32c: data must be contiguous");
  TORCH_CHECK(init >= 0 && init <= 0xFFFFFFFFLL, "sft::crc32c: init must be in [0, 2**32-1], got ", init);
  return crc32c(static_cast<uint32_t>(init), data.data_ptr<uint8_t>(), static_cast<size_t>(data.numel()));
}

}  // namespace
}  // namespace sft::cpu

// The C entry point (ctypes). Also lets a caller force the portable path, so
// the tests cover both implementations on a machine with SSE4.2.
extern "C" __attribute__((visibility("default"))) uint32_t sft_crc32c(uint32_t init, const void* data,
                                                                       size_t n) {
  return sft::cpu::crc32c(init, data, n);
}

extern "C" __attribute__((visibility("default"))) uint32_t sft_crc32c_portable(uint32_t init, const void* data,
                                                                                size_t n) {
  return ~sft::cpu::crc_portable(~init, static_cast<const uint8_t*>(data), n);
}

extern "C" __attribute__((visibility("default"))) int sft_crc32c_hw(void) {
  return sft::cpu::tables().sse42 ? 1 : 0;
}

// Bit mask of the implementations this CPU can run: 1 SSE4.2, 2 PCLMULQDQ
// folding, 4 VPCLMULQDQ/AVX-512 folding.
extern "C" __attribute__((visibility("default"))) int sft_crc32c_features(void) {
  const auto& t = sft::cpu::tables();
  return (t.sse42 ? 1 : 0) | (t.pclmul ? 2 : 0) | (t.vpclmul ? 4 : 0);
}

// Forced implementations, for tests and benchmarks: each falls back to the
// portable code when the CPU lacks its instructions (check sft_crc32c_features).
extern "C" __attribute__((visibility("default"))) uint32_t sft_crc32c_sse42(uint32_t init, const void* data,
                                                                             size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
#if SFT_HAVE_SSE42_PATH
  if (sft::cpu::tables().sse42) return ~sft::cpu::crc_sse42(~init, p, n);
#endif
  return ~sft::cpu::crc_portable(~init, p, n);
}

extern "C" __attribute__((visibility("default"))) uint32_t sft_crc32c_pclmul(uint32_t init, const void* data,
                                                                              size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
#if SFT_HAVE_SSE42_PATH
  if (sft::cpu::tables().pclmul) return ~sft::cpu::crc_pclmul(~init, p, n);
#endif
  return ~sft::cpu::crc_portable(~init, p, n);
}

extern "C" __attribute__((visibility("default"))) uint32_t sft_crc32c_vpclmul(uint32_t init, const void* data,
                                                                               size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
#if SFT_HAVE_SSE42_PATH
  if (sft::cpu::tables().vpclmul) return ~sft::cpu::crc_vpclmul(~init, p, n);
#endif
  return ~sft::cpu::crc_portable(~init, p, n);
}

TORCH_LIBRARY_IMPL(sft, CPU, m) { m.impl("crc32c", &sft::cpu::crc32c_op); }
