#include "master/vm_dataplane.h"

#include <condition_variable>
#include <map>
#include <mutex>

#include <fmt/format.h>

#include "common/thread.h"
#include "irqchip/destination.h"
#include "transport/rdma/rdma_transport.h"
#include "transport/rdma/tcp_bootstrap.h"
#include "transport/tcp_transport.h"

namespace aggvm::master {

using irqchip::DeliveryMode;
using irqchip::DestMode;
using irqchip::RoutingPolicy;
using irqchip::TriggerMode;

irqchip::RoutingPolicy ToRoutingPolicy(v1::RoutingPolicy policy) {
  switch (policy) {
    case v1::ROUTING_POLICY_ROUND_ROBIN: return RoutingPolicy::kRoundRobin;
    case v1::ROUTING_POLICY_NODE_LOCAL_FIRST: return RoutingPolicy::kNodeLocalFirst;
    case v1::ROUTING_POLICY_STATIC: return RoutingPolicy::kStatic;
    default: return RoutingPolicy::kSdm;
  }
}

v1::RoutingPolicy FromRoutingPolicy(irqchip::RoutingPolicy policy) {
  switch (policy) {
    case RoutingPolicy::kRoundRobin: return v1::ROUTING_POLICY_ROUND_ROBIN;
    case RoutingPolicy::kNodeLocalFirst: return v1::ROUTING_POLICY_NODE_LOCAL_FIRST;
    case RoutingPolicy::kStatic: return v1::ROUTING_POLICY_STATIC;
    case RoutingPolicy::kSdm: break;
  }
  return v1::ROUTING_POLICY_SDM;
}

absl::StatusOr<GlobalControllerConfig> ControllerConfigFromSpec(const v1::VmSpec& spec, const v1::Topology& topology) {
  GlobalControllerConfig c;
  const uint32_t n = spec.vcpus();
  if (n == 0 || static_cast<uint32_t>(topology.vcpus_size()) != n) {
    return absl::InvalidArgumentError(fmt::format("VM '{}': the topology lists {} vCPUs but the spec has {}",
                                                  spec.name(), topology.vcpus_size(), n));
  }
  c.vcpus.resize(n);
  std::vector<bool> seen(n, false);
  std::map<uint32_t, bool> nodes;
  for (const auto& vp : topology.vcpus()) {
    if (vp.vcpu() >= n || seen[vp.vcpu()] || vp.node_id() == 0 || vp.node_id() > 0xFFFF) {
      return absl::InvalidArgumentError(fmt::format("VM '{}': bad topology entry vCPU {} on node id {}", spec.name(),
                                                    vp.vcpu(), vp.node_id()));
    }
    seen[vp.vcpu()] = true;
    const NodeId node(static_cast<uint16_t>(vp.node_id()));
    if (spec.workload().xapic()) {
      VcpuPlacement p;
      p.node = node;
      p.apic.id = ApicId(vp.apic_id());
      p.apic.x2apic = false;
      p.apic.ldr = 0;  // the probe guest does not program the xAPIC LDR
      p.apic.enabled = true;
      c.vcpus[vp.vcpu()] = p;
    } else {
      c.vcpus[vp.vcpu()] = X2apicVcpu(node, ApicId(vp.apic_id()));
    }
    nodes[vp.node_id()] = true;
  }
  for (const auto& [id, unused] : nodes) c.nodes.push_back(NodeId(static_cast<uint16_t>(id)));
  for (const auto& r : spec.interrupt_routes()) {
    const auto mode = r.delivery() == v1::INTERRUPT_DELIVERY_LOWEST_PRIORITY ? DeliveryMode::kLowestPriority
                                                                               : DeliveryMode::kFixed;
    const auto dest = r.dest_mode() == v1::DESTINATION_MODE_LOGICAL ? DestMode::kLogical : DestMode::kPhysical;
    const auto trig = r.trigger() == v1::INTERRUPT_TRIGGER_LEVEL ? TriggerMode::kLevel : TriggerMode::kEdge;
    if (r.gsi() >= c.ioapic.pins || r.vector() < 16 || r.vector() > 255 || r.destination() > 0xFF) {
      return absl::InvalidArgumentError(fmt::format("VM '{}': interrupt route for GSI {} is out of range (validate "
                                                    "the spec first)", spec.name(), r.gsi()));
    }
    c.pins.push_back(PinProgram{r.gsi(), RedirectionEntry(Vector(static_cast<uint8_t>(r.vector())), mode, dest, trig,
                                                          static_cast<uint8_t>(r.destination()), r.masked())});
  }
  c.router.policy = ToRoutingPolicy(spec.routing_policy());
  c.wait_mode = spec.wait_mode() == v1::WAIT_MODE_BUSY_POLL ? transport::WaitMode::kBusyPoll
                                                            : transport::WaitMode::kEvent;
  return c;
}

absl::Status ApplyStaticRoutes(GlobalController& gc,
                               const google::protobuf::RepeatedPtrField<v1::StaticRoute>& routes) {
  auto table = gc.GetRoutingTable();
  if (!table.ok()) return table.status();
  for (const auto& [vector, vcpu] : table->vector_pins) {
    if (auto s = gc.PinVector(vector, std::nullopt); !s.ok()) return s;
  }
  for (const auto& r : routes) {
    if (auto s = gc.PinVector(Vector(static_cast<uint8_t>(r.vector())), VcpuIndex(r.vcpu())); !s.ok()) return s;
  }
  return absl::OkStatus();
}

// ------------------------------------------------------------------------------------------------------------------

namespace {

// The listen address with its port replaced by 0 (any free port of the same host), or "" if it has no port.
std::string AnyPort(const std::string& address) {
  const auto colon = address.rfind(':');
  return colon == std::string::npos ? std::string() : address.substr(0, colon) + ":0";
}

// TCP: the master listens on `listen_address` (the nodes never dial it: the lower id dials, and the master is 0); if
// it is taken (another VM's data plane), any port of the same host.
absl::StatusOr<std::unique_ptr<transport::Transport>> OpenTcp(const VmDataPlaneOptions& o, transport::WaitMode mode,
                                                             std::string& listening) {
  transport::TcpTransportOptions to;
  to.wait_mode = mode;
  to.listen_address = o.listen_address;
  auto t = transport::TcpTransport::Create(NodeId(0), to);
  if (!t.ok() && t.status().code() == absl::StatusCode::kUnavailable && !AnyPort(to.listen_address).empty()) {
    to.listen_address = AnyPort(to.listen_address);
    t = transport::TcpTransport::Create(NodeId(0), to);
  }
  if (!t.ok()) return t.status();
  listening = fmt::format("{}:{}", to.listen_address.substr(0, to.listen_address.rfind(':')), (*t)->listen_port());
  return std::unique_ptr<transport::Transport>(*std::move(t));
}

// RDMA: one RC queue pair per node on the chosen verbs device, set up through a TCP bootstrap listening where the
// TCP transport would (the same fallback to any port). With no device: UNAVAILABLE saying how to fix it.
absl::StatusOr<std::unique_ptr<transport::Transport>> OpenRdma(const VmDataPlaneOptions& o, transport::WaitMode mode,
                                                              std::string& listening) {
  auto boot = transport::rdma::TcpBootstrap::Listen(NodeId(0), o.listen_address);
  if (!boot.ok() && boot.status().code() == absl::StatusCode::kUnavailable && !AnyPort(o.listen_address).empty()) {
    boot = transport::rdma::TcpBootstrap::Listen(NodeId(0), AnyPort(o.listen_address));
  }
  if (!boot.ok()) return boot.status();
  const std::string address = (*boot)->address();
  transport::rdma::RdmaOptions ro;
  ro.self = NodeId(0);
  ro.device = o.rdma;
  ro.wait_mode = mode;
  auto t = transport::rdma::RdmaTransport::Create(ro, *std::move(boot));
  if (!t.ok()) return t.status();
  listening = address;
  return std::unique_ptr<transport::Transport>(*std::move(t));
}

}  // namespace

struct VmDataPlane::Connector {
  std::unique_ptr<transport::Transport> transport;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;       // guarded by mu
  bool abandoned = false;  // guarded by mu: nobody will use the transport; the thread closes it
  absl::Status result;     // guarded by mu
};

absl::StatusOr<std::unique_ptr<VmDataPlane>> VmDataPlane::Begin(const v1::VmSpec& spec, const v1::Topology& topology,
                                                                std::vector<VmNodeEndpoint> nodes,
                                                                VmDataPlaneOptions options) {
  for (const auto& n : nodes) {
    if (n.tcp_address.empty()) {
      return absl::FailedPreconditionError(fmt::format(
          "VM '{}': node '{}' (id {}) registered no data-plane tcp address; start its agent with --data-listen "
          "HOST:PORT", spec.name(), n.name, n.id.value()));
    }
  }
  auto dp = std::unique_ptr<VmDataPlane>(new VmDataPlane());
  dp->spec_ = spec;
  dp->topology_ = topology;
  dp->nodes_ = std::move(nodes);
  dp->options_ = std::move(options);

  const transport::WaitMode wait_mode = spec.wait_mode() == v1::WAIT_MODE_BUSY_POLL ? transport::WaitMode::kBusyPoll
                                                                                  : transport::WaitMode::kEvent;
  auto t = spec.transport() == v1::TRANSPORT_KIND_RDMA ? OpenRdma(dp->options_, wait_mode, dp->listen_address_)
                                                       : OpenTcp(dp->options_, wait_mode, dp->listen_address_);
  if (!t.ok()) {
    return absl::Status(t.status().code(), fmt::format("VM '{}': cannot open the master's data-plane transport: {}",
                                                       spec.name(), std::string(t.status().message())));
  }
  auto connector = std::make_shared<Connector>();
  connector->transport = *std::move(t);
  dp->connector_ = connector;

  std::vector<transport::PeerEndpoint> peers;
  for (const auto& n : dp->nodes_) peers.push_back(transport::PeerEndpoint{n.id, n.tcp_address});
  std::thread([connector, peers = std::move(peers), timeout = dp->options_.connect_timeout] {
    absl::Status s = connector->transport->Connect(peers, timeout);
    std::lock_guard l(connector->mu);
    connector->result = std::move(s);
    connector->done = true;
    if (connector->abandoned) connector->transport->Close();
    connector->cv.notify_all();
  }).detach();
  return dp;
}

VmDataPlane::~VmDataPlane() { Stop(); }

absl::Status VmDataPlane::Activate() {
  if (stopped_) return absl::FailedPreconditionError("the VM's data plane was stopped");
  if (controller_) return absl::OkStatus();
  {
    std::unique_lock l(connector_->mu);
    connector_->cv.wait(l, [&] { return connector_->done; });
    if (!connector_->result.ok()) {
      return absl::Status(connector_->result.code(),
                          fmt::format("VM '{}': the master could not connect its data plane to the nodes: {}",
                                      spec_.name(), std::string(connector_->result.message())));
    }
  }
  transport_ = connector_->transport.get();
  auto config = ControllerConfigFromSpec(spec_, topology_);
  if (!config.ok()) return config.status();
  config->console = options_.console;
  config->on_node_lost = options_.on_node_lost;
  auto gc = GlobalController::Create(*std::move(config), transport_);
  if (!gc.ok()) {
    return absl::Status(gc.status().code(), fmt::format("VM '{}': the global interrupt controller refused the spec: "
                                                        "{}", spec_.name(), std::string(gc.status().message())));
  }
  controller_ = *std::move(gc);
  GlobalController* c = controller_.get();
  // The thread places itself before it runs anything; a refused placement fails Activate.
  auto runner = StartPlacedThread("dataplane", options_.cpus, [c](std::stop_token st) { (void)c->Run(st); });
  if (!runner.ok()) {
    controller_.reset();  // a later Activate starts over
    return absl::Status(runner.status().code(), fmt::format("VM '{}': the master's data-plane thread: {}",
                                                            spec_.name(), std::string(runner.status().message())));
  }
  runner_ = *std::move(runner);
  // Static pins before the agents start their vCPUs (the master calls their StartVm after Activate).
  if (spec_.routing_policy() == v1::ROUTING_POLICY_STATIC) {
    if (auto s = ApplyStaticRoutes(*c, spec_.static_routes()); !s.ok()) return s;
  }
  return absl::OkStatus();
}

void VmDataPlane::Stop() {
  if (stopped_) return;
  stopped_ = true;
  if (runner_.joinable()) {
    (void)controller_->FlushConsole(absl::Milliseconds(200));  // unfinished console lines, while Run() still runs
    runner_.request_stop();
    runner_.join();
  }
  if (!connector_) return;
  std::lock_guard l(connector_->mu);
  if (connector_->done) {
    connector_->transport->Close();
  } else {
    // Still dialing (a node that never prepared): Connect cannot be interrupted and the transport serves one thread
    // at a time, so the connecting thread closes it when Connect gives up.
    connector_->abandoned = true;
  }
}

const VmNodeEndpoint* VmDataPlane::node(NodeId id) const {
  for (const auto& n : nodes_) {
    if (n.id == id) return &n;
  }
  return nullptr;
}

const VmNodeEndpoint* VmDataPlane::node(std::string_view name) const {
  for (const auto& n : nodes_) {
    if (n.name == name) return &n;
  }
  return nullptr;
}

transport::TransportStats VmDataPlane::transport_stats() const {
  if (!connector_) return {};
  std::lock_guard l(connector_->mu);
  return connector_->done ? connector_->transport->stats() : transport::TransportStats{};
}

}  // namespace aggvm::master
