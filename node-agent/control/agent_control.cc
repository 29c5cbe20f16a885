#include "node-agent/control/agent_control.h"

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>

#include "node-agent/control/node_agent_service.h"

namespace aggvm::agent::control {
namespace {

// Forwards guest output to the master, showing records to the tap first.
class TappedOutput final : public GuestOutput {
 public:
  TappedOutput(GuestOutput& next, std::function<void(uint32_t, uint64_t, uint64_t, uint64_t, uint64_t)> tap)
      : next_(next), tap_(std::move(tap)) {}
  void ConsoleLine(const std::string& vm, VcpuIndex vcpu, std::string_view text) override {
    next_.ConsoleLine(vm, vcpu, text);
  }
  void Record(const std::string& vm, VcpuIndex vcpu, uint32_t type, uint64_t a, uint64_t b, uint64_t c,
              uint64_t d) override {
    if (tap_) tap_(type, a, b, c, d);
    next_.Record(vm, vcpu, type, a, b, c, d);
  }

 private:
  GuestOutput& next_;
  std::function<void(uint32_t, uint64_t, uint64_t, uint64_t, uint64_t)> tap_;
};

}  // namespace

struct AgentControlPlane::Impl {
  std::unique_ptr<TappedOutput> output;
  std::unique_ptr<NodeAgentService> service;
  std::unique_ptr<grpc::Server> server;
  VmHost* host = nullptr;
  int port = 0;
  bool shut_down = false;
  uint64_t registrations = 0;  // touched only by the registering thread (Start, then the heartbeat thread)
};

absl::StatusOr<std::unique_ptr<AgentControlPlane>> AgentControlPlane::Start(const AgentControlOptions& options,
                                                                            VmHost& host) {
  auto impl = std::make_unique<Impl>();
  impl->host = &host;
  MasterClientOptions copt;
  copt.master_address = options.master_address;
  copt.node = options.node;
  copt.data_plane = options.data_plane;
  copt.capabilities = options.capabilities;
  copt.software_version = "aggvm 0.1.0";
  copt.log = options.log;
  Impl* raw = impl.get();
  copt.on_registered = [raw](NodeId id) {
    raw->service->set_node_id(id);
    // Registering again means the master had dropped this node (marked LOST): it failed the VM this node held, so
    // this node's share of it is an orphan.
    if (raw->registrations++ > 0) raw->service->StopHeldVm();
  };
  auto client = std::make_unique<MasterClient>(copt);
  impl->output = std::make_unique<TappedOutput>(*client, options.record_tap);
  impl->service = std::make_unique<NodeAgentService>(options.node, host, *impl->output);

  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, grpc::InsecureServerCredentials(), &impl->port);
  builder.RegisterService(impl->service.get());
  impl->server = builder.BuildAndStart();
  if (!impl->server || impl->port == 0) {
    return absl::UnavailableError(fmt::format("node '{}': cannot listen on '{}' for the NodeAgent service",
                                              options.node, options.listen_address));
  }
  // Advertise the listen host itself when it names one; a wildcard (or empty) host is replaced by advertise_host.
  std::string host_part = options.listen_address.substr(0, options.listen_address.rfind(':'));
  if (host_part.empty() || host_part == "0.0.0.0" || host_part == "[::]" || host_part == "::") {
    host_part = options.advertise_host;
  }
  client->set_control_address(fmt::format("{}:{}", host_part, impl->port));
  std::unique_ptr<AgentControlPlane> agent(new AgentControlPlane(std::move(impl), std::move(client)));
  if (auto st = agent->client_->Start(options.register_deadline); !st.ok()) return st;
  return agent;
}

AgentControlPlane::AgentControlPlane(std::unique_ptr<Impl> impl, std::unique_ptr<MasterClient> client)
    : impl_(std::move(impl)), client_(std::move(client)) {}

AgentControlPlane::~AgentControlPlane() { Shutdown(); }

int AgentControlPlane::port() const { return impl_->port; }

NodeId AgentControlPlane::node_id() const { return client_->node_id(); }

std::map<std::string, uint64_t> AgentControlPlane::Counters() {
  auto m = impl_->service->Counters();
  m["control.heartbeats_ok"] = client_->heartbeats_ok();
  m["control.heartbeat_failures"] = client_->heartbeat_failures();
  m["control.registrations"] = client_->registrations();
  m["control.output_dropped"] = client_->output_dropped();
  return m;
}

std::string AgentControlPlane::vm() const { return impl_->service->vm(); }

void AgentControlPlane::Shutdown() {
  if (impl_->shut_down) return;
  impl_->shut_down = true;
  client_->Stop();
  impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  impl_->server->Wait();
  // A VM still held is stopped: nothing keeps running without a control plane.
  impl_->service->StopHeldVm();
}

}  // namespace aggvm::agent::control
