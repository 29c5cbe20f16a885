#include "node-agent/injector_vm_port.h"

#include <fmt/format.h>

#include "vcpu/msi.h"

namespace aggvm::agent {

absl::Status InjectorVmPort::Inject(VcpuIndex vcpu, Vector vector, irqchip::DeliveryMode mode,
                                    bool level_triggered) {
  if (vcpu.value() >= apic_ids_.size()) {
    return absl::InvalidArgumentError(fmt::format("inject: vCPU {} has no APIC ID here ({} vCPUs)", vcpu,
                                                  apic_ids_.size()));
  }
  vcpu::MsiMessage msi = vcpu::FixedMsi(apic_ids_[vcpu.value()], vector,
                                        level_triggered ? vcpu::MsiTrigger::kLevel : vcpu::MsiTrigger::kEdge);
  msi.data |= static_cast<uint32_t>(mode) << 8;  // bits 10:8 delivery mode (FixedMsi leaves 000 = fixed)
  return injector_->InjectMsi(msi);
}

}  // namespace aggvm::agent
