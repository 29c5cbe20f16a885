#include "vcpu/interrupt_injector.h"

#include "absl/strings/str_cat.h"
#include "irqchip/msi.h"
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

absl::Status InterruptInjector::Deliver(const irqchip::InterruptMessage& message) {
  if (IsInitLevelDeassert(message)) {
    // KVM_SIGNAL_MSI delivers with level 1 (an MSI has no level bit): the de-assert would become an INIT.
    return absl::UnavailableError("an INIT level de-assert changes no local APIC (SDM vol. 3, 11.6.1): not sent");
  }
  irqchip::MsiDecodeOptions options;
  options.extended_dest_id = false;
  options.x2apic_32bit_ids = true;  // vcpu/msi.h: destination bits 31:8 in address_hi
  auto msi = irqchip::EncodeMsi(message, options);
  if (!msi.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot deliver this message as an MSI: ", msi.status().message(),
                                                   " (use the user irqchip, or a mode-specific path)"));
  }
  MsiMessage m;
  m.address_lo = static_cast<uint32_t>(msi->address);
  m.address_hi = static_cast<uint32_t>(msi->address >> 32) << 8;  // irqchip: bits 31:8 shifted down; KVM: in place
  m.data = msi->data;
  return InjectMsi(m);
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
