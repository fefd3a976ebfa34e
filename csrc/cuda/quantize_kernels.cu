// Fused CUDA kernels of sft::quantize and sft::dequantize. Launchers declared
// in cuda/kernels.h; the format is sft_kernels/reference.py, and the per-element
// arithmetic is common/quantize.h, the same code the CPU kernels run, so the
// results are bit-identical to them.
//
// Work unit: a chunk of kVec = 8 consecutive elements of a row, one per
// thread. A chunk starts at a multiple of 8 in its row, so its codes are whole
// bytes (8 * bits / 8 = bits bytes) that no other thread writes: the thread
// packs them in registers and stores them at once. Loads and stores are 128-bit
// when the chunk is whole and its address aligned, scalar otherwise (row ends,
// odd row strides).
//
// Quantize, one pass (quantize_tile_kernel): a CTA owns a tile of whole
// quantization blocks of one row (at most kTile elements, starting on a
// multiple of 8) and keeps it in registers: absmax per block, then scale,
// then codes, with a single read of x.
//   * Blocks of 64, 128 or 256 elements span 8, 16 or 32 consecutive threads
//     of a warp: the absmax is a butterfly of warp shuffles (LANES > 0).
//   * Any other block size: each thread max-reduces its runs of elements of
//     one block and merges them with shared-memory atomicMax (LANES == 0).
//   Absmax is an unsigned max over the bits of |x| in fp32, which orders like
//   |x| for every non-NaN value and makes a NaN or inf win, so non-finite input
//   gives a non-finite scale (the op cannot raise without a host sync; the
//   codec checks the scales outside graph capture). Codes are then unspecified.
// Quantize, two passes (blocks that fit no tile: larger than kTile, or whose
// lcm with 8 exceeds it): absmax_kernel atomically max-es the |x| bits of each
// block into the scales buffer (zeroed first), encode_kernel re-reads x and
// writes the codes, and finalize_scales_kernel turns the bits into scales.
// Dequantize (dequantize_kernel) is elementwise: a thread decodes one chunk.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/philox.h"
#include "common/quantize.h"
#include "cuda/kernels.h"

