// ClusterVmHost: the VM runner behind the node agent's control plane (control::VmHost) — this node's share of a VM
// whose vCPUs run on several nodes.
//
// Prepare(plan) builds, for the VM in the plan:
//   - the data-plane transport (the spec's tcp or rdma) as node plan.node_id, listening on this host's data-plane
//     address, and a background thread that connects it to the master (NodeId 0) and to the VM's other nodes
//     (PrepareVm does not wait for the mesh: the master dials after PrepareVm returned everywhere);
//   - a ProbeVm running only the local vCPUs (the whole guest RAM and image on every node), its console on the
//     master's 16550 UART (BootInfo AGGVM_BOOT_UART_CONSOLE);
//   - a LocalController (node-agent/local_controller.h) injecting through the vcpu layer's InterruptInjector, and an
//     IoForwarder: guest port I/O to the master devices (UART 0x3F8..0x3FF, doorbell 0x0A70..0x0A77) and MMIO to the
//     IOAPIC window (0xFEC00000..+0xFF) go to the master synchronously, the vCPU thread blocking for the answer;
//   - the data-plane thread: Connect, then LocalController::Run (kDeliver -> inject, kControl raise-gsi -> raise,
//     kIoResponse -> the forwarder).
// Exits: a level-triggered EOI (KVM_EXIT_IOAPIC_EOI in `kernel` mode, the user irqchip's EOI broadcast in `user`
// mode) -> LocalController::OnGuestEoi -> kEoi to the master. Records (port 0xA61) stay local and go to
// GuestOutput::Record; lines on the paravirtual console port (if a guest uses it) to GuestOutput::ConsoleLine.
//
// Level-triggered EOIs in `kernel` mode: KVM exits with KVM_EXIT_IOAPIC_EOI only for vectors that a level-triggered
// MSI route of the split irqchip's reserved GSIs (0..23) targets at that vCPU (arch/x86/kvm/irq_comm.c,
// kvm_scan_ioapic_routes). The host installs one such route per vector, with the broadcast destination (all local
// vCPUs), on the first level-triggered delivery of that vector and before injecting it (KVM_SET_GSI_ROUTING makes
// every vCPU rescan before its next entry, so the guest's EOI of that very delivery exits). At most 24 distinct
// level vectors per VM; a delivery beyond that is still injected but its EOI cannot be reported (counted in
// `level_routes_exhausted`: the master's remote IRR for that pin then stays set).
//
// Guest IPIs to vCPUs on other nodes (issue 6; docs/proxy.md, docs/dataplane.md): in `kernel` mode a vcpu::ProxySet
// with a proxy vCPU per remote vCPU plus `nowhere_proxies` for unused APIC IDs, its sink calling
// LocalController::ForwardIpi; in `user` mode UserIrqchip::SetRemote with a RemoteIpiSink calling ForwardIcr, and a
// thread reporting local PPR changes to the master (lowest priority). The spec's route_mode picks via-master or
// direct. Proxies start before the vCPUs and stop before them.
//
// Start waits (bounded by connect_timeout) for the data-plane mesh before running the vCPUs; Pause/Start pause and
// resume them; Stop stops the vCPUs, then the data-plane thread, then closes the transport. A lost master ends the
// data-plane thread and stops the vCPUs (logged). No per-interrupt logging, allocation or lock on the paths above.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "node-agent/control/vm_host.h"
#include "node-agent/io_forwarder.h"
#include "transport/rdma/verbs.h"

