// Socket I/O fused with the payload CRC32C (the tensor channel's plain-TCP path).
//
// The channel checksums tensor data while it streams.  Done as two passes (CRC
// over the whole buffer, then one big send/recv) the data is read twice from
// memory; here each chunk is checksummed right before it is sent (it is then in
// L1/L2 for the kernel's copy) or right after it was received (still in cache
// from the kernel's copy), and no Python runs per chunk.  ctypes drops the GIL
// for the call.
//
// Both return the bytes transferred (>= 0) or -errno.  They return early with
// the bytes done so far (and *crc covering exactly those bytes) at EOF (recv)
// and on EINTR after some progress, so the Python caller can run signal
// handlers and loop; EINTR before any progress is -EINTR.  EAGAIN/EWOULDBLOCK
// (SO_SNDTIMEO / SO_RCVTIMEO expired) is returned as -EAGAIN even after partial
// progress: a timeout mid-tensor breaks the frame anyway.
#include "crc32c.h"

#include <cerrno>
#include <cstddef>
#include <cstdint>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/socket.h>
#include <sys/types.h>
#define SFT_HAVE_SOCKIO 1
#else
#define SFT_HAVE_SOCKIO 0
#endif

#define SFT_EXPORT extern "C" __attribute__((visibility("default")))

namespace {
constexpr size_t kDefaultChunk = 256 * 1024;

inline int64_t again_or(int e) { return (e == EWOULDBLOCK) ? -static_cast<int64_t>(EAGAIN) : -static_cast<int64_t>(e); }
}  // namespace

// Send n bytes at buf on fd in chunks of `chunk` bytes (0 = default), updating
// *crc over each chunk just before sending it.  `more` != 0 sets MSG_MORE
// (Linux) on every send: more bytes of the frame follow (the CRC trailer).
SFT_EXPORT int64_t sft_send_crc(int fd, const void* buf, size_t n, size_t chunk, uint32_t* crc, int more) {
#if SFT_HAVE_SOCKIO
  if (chunk == 0) chunk = kDefaultChunk;
  int flags = 0;
#ifdef MSG_NOSIGNAL
  flags |= MSG_NOSIGNAL;
#endif
#ifdef MSG_MORE
  if (more) flags |= MSG_MORE;
#else
  (void)more;
#endif
  const auto* p = static_cast<const uint8_t*>(buf);
  size_t done = 0;
  while (done < n) {
    const size_t start = done;
    const size_t len = n - done < chunk ? n - done : chunk;
    const uint32_t before = *crc;
    const uint32_t after = sft::cpu::crc32c(before, p + start, len);
    while (done < start + len) {
      ssize_t k = ::send(fd, p + done, start + len - done, flags);
      if (k >= 0) {
        done += static_cast<size_t>(k);
        continue;
      }
      const int e = errno;
      if (e != EINTR) return again_or(e);
      if (done == 0) return -EINTR;
      // Let the caller run signal handlers: *crc must cover exactly the bytes sent.
      *crc = sft::cpu::crc32c(before, p + start, done - start);
      return static_cast<int64_t>(done);
    }
    *crc = after;
  }
  return static_cast<int64_t>(done);
#else
  (void)fd; (void)buf; (void)n; (void)chunk; (void)crc; (void)more;
  return -ENOSYS;
#endif
}

// Receive exactly n bytes into buf from fd (MSG_WAITALL per chunk of `chunk`
// bytes, 0 = default), updating *crc over each received piece at once, while
// it is cache-hot.  Returns fewer than n after a short read (EOF, timeout with
// part of a chunk read, a signal); the caller loops.
SFT_EXPORT int64_t sft_recv_crc(int fd, void* buf, size_t n, size_t chunk, uint32_t* crc) {
#if SFT_HAVE_SOCKIO
  if (chunk == 0) chunk = kDefaultChunk;
  auto* p = static_cast<uint8_t*>(buf);
  uint32_t c = *crc;
  size_t done = 0;
  while (done < n) {
    const size_t len = n - done < chunk ? n - done : chunk;
    ssize_t k = ::recv(fd, p + done, len, MSG_WAITALL);
    if (k < 0) {
      const int e = errno;
      if (e == EINTR) {
        if (done == 0) return -EINTR;
        break;
      }
      return again_or(e);
    }
    if (k == 0) break;  // EOF
    c = sft::cpu::crc32c(c, p + done, static_cast<size_t>(k));
    *crc = c;
    done += static_cast<size_t>(k);
    // Short read: EOF, SO_RCVTIMEO ran out with part read, or a signal.  Back
    // to the caller, which runs signal handlers and calls again (0 = EOF).
    if (static_cast<size_t>(k) < len) break;
  }
  return static_cast<int64_t>(done);
#else
  (void)fd; (void)buf; (void)n; (void)chunk; (void)crc;
  return -ENOSYS;
#endif
}

// 1 when the functions above are real (a POSIX build), 0 when they return -ENOSYS.
SFT_EXPORT int sft_sockio_available(void) { return SFT_HAVE_SOCKIO; }