namespace {

constexpr int kVec = 8;                  // elements per thread
constexpr int kThreads = 256;            // max threads per CTA
constexpr int kTile = kThreads * kVec;   // max elements of a one-pass tile
constexpr int64_t kMaxGrid = 1 << 22;    // grid-stride loops beyond this
constexpr unsigned kFullMask = 0xffffffffu;

// ----------------------------------------------------------------------------- element types
// Raw storage bits in, fp32 in registers, conversions exactly like torch's casts.

struct F32 {
  using bits_t = uint32_t;
  static __device__ __forceinline__ float to_float(bits_t b) { return __uint_as_float(b); }
  static __device__ __forceinline__ bits_t from_float(float f) { return __float_as_uint(f); }
};

struct F16 {
  using bits_t = uint16_t;
  static __device__ __forceinline__ float to_float(bits_t b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ bits_t from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

struct BF16 {
  using bits_t = uint16_t;
  static __device__ __forceinline__ float to_float(bits_t b) { return __uint_as_float(uint32_t(b) << 16); }
  static __device__ __forceinline__ bits_t from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

// |v| as ordered bits (see the file comment).
__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

__device__ __forceinline__ bool aligned(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// The n <= kVec elements at p as fp32 (0 beyond n; p is not read when n == 0).
template <class E>
__device__ __forceinline__ void load_chunk(const typename E::bits_t* __restrict__ p, int n, float (&v)[kVec]) {
  constexpr int kWords = kVec * sizeof(typename E::bits_t) / 16;
  union {
    uint4 q[kWords];
    typename E::bits_t e[kVec];
  } u;
  if (n == kVec && aligned(p, 16)) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) u.q[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) u.e[i] = i < n ? p[i] : typename E::bits_t(0);
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) v[i] = E::to_float(u.e[i]);
}

// Stores the first n <= kVec of y to p, converted to E.
template <class E>
__device__ __forceinline__ void store_chunk(typename E::bits_t* __restrict__ p, int n, const float (&y)[kVec]) {
  constexpr int kWords = kVec * sizeof(typename E::bits_t) / 16;
  union {
    uint4 q[kWords];
    typename E::bits_t e[kVec];
  } u;
#pragma unroll
  for (int i = 0; i < kVec; ++i) u.e[i] = E::from_float(y[i]);
  if (n == kVec && aligned(p, 16)) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) reinterpret_cast<uint4*>(p)[i] = u.q[i];
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      if (i < n) p[i] = u.e[i];
  }
}

// ----------------------------------------------------------------------------- encode one chunk

// Codes of the chunk's n elements v (element i divided by d[i]), whose first
// element has row-major index i0 in the logical input (for the Philox draws),
// packed in registers and stored to dst (the chunk's first code byte). Codes
// past n are 0, so the pad bits of a row's last byte are 0.
template <int BITS, bool SR>
__device__ __forceinline__ void encode_chunk(const float (&v)[kVec], const float (&d)[kVec], int n, uint64_t i0,
                                             uint64_t seed, uint8_t* __restrict__ dst) {
  using Fmt = sft::QuantFormat<BITS>;
  uint8_t c[kVec];
  if constexpr (SR) {
    // Words of indices i0 - off .. i0 - off + 11 (three Philox groups); the
    // selection by off keeps every index static, so r stays in registers.
    const uint64_t g0 = i0 / 4;
    const int off = int(i0 % 4);
    uint32_t r[12];
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      if (g < 2 || off + n > 8) {
        const sft::Philox4 w = sft::philox_group(seed, g0 + g, sft::kPhiloxStreamRounding);
#pragma unroll
        for (int j = 0; j < 4; ++j) r[4 * g + j] = w.v[j];
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) r[4 * g + j] = 0;
      }
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const uint32_t word = off == 0 ? r[i] : off == 1 ? r[i + 1] : off == 2 ? r[i + 2] : r[i + 3];
      c[i] = i < n ? sft::code_stochastic<BITS>(v[i], d[i], word) : uint8_t(0);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) c[i] = i < n ? sft::code_nearest<BITS>(v[i], d[i]) : uint8_t(0);
  }
  // kVec codes -> BITS bytes, one CodeWord per byte.
  uint64_t packed = 0;
#pragma unroll
  for (int j = 0; j < BITS; ++j) {
    sft::CodeWord<BITS> w = 0;
#pragma unroll
    for (int s = 0; s < Fmt::kPerByte; ++s) w = sft::CodeWord<BITS>(w | (sft::CodeWord<BITS>(c[j * Fmt::kPerByte + s]) << (8 * s)));
    packed |= uint64_t(sft::pack_word<BITS>(w)) << (8 * j);
  }
  const int nb = (n * BITS + 7) / 8;
  if (nb == BITS && aligned(dst, BITS)) {
    if constexpr (BITS == 2) *reinterpret_cast<uint16_t*>(dst) = uint16_t(packed);
    if constexpr (BITS == 4) *reinterpret_cast<uint32_t*>(dst) = uint32_t(packed);
    if constexpr (BITS == 8) *reinterpret_cast<unsigned long long*>(dst) = packed;
  } else {
#pragma unroll
    for (int j = 0; j < BITS; ++j)
      if (j < nb) dst[j] = uint8_t(packed >> (8 * j));
  }
}

// ----------------------------------------------------------------------------- one-pass quantize

