// One VM's data plane on the master: the transport as NodeId 0, connected to every node the VM is placed on, the
// GlobalController (IOAPIC + Router + console UART + doorbell, master/global_controller.h) built from the VM spec,
// and the data-plane thread that runs it. No gRPC here: the Master service drives it, tests and benches can too.
//
// Start-up is split in two so the agents can be prepared in between (docs/cluster.md, "data-plane bootstrap"):
//   Begin     creates the transport (listening on --data-listen) and starts Connect() to every node on a
//             background thread. TCP: the lower id dials the higher, so the master (0) dials each node's announced
//             data-plane address; a node that is not listening yet is retried until the connect timeout.
//   Activate  waits for Connect, builds the GlobalController (ControllerConfigFromSpec) and starts its thread.
//   Stop      stops the thread, hands over unfinished console lines, closes the transport. Idempotent.
// A node whose data-plane connection breaks is reported once through on_node_lost (on the data-plane thread: the
// callback must not block, and must not call Stop).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/types.h"
#include "irqchip/router.h"
#include "master/global_controller.h"
#include "proto/aggvm.pb.h"
#include "transport/rdma/verbs.h"
#include "transport/transport.h"

namespace aggvm::master {

namespace v1 = ::aggvm::v1;

/// A node of the VM as the data plane needs it.
struct VmNodeEndpoint {
  NodeId id{};
  std::string name;
  std::string tcp_address;  // the node's announced data-plane host:port
};

irqchip::RoutingPolicy ToRoutingPolicy(v1::RoutingPolicy policy);
v1::RoutingPolicy FromRoutingPolicy(irqchip::RoutingPolicy policy);

/// The GlobalController's configuration for a validated spec (master/vm_spec.h) and its topology: vCPU i on its
/// node with APIC ID i (x2APIC unless workload.xapic; the probe guest leaves the xAPIC LDR at 0), the IOAPIC entries
/// of spec.interrupt_routes, the routing policy. Static routes are applied after creation (GlobalController::
/// PinVector), see ApplyStaticRoutes. Pure: no sockets.
absl::StatusOr<GlobalControllerConfig> ControllerConfigFromSpec(const v1::VmSpec& spec, const v1::Topology& topology);

/// Replaces the controller's static-policy vector pins with `routes` (unpins the others). Any thread.
absl::Status ApplyStaticRoutes(GlobalController& gc, const google::protobuf::RepeatedPtrField<v1::StaticRoute>& routes);

struct VmDataPlaneOptions {
  /// host:port the master's data-plane transport listens on (--data-listen). If it is taken (another VM's data
  /// plane uses it) the same host with a free port is used: nodes never dial the master over TCP.
  std::string listen_address = "0.0.0.0:0";
  /// Bound on connecting to every node (Begin -> Activate).
  absl::Duration connect_timeout = absl::Seconds(30);
  /// Console lines (vCPU, text without '\n'), on the data-plane thread. May be empty.
  ConsoleSink console;
  /// A node's data-plane connection was lost (data-plane thread, once per node). May be empty.
  std::function<void(NodeId, const absl::Status&)> on_node_lost;
  /// The verbs device of a VM whose spec asks for TRANSPORT_KIND_RDMA (aggvm-master --rdma-device/-port/-gid-index).
  /// Its queue pairs are set up through a TCP bootstrap on listen_address (the nodes' on their data-plane addresses).
  transport::rdma::DeviceSelection rdma;
  /// CPUs of the data-plane thread (aggvm-master --dataplane-cpus; empty = wherever the process may run).
  std::vector<int> cpus;
};

class VmDataPlane {
 public:
  /// Creates the transport and starts connecting to `nodes` in the background. Fails at once for a spec the data
  /// plane cannot serve (RDMA with no verbs device: UNAVAILABLE naming the fix) or an address that cannot be bound.
  static absl::StatusOr<std::unique_ptr<VmDataPlane>> Begin(const v1::VmSpec& spec, const v1::Topology& topology,
                                                            std::vector<VmNodeEndpoint> nodes,
                                                            VmDataPlaneOptions options);
  ~VmDataPlane();
  VmDataPlane(const VmDataPlane&) = delete;
  VmDataPlane& operator=(const VmDataPlane&) = delete;

  /// Waits for the connections (naming the node that did not answer), creates the GlobalController and starts the
  /// data-plane thread.
  absl::Status Activate();
  /// Stops the data-plane thread, flushes the console, closes the transport. Idempotent; the destructor calls it.
  void Stop();

  /// The controller, once Activate succeeded (nullptr before).
  GlobalController* controller() { return controller_.get(); }
  /// The address the transport really listens on.
  [[nodiscard]] const std::string& listen_address() const { return listen_address_; }
  [[nodiscard]] const std::vector<VmNodeEndpoint>& nodes() const { return nodes_; }
  /// The endpoint of the node with data-plane id `id`, nullptr if not in the VM.
  [[nodiscard]] const VmNodeEndpoint* node(NodeId id) const;
  [[nodiscard]] const VmNodeEndpoint* node(std::string_view name) const;
  /// The transport's counters.
  [[nodiscard]] transport::TransportStats transport_stats() const;

 private:
  // The transport while Connect runs on its own (detached) thread: a VM whose start fails while the master is still
  // dialing does not wait for the connect timeout; the thread closes the transport when it ends abandoned.
  struct Connector;

  VmDataPlane() = default;

  v1::VmSpec spec_;
  v1::Topology topology_;
  std::vector<VmNodeEndpoint> nodes_;
  VmDataPlaneOptions options_;
  std::string listen_address_;
  std::shared_ptr<Connector> connector_;
  transport::Transport* transport_ = nullptr;  // connector_->transport once connected
  std::unique_ptr<GlobalController> controller_;
  std::jthread runner_;
  bool stopped_ = false;
};

}  // namespace aggvm::master
