// SFT_HD: marks a function of csrc/common/*.h that both the CPU kernels and
// the CUDA kernels call. Under nvcc it is __host__ __device__ and inlined; in
// plain C++ it is always inlined, because the CPU span kernels are built as
// several target_clones (AVX-512, AVX2, baseline) and a helper left out of
// line would only exist in the baseline ISA and block vectorisation.
#pragma once

#if defined(__CUDACC__)
#define SFT_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define SFT_HD inline __attribute__((always_inline))
#else
#define SFT_HD inline
#endif
