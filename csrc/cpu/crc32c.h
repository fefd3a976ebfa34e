#pragma once
// CRC32C (Castagnoli) of n bytes at data, continuing from the CRC `init` of the
// bytes before (0 for a fresh CRC): crc32c(A + B) == crc32c(B, init = crc32c(A)).
// Defined in crc32c.cpp (dispatches to VPCLMULQDQ / SSE4.2 / portable code).
#include <cstddef>
#include <cstdint>

namespace sft::cpu {
uint32_t crc32c(uint32_t init, const void* data, size_t n);
}  // namespace sft::cpu
