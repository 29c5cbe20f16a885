// KVM ioctls whose argument ends in a flexible array, with the kernel's C layout.
//
// linux-libc-dev 6.1 declares those arrays with __DECLARE_FLEX_ARRAY, which in C++ puts an empty struct (1 byte in
// C++) before the array: sizeof(kvm_cpuid2) becomes 12 and `entries` moves to offset 12. Both the ioctl numbers
// (their size field comes from sizeof) and the array offset then disagree with the kernel. This header restates the
// C layout: an 8-byte header followed directly by the entries.
#pragma once

#include <linux/kvm.h>
#include <sys/ioctl.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>

namespace aggvm::vcpu::abi {

struct CountHeader {  // kvm_cpuid2 {nent, padding}, kvm_msrs {nmsrs, pad}, kvm_irq_routing {nr, flags}
  uint32_t count;
  uint32_t second;
};
static_assert(sizeof(CountHeader) == 8);

inline constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, CountHeader);
inline constexpr unsigned long kSetCpuid2 = _IOW(KVMIO, 0x90, CountHeader);
inline constexpr unsigned long kGetMsrs = _IOWR(KVMIO, 0x88, CountHeader);
inline constexpr unsigned long kSetGsiRouting = _IOW(KVMIO, 0x6a, CountHeader);
static_assert(kGetSupportedCpuid == 0xc008ae05ul && kSetCpuid2 == 0x4008ae90ul && kGetMsrs == 0xc008ae88ul &&
              kSetGsiRouting == 0x4008ae6aul, "values of the C headers");

/// An 8-byte header followed by `n` entries of E, 8-byte aligned, zeroed.
template <typename E>
class FlexBuffer {
 public:
  explicit FlexBuffer(size_t n) : n_(n), buf_(new uint64_t[(sizeof(CountHeader) + n * sizeof(E) + 7) / 8]()) {
    header()->count = static_cast<uint32_t>(n);
  }
  CountHeader* header() { return reinterpret_cast<CountHeader*>(buf_.get()); }
  E* entries() { return reinterpret_cast<E*>(reinterpret_cast<uint8_t*>(buf_.get()) + sizeof(CountHeader)); }
  void* arg() { return buf_.get(); }
  [[nodiscard]] size_t capacity() const { return n_; }

 private:
  size_t n_;
  std::unique_ptr<uint64_t[]> buf_;
};

}  // namespace aggvm::vcpu::abi
