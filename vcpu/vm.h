// A KVM virtual machine (api.rst §4, "VM ioctls"): the in-kernel interrupt controller setup, MSI signalling, GSI
// routing, and vCPU creation. Memory slots, irqfds and ioeventfds are their own RAII types (guest_memory.h,
// event_fd.h) that borrow the Vm: the Vm must outlive them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "absl/status/statusor.h"
#include "common/types.h"
#include "vcpu/msi.h"
#include "vcpu/unique_fd.h"

namespace aggvm::vcpu {

class Kvm;
class Vcpu;

/// One entry of the VM's GSI routing table: GSI -> MSI (api.rst, KVM_SET_GSI_ROUTING, KVM_IRQ_ROUTING_MSI).
struct GsiRoute {
  Gsi gsi;
  MsiMessage msi;
};

class Vm {
 public:
  Vm(Vm&&) noexcept = default;
  Vm& operator=(Vm&&) noexcept = default;

  [[nodiscard]] int fd() const { return fd_.get(); }

  /// KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP): LAPICs in KVM, IOAPIC/PIC left to userspace with `ioapic_pins` routes
  /// reserved. Must come before the first vCPU is created.
  absl::Status EnableSplitIrqchip(uint32_t ioapic_pins);
  /// KVM_ENABLE_CAP(KVM_CAP_X2APIC_API, flags): KVM_X2APIC_API_USE_32BIT_IDS makes MSI address_hi carry destination
  /// bits 31:8. Before the first vCPU.
  absl::Status EnableX2apicApi(uint64_t flags);
  /// KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR, reasons): MSR accesses KVM would fail (KVM_MSR_EXIT_REASON_INVAL),
  /// does not know (_UNKNOWN) or that the MSR filter denies (_FILTER) exit to userspace as KVM_EXIT_X86_RDMSR /
  /// WRMSR instead of raising #GP in the guest.
  absl::Status EnableUserSpaceMsr(uint32_t reasons);
  /// KVM_X86_SET_MSR_FILTER with default allow, denying reads and writes of each MSR in `deny` (at most 16). With
  /// EnableUserSpaceMsr(KVM_MSR_EXIT_REASON_FILTER) those accesses exit to userspace.
  absl::Status DenyMsrs(std::span<const uint32_t> deny);
  /// KVM_CREATE_VCPU with vCPU id = APIC ID, mapping its kvm_run.
  absl::StatusOr<Vcpu> CreateVcpu(ApicId id);
  /// KVM_SIGNAL_MSI. True = delivered to at least one LAPIC; false = the guest blocked it (no matching destination,
  /// LAPIC disabled).
  absl::StatusOr<bool> SignalMsi(const MsiMessage& msi);
  /// KVM_SET_GSI_ROUTING: replaces the whole table with `routes` (MSI routes only).
  absl::Status SetGsiRouting(std::span<const GsiRoute> routes);

 private:
  friend class Kvm;
  Vm(UniqueFd fd, size_t vcpu_mmap_size) : fd_(std::move(fd)), vcpu_mmap_size_(vcpu_mmap_size) {}
  UniqueFd fd_;
  size_t vcpu_mmap_size_ = 0;
};

}  // namespace aggvm::vcpu
