#include "tests/support/alloc_counter.h"

#include <atomic>
#include <cstdlib>
#include <new>

namespace aggvm::testing {
namespace {
thread_local uint64_t t_allocations = 0;
std::atomic<uint64_t> g_allocations{0};

void Count() {
  ++t_allocations;
  g_allocations.fetch_add(1, std::memory_order_relaxed);
}

void* Allocate(std::size_t n) {
  Count();
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}

void* AllocateAligned(std::size_t n, std::align_val_t a) {
  Count();
  const std::size_t align = static_cast<std::size_t>(a);
  const std::size_t size = ((n == 0 ? 1 : n) + align - 1) / align * align;  // aligned_alloc wants a multiple
  if (void* p = std::aligned_alloc(align, size)) return p;
  throw std::bad_alloc();
}
}  // namespace

uint64_t ThreadAllocations() { return t_allocations; }
uint64_t ProcessAllocations() { return g_allocations.load(std::memory_order_relaxed); }

}  // namespace aggvm::testing

// GCC flags free() in the replaced operator delete as mismatched once it inlines them into std containers; the pair
// is consistent (malloc / aligned_alloc with free).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(std::size_t n) { return aggvm::testing::Allocate(n); }
void* operator new[](std::size_t n) { return aggvm::testing::Allocate(n); }
void* operator new(std::size_t n, std::align_val_t a) { return aggvm::testing::AllocateAligned(n, a); }
void* operator new[](std::size_t n, std::align_val_t a) { return aggvm::testing::AllocateAligned(n, a); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
