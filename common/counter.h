// A statistics counter that one thread (or a few) bumps on a hot path while others read it.
//
// Relaxed atomic: no ordering with anything else, no lock, no allocation. A struct of Counters is copyable, which
// takes a snapshot field by field (not one consistent cut: fine for statistics).
#pragma once

#include <atomic>
#include <cstdint>

namespace aggvm {

class Counter {
 public:
  Counter() = default;
  Counter(const Counter& other) : v_(other.load()) {}
  Counter& operator=(const Counter& other) {
    v_.store(other.load(), std::memory_order_relaxed);
    return *this;
  }
  void Add(uint64_t n = 1) { v_.fetch_add(n, std::memory_order_relaxed); }
  [[nodiscard]] uint64_t load() const { return v_.load(std::memory_order_relaxed); }
  operator uint64_t() const { return load(); }  // NOLINT(google-explicit-constructor): reads like a number

 private:
  std::atomic<uint64_t> v_{0};
};

}  // namespace aggvm