// One tile per CTA and loop step: tile t is row t / tiles_per_row, elements
// [e0, e0 + tile_elems) with e0 = (t % tiles_per_row) * tile_elems, a multiple
// of 8 and of block. LANES > 0: block == 8 * LANES (warp-shuffle absmax).
template <class E, int BITS, bool SR, int LANES>
__global__ void __launch_bounds__(kThreads)
    quantize_tile_kernel(const typename E::bits_t* __restrict__ x, int64_t rows, int64_t cols, int64_t x_row_stride,
                         int64_t block, int64_t tile_elems, int64_t tiles_per_row, uint64_t seed,
                         uint8_t* __restrict__ codes, int64_t nbytes, float* __restrict__ scales, int64_t nblk) {
  __shared__ uint32_t s_amax[LANES > 0 ? 1 : kTile];
  // Element k of a tile is in tile block k / blk (k < kTile, so this also
  // holds for block > kTile, where the tile is one whole row of one block).
  const int blk = int(block < kTile ? block : kTile);
  const int k0 = threadIdx.x * kVec;
  for (int64_t t = blockIdx.x; t < rows * tiles_per_row; t += gridDim.x) {
    const int64_t row = t / tiles_per_row, e0 = (t % tiles_per_row) * tile_elems;
    const int n_tile = int(cols - e0 < tile_elems ? cols - e0 : tile_elems);
    const int n = n_tile - k0 < 0 ? 0 : (n_tile - k0 < kVec ? n_tile - k0 : kVec);
    float v[kVec], d[kVec];
    load_chunk<E>(x + row * x_row_stride + e0 + k0, n, v);
    float* const row_scales = scales + row * nblk + e0 / block;
    if constexpr (LANES > 0) {
      uint32_t a = 0;
#pragma unroll
      for (int i = 0; i < kVec; ++i) a = max(a, abs_bits(v[i]));
#pragma unroll
      for (int o = LANES / 2; o > 0; o /= 2) a = max(a, __shfl_xor_sync(kFullMask, a, o));
      const float scale = sft::block_scale<BITS>(__uint_as_float(a));
      if (threadIdx.x % LANES == 0 && n > 0) row_scales[threadIdx.x / LANES] = scale;
      const float div = sft::code_divisor(scale);
#pragma unroll
      for (int i = 0; i < kVec; ++i) d[i] = div;
    } else {
      const int nb_tile = (n_tile + blk - 1) / blk;
      for (int i = threadIdx.x; i < nb_tile; i += blockDim.x) s_amax[i] = 0;
      __syncthreads();
      if (n > 0) {  // one shared atomicMax per run of elements of one block
        int b = k0 / blk, next = (b + 1) * blk;
        uint32_t a = 0;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          if (i < n) {
            if (k0 + i == next) {
              atomicMax(&s_amax[b], a);
              a = 0;
              ++b;
              next += blk;
            }
            a = max(a, abs_bits(v[i]));
          }
        }
        atomicMax(&s_amax[b], a);
      }
      __syncthreads();
      for (int i = threadIdx.x; i < nb_tile; i += blockDim.x)
        row_scales[i] = sft::block_scale<BITS>(__uint_as_float(s_amax[i]));
      int b = k0 / blk, next = (b + 1) * blk;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (k0 + i == next) {
          ++b;
          next += blk;
        }
        d[i] = i < n ? sft::code_divisor(sft::block_scale<BITS>(__uint_as_float(s_amax[b]))) : 1.0f;
      }
      __syncthreads();  // s_amax is reused by the next tile
    }
    if (n > 0)
      encode_chunk<BITS, SR>(v, d, n, uint64_t(row) * uint64_t(cols) + uint64_t(e0 + k0), seed,
                             codes + row * nbytes + (e0 + k0) / 8 * BITS);
  }
}

// ----------------------------------------------------------------------------- two-pass quantize

// Row, first element and length of chunk c (chunks_per_row chunks per row).
struct Chunk {
  int64_t row, e;
  int n;
};
__device__ __forceinline__ Chunk chunk_at(int64_t c, int64_t chunks_per_row, int64_t cols) {
  Chunk k;
  k.row = c / chunks_per_row;
  k.e = (c % chunks_per_row) * kVec;
  k.n = int(cols - k.e < kVec ? cols - k.e : kVec);
  return k;
}

