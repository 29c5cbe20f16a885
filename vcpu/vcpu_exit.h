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
/// The guest EOI'd a level-triggered vector that a userspace IOAPIC (or a level MSI route) owns. Split irqchip:
/// KVM_EXIT_IOAPIC_EOI. User irqchip: the LocalApic model's EOI broadcast, surfaced as this same exit.
struct IoapicEoi {
  Vector vector;
};
/// HLT with no in-kernel LAPIC (KVM_EXIT_HLT). RIP is already past the HLT.
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
/// Why an MSR access exited to userspace (KVM_CAP_X86_USER_SPACE_MSR; api.rst, "KVM_EXIT_X86_RDMSR / WRMSR").
enum class MsrExitReason : uint8_t {
  kUnknown,  // KVM_MSR_EXIT_REASON_UNKNOWN: KVM does not know the MSR
  kInvalid,  // KVM_MSR_EXIT_REASON_INVAL: KVM would inject #GP (e.g. x2APIC MSRs without an in-kernel LAPIC)
  kFilter,   // KVM_MSR_EXIT_REASON_FILTER: denied by the VM's MSR filter (KVM_X86_SET_MSR_FILTER)
  kOther,    // a reason this VMM does not know
};
/// RDMSR that userspace completes: Reply(value) or InjectGp(). Exactly one of them before the next KVM_RUN;
/// without either the guest reads 0.
struct MsrRead {
  uint32_t index = 0;
  MsrExitReason reason = MsrExitReason::kOther;
  __u64* data = nullptr;     // into kvm_run
  uint8_t* error = nullptr;  // into kvm_run
  void Reply(uint64_t value) const {
    *data = value;
    *error = 0;
  }
  /// KVM injects #GP into the guest on the next KVM_RUN (the MSR-exit protocol: kvm_run->msr.error = 1).
  void InjectGp() const { *error = 1; }
};
/// WRMSR (edx:eax in `value`) that userspace completes: nothing to do to accept it, InjectGp() to refuse it.
struct MsrWrite {
  uint32_t index = 0;
  MsrExitReason reason = MsrExitReason::kOther;
  uint64_t value = 0;
  uint8_t* error = nullptr;  // into kvm_run
  void InjectGp() const { *error = 1; }
};
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
                              Kicked, IrqWindowOpen, SystemEvent, MsrRead, MsrWrite, UnknownExit>;

/// Decodes the exit in `run` (a kvm_run mapping of `mmap_size` bytes). Port data outside the mapping is refused as
/// UnknownExit rather than trusted.
VcpuExit DecodeExit(kvm_run& run, size_t mmap_size);

/// A short human-readable name of the exit, for error messages ("IoOut port 0x1234 size 1").
std::string DescribeExit(const VcpuExit& exit);

}  // namespace aggvm::vcpu
