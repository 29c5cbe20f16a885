// Clocks shared by the data plane and the tracing code.
#pragma once

#include <cstdint>
#include <ctime>

namespace aggvm {

/// CLOCK_MONOTONIC in nanoseconds. Every process on one machine shares it, so trace timestamps taken in different
/// node processes on the same machine compare directly. vDSO call, no syscall.
inline uint64_t MonotonicNanos() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

/// The time-stamp counter. On these hosts guest rdtsc equals host rdtsc; elsewhere a TSC offset applies.
inline uint64_t ReadTsc() {
  uint32_t lo, hi;
  asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

}  // namespace aggvm