// Pass 1: amax[row * nblk + b] = max |x| bits of block b (amax zeroed by the
// launcher). A warp whose chunks all lie in one block reduces first and
// issues one atomic; otherwise each thread issues one per run.
template <class E>
__global__ void __launch_bounds__(kThreads)
    absmax_kernel(const typename E::bits_t* __restrict__ x, int64_t rows, int64_t cols, int64_t x_row_stride,
                  int64_t block, int64_t chunks_per_row, uint32_t* __restrict__ amax, int64_t nblk) {
  const int lane = threadIdx.x % 32;
  const int64_t total = rows * chunks_per_row, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x + threadIdx.x - lane; base < total; base += stride) {
    const bool valid = base + lane < total;
    Chunk k{0, 0, 0};
    if (valid) k = chunk_at(base + lane, chunks_per_row, cols);
    float v[kVec];
    load_chunk<E>(x + k.row * x_row_stride + k.e, k.n, v);
    uint32_t a = 0;
#pragma unroll
    for (int i = 0; i < kVec; ++i) a = max(a, abs_bits(v[i]));
    const int64_t first = k.row * nblk + k.e / block;
    const int64_t last = k.row * nblk + (k.e + (k.n > 0 ? k.n : 1) - 1) / block;
    const int64_t first0 = __shfl_sync(kFullMask, first, 0);
    if (__all_sync(kFullMask, !valid || (first == first0 && last == first0))) {
      a = __reduce_max_sync(kFullMask, a);
      if (lane == 0 && a) atomicMax(&amax[first0], a);
    } else if (valid) {
      int64_t b = k.e / block, next = (b + 1) * block;
      uint32_t m = 0;
      for (int i = 0; i < k.n; ++i) {
        if (k.e + i == next) {
          if (m) atomicMax(&amax[k.row * nblk + b], m);
          m = 0;
          ++b;
          next += block;
        }
        m = max(m, abs_bits(v[i]));
      }
      if (m) atomicMax(&amax[k.row * nblk + b], m);
    }
  }
}

// Pass 2: the codes of every chunk, from the absmax bits of pass 1.
template <class E, int BITS, bool SR>
__global__ void __launch_bounds__(kThreads)
    encode_kernel(const typename E::bits_t* __restrict__ x, int64_t rows, int64_t cols, int64_t x_row_stride,
                  int64_t block, int64_t chunks_per_row, const uint32_t* __restrict__ amax, int64_t nblk,
                  uint64_t seed, uint8_t* __restrict__ codes, int64_t nbytes) {
  const int64_t total = rows * chunks_per_row, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < total; c += stride) {
    const Chunk k = chunk_at(c, chunks_per_row, cols);
    float v[kVec], d[kVec];
    load_chunk<E>(x + k.row * x_row_stride + k.e, k.n, v);
    int64_t b = k.e / block, next = (b + 1) * block;
    float div = sft::code_divisor(sft::block_scale<BITS>(__uint_as_float(amax[k.row * nblk + b])));
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (i < k.n && k.e + i == next) {
        ++b;
        next += block;
        div = sft::code_divisor(sft::block_scale<BITS>(__uint_as_float(amax[k.row * nblk + b])));
      }
      d[i] = div;
    }
    encode_chunk<BITS, SR>(v, d, k.n, uint64_t(k.row) * uint64_t(cols) + uint64_t(k.e), seed,
                           codes + k.row * nbytes + k.e / 8 * BITS);
  }
}

// Pass 3: absmax bits -> scales, in place.
template <int BITS>
__global__ void __launch_bounds__(kThreads) finalize_scales_kernel(float* __restrict__ scales, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    scales[i] = sft::block_scale<BITS>(scales[i]);  // the bits of max |x| read as fp32 are max |x|
}

// ----------------------------------------------------------------------------- dequantize

