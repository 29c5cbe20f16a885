// Heap-allocation counting for tests and benchmarks that prove a path allocates nothing.
//
// Linking the `aggvm_alloc_counter` library replaces the global operator new / delete (all forms, incl. array and
// aligned) of the whole binary with malloc-backed versions that count each allocation, per thread and per process.
// Take a reading before and after the code under test and compare.
#pragma once

#include <cstdint>

namespace aggvm::testing {

/// operator new calls made by the calling thread so far.
uint64_t ThreadAllocations();
/// operator new calls made by every thread of the process so far.
uint64_t ProcessAllocations();

}  // namespace aggvm::testing
