#include "vcpu/interrupt_injector.h"

#include "absl/strings/str_cat.h"
#include "vcpu/vm.h"

namespace aggvm::vcpu {

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