namespace aggvm::agent {

class ProbeVm;
class LocalController;

/// The GuestOutput::Record type of a traced interrupt injected on this node (not a guest record: guest/abi.h types
/// are < 0x100). The words are the frame's trace block as lab/trace_record.h packs it (a = raised, b/c/d = u32 ns
/// differences from it; 0xFFFFFFFF = not stamped). Reported for the node's first vCPU. Used by bench/cluster and the
/// latency lab to split the cross-node latency per hop.
inline constexpr uint32_t kTraceRecordType = 0x100;

struct ClusterVmHostOptions {
  /// host:port the data plane listens on (tcp transport, and the rdma bootstrap). Port 0: a free port is chosen once
  /// at Create and kept for the agent's life (it is advertised at registration).
  std::string data_listen = "0.0.0.0:0";
  /// The host the master and peers use to reach data_listen when it is a wildcard address (0.0.0.0 or empty).
  std::string advertise_host = "127.0.0.1";
  /// The guest image when the spec names none.
  std::string default_guest_elf;
  /// Which RDMA device a VM with transport RDMA uses.
  transport::rdma::DeviceSelection rdma;
  /// Bound on the data-plane mesh set-up (Prepare -> Start).
  absl::Duration connect_timeout = absl::Seconds(20);
  /// Forwarded I/O: how long a vCPU waits for the master's answer.
  IoForwarderOptions io;
  /// `kernel` irqchip mode: proxy vCPUs for this many APIC IDs that no vCPU has (num_vcpus, num_vcpus + 1, ...):
  /// a guest IPI to one of them is counted in local_controller.ipis_to_nowhere instead of vanishing in KVM.
  uint32_t nowhere_proxies = 2;
  /// Forwarded guest IPIs carry a trace block (hops as for device interrupts; the owner reports it as a
  /// kTraceRecordType record). Off by default: it adds one record per IPI.
  bool trace_ipis = false;
  /// `user` irqchip mode with vCPUs on other nodes: how often each local vCPU's PPR is checked and, when it changed,
  /// reported to the master (kControl priority) for lowest-priority arbitration. Zero disables.
  absl::Duration priority_report_interval = absl::Milliseconds(5);
  /// Thread placement (common/thread.h; empty = wherever the process may run): the VM's vCPU threads and proxy
  /// vCPUs, and the data-plane thread (a doorbell train's thread, started by it, inherits its CPUs). A list the
  /// kernel refuses fails PrepareVm (data plane) or StartVm (vCPUs) with the CPUs named.
  std::vector<int> vcpu_cpus;
  std::vector<int> dataplane_cpus;
  /// Notable events (one line each; never per interrupt). May be empty.
  std::function<void(const std::string&)> log;
};

class ClusterVmHost final : public control::VmHost {
 public:
  /// Resolves the data-plane listen address (a port 0 becomes a concrete free port). Opens no KVM object yet.
  static absl::StatusOr<std::unique_ptr<ClusterVmHost>> Create(ClusterVmHostOptions options);
  ~ClusterVmHost() override;
  ClusterVmHost(const ClusterVmHost&) = delete;
  ClusterVmHost& operator=(const ClusterVmHost&) = delete;

  /// What the agent registers as its DataPlaneEndpoint.tcp_address ("host:port").
  [[nodiscard]] std::string data_address() const;
  /// The address the data plane binds ("host:port", port resolved).
  [[nodiscard]] const std::string& listen_address() const { return listen_; }

  absl::Status Prepare(const control::LocalVmPlan& plan, control::GuestOutput& output) override;
  absl::Status Start() override;
  absl::Status Pause() override;
  absl::Status Stop() override;
  std::map<std::string, uint64_t> Stats() override;

  // --- for tests and diagnostics; valid between Prepare and Stop, nullptr otherwise ---
  ProbeVm* vm();
  LocalController* controller();
  /// Blocks until the data-plane mesh is up (or failed / timed out).
  absl::Status WaitConnected(absl::Duration timeout);

 private:
  struct Runtime;
  explicit ClusterVmHost(ClusterVmHostOptions options, std::string listen);
  void Log(const std::string& line) const;

  const ClusterVmHostOptions options_;
  const std::string listen_;
  std::mutex mu_;                     // serialises the VmHost calls against Stats() and the accessors
  std::unique_ptr<Runtime> rt_;       // the prepared VM, guarded by mu_
};

/// What this host offers, for the agent's registration: KVM (with the split irqchip, user-space MSR exits) and RDMA.
/// FAILED_PRECONDITION with what to do when /dev/kvm cannot be opened (the agent cannot run vCPUs then).
absl::StatusOr<control::v1::NodeCapabilities> ProbeNodeCapabilities(const transport::rdma::DeviceSelection& rdma);

}  // namespace aggvm::agent