template <class E, int BITS>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales, int64_t rows, int64_t cols,
                      int64_t block, int64_t chunks_per_row, int64_t nbytes, int64_t nblk,
                      typename E::bits_t* __restrict__ out) {
  using Fmt = sft::QuantFormat<BITS>;
  const int64_t total = rows * chunks_per_row, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < total; c += stride) {
    const Chunk k = chunk_at(c, chunks_per_row, cols);
    const uint8_t* src = codes + k.row * nbytes + k.e / 8 * BITS;
    const int nb = (k.n * BITS + 7) / 8;
    uint64_t packed = 0;
    if (nb == BITS && aligned(src, BITS)) {
      if constexpr (BITS == 2) packed = __ldg(reinterpret_cast<const uint16_t*>(src));
      if constexpr (BITS == 4) packed = __ldg(reinterpret_cast<const uint32_t*>(src));
      if constexpr (BITS == 8) packed = __ldg(reinterpret_cast<const unsigned long long*>(src));
    } else {
#pragma unroll
      for (int j = 0; j < BITS; ++j)
        if (j < nb) packed |= uint64_t(src[j]) << (8 * j);
    }
    int c8[kVec];
#pragma unroll
    for (int j = 0; j < BITS; ++j) {
      const sft::CodeWord<BITS> w = sft::unpack_word<BITS>(uint8_t(packed >> (8 * j)));
#pragma unroll
      for (int s = 0; s < Fmt::kPerByte; ++s) c8[j * Fmt::kPerByte + s] = int((w >> (8 * s)) & 0xff);
    }
    int64_t b = k.e / block, next = (b + 1) * block;
    float scale = __ldg(scales + k.row * nblk + b);
    float y[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (i < k.n && k.e + i == next) {
        ++b;
        next += block;
        scale = __ldg(scales + k.row * nblk + b);
      }
      y[i] = sft::decode_code<BITS>(c8[i], scale);
    }
    store_chunk<E>(out + k.row * cols + k.e, k.n, y);
  }
}

// ----------------------------------------------------------------------------- launch helpers

unsigned grid_for(int64_t work_items, int threads) {
  const int64_t blocks = (work_items + threads - 1) / threads;
  return unsigned(blocks < kMaxGrid ? blocks : kMaxGrid);
}

// Calls f(E{}) for the element type of dtype; cudaErrorInvalidValue otherwise.
template <class F>
cudaError_t dispatch_dtype(SftDType dtype, F&& f) {
  switch (dtype) {
    case SFT_FLOAT32: return f(F32{});
    case SFT_FLOAT16: return f(F16{});
    case SFT_BFLOAT16: return f(BF16{});
  }
  return cudaErrorInvalidValue;
}

// A compile-time int handed to a generic lambda.
template <int V>
struct Int {
  static constexpr int value = V;
};

template <class F>
cudaError_t dispatch_bits(int bits, F&& f) {
  switch (bits) {
    case 2: return f(Int<2>{});
    case 4: return f(Int<4>{});
    case 8: return f(Int<8>{});
  }
  return cudaErrorInvalidValue;
}

