#include "vcpu/interrupt_injector.h"

#include "absl/strings/str_cat.h"
#include "vcpu/vm.h"

namespace aggvm::vcpu {

const char* IrqchipModeName(IrqchipMode mode) { return mode == IrqchipMode::kUser ? "user" : "kernel"; }

absl::StatusOr<IrqchipMode> ParseIrqchipMode(std::string_view name) {
  if (name == "kernel") return IrqchipMode::kKernel;
  if (name == "user") return IrqchipMode::kUser;
  return absl::InvalidArgumentError(absl::StrCat("irqchip mode '", absl::string_view(name.data(), name.size()),
                                                 "' is not one of: kernel (KVM's LAPICs, split irqchip), user "
                                                 "(LAPIC models in userspace, KVM_INTERRUPT)"));
}

absl::Status KernelIrqchipInjector::InjectMsi(const MsiMessage& msi) {
  auto delivered = vm_.SignalMsi(msi);
  if (!delivered.ok()) return delivered.status();
  if (!*delivered) {
    return absl::UnavailableError(absl::StrCat("MSI (address ", absl::Hex(msi.address_lo), ", data ",
                                               absl::Hex(msi.data),
                                               ") was not accepted: no vCPU with that APIC ID, or its LAPIC is "
                                               "disabled (has the guest enabled it yet?)"));
  }
  return absl::OkStatus();
}

}  // namespace aggvm::vcpu
