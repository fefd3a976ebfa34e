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
//   * Portable: slicing-by-8 tables.
// Both are exposed as the op `sft::crc32c(Tensor data, int init) -> int` and as
// the C function `sft_crc32c(init, ptr, len)` (called through ctypes by the
// channel, which avoids building a tensor per small buffer; ctypes drops the
// GIL during the call).
#include <torch/library.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
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
#if SFT_HAVE_SSE42_PATH
    __builtin_cpu_init();
    sse42 = __builtin_cpu_supports("sse4.2");
#endif
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
#endif

}  // namespace

// CRC32C of n bytes at p, continuing from the CRC `init` of the bytes before
// (0 for a fresh CRC): crc32c(A + B) == crc32c(B, init = crc32c(A)).
uint32_t crc32c(uint32_t init, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~init;
#if SFT_HAVE_SSE42_PATH
  if (tables().sse42) return ~crc_sse42(c, p, n);
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

TORCH_LIBRARY_IMPL(sft, CPU, m) { m.impl("crc32c", &sft::cpu::crc32c_op); }
