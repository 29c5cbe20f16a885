// The VmPort of a node running real vCPUs: a delivery becomes an MSI to the vCPU's APIC ID through the vcpu
// layer's InterruptInjector (KVM_SIGNAL_MSI in `kernel` irqchip mode, the userspace LAPIC in `user` mode).
//
// The MSI is physical-destination with the delivery's mode in data bits 10:8 (SDM vol. 3, 11.11.2); a
// level-triggered delivery sets data bits 15 (level) and 14 (assert). In kernel mode KVM reports the guest's EOI of
// such a vector (KVM_EXIT_IOAPIC_EOI) only if a level MSI route for that vector and destination is installed
// (KVM_SET_GSI_ROUTING, see tests/kvm/interrupt_test.cc): the agent installs one per level pin it programs.
#pragma once

#include <vector>

#include "common/types.h"
#include "node-agent/local_controller.h"
#include "vcpu/interrupt_injector.h"

namespace aggvm::agent {

class InjectorVmPort final : public VmPort {
 public:
  /// `apic_ids[i]` is the APIC ID of vCPU i of the VM. `injector` must outlive the port.
  InjectorVmPort(vcpu::InterruptInjector* injector, std::vector<ApicId> apic_ids)
      : injector_(injector), apic_ids_(std::move(apic_ids)) {}
  absl::Status Inject(VcpuIndex vcpu, Vector vector, irqchip::DeliveryMode mode, bool level_triggered) override;

 private:
  vcpu::InterruptInjector* injector_;
  std::vector<ApicId> apic_ids_;
};

}  // namespace aggvm::agent