int64_t gcd64(int64_t a, int64_t b) {
  while (b) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

template <class E, int BITS, bool SR, int LANES>
void launch_tile(const void* x, int64_t rows, int64_t cols, int64_t x_row_stride, int64_t block, int64_t tile_elems,
                 uint64_t seed, uint8_t* codes, int64_t nbytes, float* scales, int64_t nblk, cudaStream_t stream) {
  const int64_t tiles_per_row = (cols + tile_elems - 1) / tile_elems;
  // Threads for one tile's chunks, in whole warps (short rows get small CTAs, so more of them fit an SM).
  const int64_t chunks = (tile_elems + kVec - 1) / kVec;
  const int threads = int(chunks >= kThreads ? kThreads : (chunks + 31) / 32 * 32);
  const int64_t ntiles = rows * tiles_per_row;
  quantize_tile_kernel<E, BITS, SR, LANES><<<unsigned(ntiles < kMaxGrid ? ntiles : kMaxGrid), threads, 0, stream>>>(
      static_cast<const typename E::bits_t*>(x), rows, cols, x_row_stride, block, tile_elems, tiles_per_row, seed,
      codes, nbytes, scales, nblk);
}

template <class E, int BITS, bool SR>
cudaError_t quantize_typed(const void* x, int64_t rows, int64_t cols, int64_t x_row_stride, int64_t block,
                           uint64_t seed, uint8_t* codes, float* scales, cudaStream_t stream) {
  const int64_t nbytes = cols / 8 * BITS + (cols % 8 * BITS + 7) / 8, nblk = (cols - 1) / block + 1;
  // A tile is a run of whole blocks starting on a multiple of 8: the whole row
  // if it fits, else as many lcm(block, 8)-element units as fit in kTile.
  int64_t tile_elems = 0;
  if (cols <= kTile) {
    tile_elems = cols;
  } else if (block <= kTile) {
    const int64_t unit = block / gcd64(block, kVec) * kVec;
    if (unit <= kTile) tile_elems = kTile / unit * unit;
  }
  if (tile_elems > 0) {
    const int lanes = block == 64 ? 8 : block == 128 ? 16 : block == 256 ? 32 : 0;
    const auto go = [&](auto l) {
      launch_tile<E, BITS, SR, decltype(l)::value>(x, rows, cols, x_row_stride, block, tile_elems, seed, codes, nbytes,
                                                   scales, nblk, stream);
    };
    switch (lanes) {
      case 8: go(Int<8>{}); break;
      case 16: go(Int<16>{}); break;
      case 32: go(Int<32>{}); break;
      default: go(Int<0>{}); break;
    }
    return cudaGetLastError();
  }
  // Two passes; the scales buffer holds the absmax bits in between.
  const int64_t nscales = rows * nblk, chunks_per_row = (cols + kVec - 1) / kVec, nchunks = rows * chunks_per_row;
  uint32_t* amax = reinterpret_cast<uint32_t*>(scales);
  const cudaError_t err = cudaMemsetAsync(amax, 0, size_t(nscales) * sizeof(uint32_t), stream);
  if (err != cudaSuccess) return err;
  const auto* xe = static_cast<const typename E::bits_t*>(x);
  absmax_kernel<E><<<grid_for(nchunks, kThreads), kThreads, 0, stream>>>(xe, rows, cols, x_row_stride, block,
                                                                          chunks_per_row, amax, nblk);
  encode_kernel<E, BITS, SR><<<grid_for(nchunks, kThreads), kThreads, 0, stream>>>(
      xe, rows, cols, x_row_stride, block, chunks_per_row, amax, nblk, seed, codes, nbytes);
  finalize_scales_kernel<BITS><<<grid_for(nscales, kThreads), kThreads, 0, stream>>>(scales, nscales);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t sft_quantize(const void* x, SftDType dtype, int64_t rows, int64_t cols, int64_t x_row_stride,
                                    int bits, int64_t block, bool stochastic, uint64_t seed, uint8_t* codes,
                                    float* scales, cudaStream_t stream) {
  if (rows < 0 || cols < 0 || block < 1 || x_row_stride < cols) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (x == nullptr || codes == nullptr || scales == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto e) {
    using E = decltype(e);
    return dispatch_bits(bits, [&](auto b) {
      constexpr int B = decltype(b)::value;
      return stochastic ? quantize_typed<E, B, true>(x, rows, cols, x_row_stride, block, seed, codes, scales, stream)
                        : quantize_typed<E, B, false>(x, rows, cols, x_row_stride, block, seed, codes, scales, stream);
    });
  });
}

extern "C" cudaError_t sft_dequantize(const uint8_t* codes, const float* scales, int64_t rows, int64_t cols, int bits,
                                      int64_t block, void* out, SftDType dtype, cudaStream_t stream) {
  if (rows < 0 || cols < 0 || block < 1) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (codes == nullptr || scales == nullptr || out == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto e) {
    using E = decltype(e);
    return dispatch_bits(bits, [&](auto b) {
      constexpr int B = decltype(b)::value;
      const int64_t nbytes = cols / 8 * B + (cols % 8 * B + 7) / 8, nblk = (cols - 1) / block + 1;
      const int64_t chunks_per_row = (cols + kVec - 1) / kVec;
      dequantize_kernel<E, B><<<grid_for(rows * chunks_per_row, kThreads), kThreads, 0, stream>>>(
          codes, scales, rows, cols, block, chunks_per_row, nbytes, nblk, static_cast<typename E::bits_t*>(out));
      return cudaGetLastError();
    });
  });
}
