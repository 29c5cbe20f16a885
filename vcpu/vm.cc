#include "vcpu/vm.h"

#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include <memory>

#include "absl/strings/str_cat.h"
#include "vcpu/errno_status.h"
#include "vcpu/kvm_abi.h"
#include "vcpu/vcpu.h"

namespace aggvm::vcpu {

absl::Status Vm::EnableSplitIrqchip(uint32_t ioapic_pins) {
  kvm_enable_cap cap{};
  cap.cap = KVM_CAP_SPLIT_IRQCHIP;
  cap.args[0] = ioapic_pins;
  if (::ioctl(fd_.get(), KVM_ENABLE_CAP, &cap) != 0) {
    return ErrnoStatus(errno, absl::StrCat("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP, ", ioapic_pins, ")"),
                       "it must be enabled before any vCPU is created");
  }
  return absl::OkStatus();
}

absl::Status Vm::EnableX2apicApi(uint64_t flags) {
  kvm_enable_cap cap{};
  cap.cap = KVM_CAP_X2APIC_API;
  cap.args[0] = flags;
  if (::ioctl(fd_.get(), KVM_ENABLE_CAP, &cap) != 0) {
    return ErrnoStatus(errno, absl::StrCat("KVM_ENABLE_CAP(KVM_CAP_X2APIC_API, ", flags, ")"),
                       "it must be enabled before any vCPU is created");
  }
  return absl::OkStatus();
}

absl::Status Vm::EnableUserSpaceMsr(uint32_t reasons) {
  kvm_enable_cap cap{};
  cap.cap = KVM_CAP_X86_USER_SPACE_MSR;
  cap.args[0] = reasons;
  if (::ioctl(fd_.get(), KVM_ENABLE_CAP, &cap) != 0) {
    return ErrnoStatus(errno, absl::StrCat("KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR, ", absl::Hex(reasons), ")"));
  }
  return absl::OkStatus();
}

absl::Status Vm::DenyMsrs(std::span<const uint32_t> deny) {
  if (deny.size() > KVM_MSR_FILTER_MAX_RANGES) {
    return absl::InvalidArgumentError(
        absl::StrCat("MSR filter: ", deny.size(), " MSRs to deny, KVM takes at most ", KVM_MSR_FILTER_MAX_RANGES));
  }
  // One single-MSR range per denied MSR; its bitmap bit 0 is 0 = deny (api.rst, KVM_X86_SET_MSR_FILTER). KVM copies
  // the bitmaps during the ioctl.
  uint8_t deny_bitmap = 0;
  kvm_msr_filter filter{};
  filter.flags = KVM_MSR_FILTER_DEFAULT_ALLOW;
  for (size_t i = 0; i < deny.size(); ++i) {
    filter.ranges[i].flags = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE;
    filter.ranges[i].nmsrs = 1;
    filter.ranges[i].base = deny[i];
    filter.ranges[i].bitmap = &deny_bitmap;
  }
  if (::ioctl(fd_.get(), KVM_X86_SET_MSR_FILTER, &filter) != 0) {
    return ErrnoStatus(errno, absl::StrCat("KVM_X86_SET_MSR_FILTER (", deny.size(), " MSRs denied)"),
                       "needs KVM_CAP_X86_MSR_FILTER");
  }
  return absl::OkStatus();
}

absl::StatusOr<Vcpu> Vm::CreateVcpu(ApicId id) {
  UniqueFd fd(::ioctl(fd_.get(), KVM_CREATE_VCPU, static_cast<unsigned long>(id.value())));
  if (!fd.valid()) return ErrnoStatus(errno, absl::StrCat("KVM_CREATE_VCPU(", id.value(), ")"));
  void* run = ::mmap(nullptr, vcpu_mmap_size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (run == MAP_FAILED) return ErrnoStatus(errno, absl::StrCat("mmap of kvm_run for vCPU ", id.value()));
  return Vcpu(std::move(fd), static_cast<kvm_run*>(run), vcpu_mmap_size_, id);
}

absl::StatusOr<bool> Vm::SignalMsi(const MsiMessage& msi) {
  kvm_msi m{};
  m.address_lo = msi.address_lo;
  m.address_hi = msi.address_hi;
  m.data = msi.data;
  const int r = ::ioctl(fd_.get(), KVM_SIGNAL_MSI, &m);
  if (r < 0) {
    return ErrnoStatus(errno, absl::StrCat("KVM_SIGNAL_MSI(address ", absl::Hex(msi.address_lo), ", data ",
                                           absl::Hex(msi.data), ")"));
  }
  return r > 0;
}

absl::Status Vm::SetGsiRouting(std::span<const GsiRoute> routes) {
  abi::FlexBuffer<kvm_irq_routing_entry> table(routes.size());
  for (size_t i = 0; i < routes.size(); ++i) {
    kvm_irq_routing_entry& e = table.entries()[i];
    e = {};
    e.gsi = routes[i].gsi.value();
    e.type = KVM_IRQ_ROUTING_MSI;
    e.u.msi.address_lo = routes[i].msi.address_lo;
    e.u.msi.address_hi = routes[i].msi.address_hi;
    e.u.msi.data = routes[i].msi.data;
  }
  if (::ioctl(fd_.get(), abi::kSetGsiRouting, table.arg()) != 0) {
    return ErrnoStatus(errno, absl::StrCat("KVM_SET_GSI_ROUTING (", routes.size(), " MSI routes)"),
                       "GSIs must be below KVM_CAP_IRQ_ROUTING's limit");
  }
  return absl::OkStatus();
}

}  // namespace aggvm::vcpu
