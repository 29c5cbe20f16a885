// The side-effect boundary of the interrupt-controller models.
//
// The models (IoApic, LocalApic, Router) never do I/O: every effect they have on the outside world leaves through an
// InterruptSink that the caller injects. The wiring behind it decides what an effect means in a given process -- a
// KVM injection on this node, a frame to the master, a frame to the owner of a vCPU -- so every SDM rule is testable
// with a recording sink, without /dev/kvm or a network (cloud-hypervisor splits devices from routing the same way).
//
// Calls happen synchronously on the caller's thread, inside the model's method; a sink must not call back into the
// model that is calling it.
#pragma once

#include <optional>

#include "common/types.h"
#include "irqchip/interrupt.h"

namespace aggvm::irqchip {

class InterruptSink {
 public:
  virtual ~InterruptSink() = default;

  /// A controller put an interrupt message on the (virtual) system bus: an IOAPIC redirection entry fired, a device
  /// MSI was decoded, a local APIC sent an IPI. Destination resolution has not happened yet: the wiring hands it to a
  /// Router (master) or forwards it to the master (node). `gsi` is the source pin for IOAPIC messages (needed to
  /// match the EOI of a level-triggered interrupt, SDM vol. 3, 11.8.5 / 82093AA 3.2.4 "Remote IRR").
  virtual void SendMessage(const InterruptMessage& message, std::optional<Gsi> gsi) = 0;

  /// Inject `message` into vCPU `vcpu`, which runs on node `node` (the Router's decision for one destination).
  virtual void Deliver(VcpuIndex vcpu, NodeId node, const InterruptMessage& message) = 0;

  /// A local APIC EOI'd a level-triggered vector (TMR bit set): every IOAPIC must clear the remote IRR of the pins
  /// routed to `vector` (SDM vol. 3, 11.8.5 "Signaling Interrupt Servicing Completion").
  virtual void BroadcastEoi(Vector vector) = 0;

  /// Send `message` to node `node` for it to handle (node -> master for routing, master -> owner for a remote vCPU).
  virtual void Forward(NodeId node, const InterruptMessage& message) = 0;
};

}  // namespace aggvm::irqchip
