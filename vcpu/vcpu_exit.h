// One KVM_RUN exit, decoded once into a typed value (Documentation/virt/kvm/api.rst, "struct kvm_run").
//
// Decode() is the only code that reads the raw exit fields of `struct kvm_run`. Data spans point into the vCPU's
// mmapped kvm_run page: they are valid until the next KVM_RUN of that vCPU. For IoIn / MmioRead, writing the span
// is how the VMM completes the guest's read (KVM copies it into the guest on the next KVM_RUN).
#pragma once

#include <linux/kvm.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <variant>

#include "common/types.h"

namespace aggvm::vcpu {

/// IN from a port: fill `data` (size * count bytes).
struct IoIn {
  uint16_t port = 0;
  uint8_t size = 0;  // 1, 2 or 4
  uint32_t count = 0;
  std::span<uint8_t> data;
};
/// OUT to a port.
struct IoOut {
  uint16_t port = 0;
  uint8_t size = 0;
  uint32_t count = 0;
  std::span<const uint8_t> data;
  /// The first (for count == 1: the only) value written, zero-extended.
  [[nodiscard]] uint32_t Value() const;
};
/// A read of guest-physical memory no memslot or in-kernel device covers: fill `data`.
struct MmioRead {
  GuestAddress gpa;
  std::span<uint8_t> data;
};
/// A write to guest-physical memory no memslot or in-kernel device covers.
struct MmioWrite {
  GuestAddress gpa;
  std::span<const uint8_t> data;
};
/// Split irqchip: the guest EOI'd a level-triggered vector that a userspace IOAPIC (or a level MSI route) owns.
struct IoapicEoi {
  Vector vector;
};
/// HLT with no in-kernel LAPIC.
struct Hlt {};
/// Triple fault (SDM vol. 3, 6.15 "Double Fault Exception": a fault while delivering #DF shuts the CPU down).
struct Shutdown {};
/// KVM could not emulate or deliver something (suberror: KVM_INTERNAL_ERROR_*).
struct InternalError {
  uint32_t suberror = 0;
};
/// VM entry failed (hardware_entry_failure_reason).
struct FailEntry {
  uint64_t reason = 0;
  uint32_t cpu = 0;
};
/// KVM_RUN returned EINTR: the vCPU was kicked (signal or immediate_exit). Not a failure.
struct Kicked {};
/// The guest can accept an interrupt now (request_interrupt_window; userspace LAPIC mode).
struct IrqWindowOpen {};
/// PSCI-like system event (KVM_SYSTEM_EVENT_SHUTDOWN / RESET / CRASH ...).
struct SystemEvent {
  uint32_t type = 0;
};
/// An exit reason this VMM does not decode, or a malformed exit (detail says which).
struct UnknownExit {
  uint32_t reason = 0;
  std::string detail;
};

using VcpuExit = std::variant<IoIn, IoOut, MmioRead, MmioWrite, IoapicEoi, Hlt, Shutdown, InternalError, FailEntry,
                              Kicked, IrqWindowOpen, SystemEvent, UnknownExit>;

/// Decodes the exit in `run` (a kvm_run mapping of `mmap_size` bytes). Port data outside the mapping is refused as
/// UnknownExit rather than trusted.
VcpuExit DecodeExit(kvm_run& run, size_t mmap_size);

/// A short human-readable name of the exit, for error messages ("IoOut port 0x1234 size 1").
std::string DescribeExit(const VcpuExit& exit);

}  // namespace aggvm::vcpu
