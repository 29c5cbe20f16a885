// How the VMM puts an interrupt into the guest's local APICs, independent of where the LAPICs live.
//
// `kernel` irqchip mode (KernelIrqchipInjector, this folder): the LAPICs are KVM's (split irqchip); an MSI goes in
// with KVM_SIGNAL_MSI and KVM delivers it (posted interrupts on APICv hosts). `user` mode (UserIrqchipInjector,
// user_irqchip.h: LAPIC models in userspace, injection with KVM_INTERRUPT) implements the same interface, so callers
// — the runner, the interrupt router, a forwarded remote IPI — never know which mode runs.
#pragma once

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "irqchip/interrupt.h"
#include "vcpu/msi.h"

namespace aggvm::vcpu {

/// Where a VM's local APICs live, chosen per VM.
///   kKernel: KVM's LAPICs (split irqchip); injection with KVM_SIGNAL_MSI / irqfd (KernelIrqchipInjector).
///   kUser:   no in-kernel irqchip; one irqchip::LocalApic model per vCPU in this process, injection with
///            KVM_INTERRUPT (UserIrqchip / UserIrqchipInjector in user_irqchip.h).
enum class IrqchipMode : uint8_t { kKernel, kUser };
/// "kernel" or "user".
const char* IrqchipModeName(IrqchipMode mode);
/// Parses "kernel" / "user"; InvalidArgument naming the accepted values otherwise.
absl::StatusOr<IrqchipMode> ParseIrqchipMode(std::string_view name);

class Vm;

class InterruptInjector {
 public:
  virtual ~InterruptInjector() = default;
  /// Delivers `msi` (SDM vol. 3, 11.11). Unavailable when no LAPIC accepted it (no such destination, or the
  /// destination's LAPIC is software-disabled); other codes are failures of the mechanism. Thread-safe.
  virtual absl::Status InjectMsi(const MsiMessage& msi) = 0;
  /// Delivers one interrupt message to this VM's local APICs, e.g. what the master routed to this node (fixed,
  /// lowest priority already arbitrated, NMI, INIT, SIPI). Unavailable when no LAPIC accepted it. Thread-safe.
  /// Default: as an MSI (irqchip::EncodeMsi with KVM's 32-bit x2APIC IDs), so no shorthand and no SIPI (an MSI
  /// cannot carry delivery mode 110b, SDM 11.11.2): InvalidArgument for those. UserIrqchipInjector takes every mode.
  /// An INIT level de-assert (IsInitLevelDeassert) changes no APIC: Unavailable, nothing is sent (an MSI has no
  /// level bit, KVM would take it as an INIT).
  virtual absl::Status Deliver(const irqchip::InterruptMessage& message);
};

/// INIT level de-assert (SDM vol. 3, 11.6.1: delivery mode INIT, level 0, trigger mode level): it only synchronizes
/// arbitration IDs and resets no processor (KVM's LAPIC ignores it too, lapic.c __apic_accept_irq). Every path that
/// carries an INIT must drop it rather than lose its level bit and deliver a real INIT.
inline bool IsInitLevelDeassert(const irqchip::InterruptMessage& m) {
  return m.mode == irqchip::DeliveryMode::kInit && m.trigger == irqchip::TriggerMode::kLevel && !m.level;
}

/// `kernel` mode: KVM_SIGNAL_MSI on a VM with an in-kernel (split) irqchip. The Vm must outlive it.
class KernelIrqchipInjector final : public InterruptInjector {
 public:
  explicit KernelIrqchipInjector(Vm& vm) : vm_(vm) {}
  absl::Status InjectMsi(const MsiMessage& msi) override;

 private:
  Vm& vm_;
};

}  // namespace aggvm::vcpu
