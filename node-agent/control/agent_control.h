// The node agent's control plane in one object: the NodeAgent gRPC service (driving a VmHost) listening on this
// node, and the MasterClient that registers the node and heartbeats. The agent daemon and the tests create one per
// node. No gRPC types in this header.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "node-agent/control/master_client.h"
#include "node-agent/control/vm_host.h"

namespace aggvm::agent::control {

struct AgentControlOptions {
  std::string node;                                 // unique node name
  std::string master_address;                       // host:port of aggvm-master
  std::string listen_address = "0.0.0.0:0";         // NodeAgent service; port 0 picks a free port
  std::string advertise_host = "127.0.0.1";         // host the master uses to reach the NodeAgent service
  v1::DataPlaneEndpoint data_plane;
  v1::NodeCapabilities capabilities;
  absl::Duration register_deadline = absl::Seconds(10);
  std::function<void(const std::string&)> log;      // notable events, one line each; may be empty
  /// Sees every guest/host record the VM reports (type, a, b, c) before it is queued for the master, on the
  /// reporting thread: must be cheap and must not block (the metrics endpoint's trace-record histograms). May be empty.
  std::function<void(uint32_t, uint64_t, uint64_t, uint64_t, uint64_t)> record_tap;
};

class AgentControlPlane {
 public:
  /// Starts the NodeAgent service, then registers with the master (retrying until register_deadline).
  /// `host` outlives the returned object.
  static absl::StatusOr<std::unique_ptr<AgentControlPlane>> Start(const AgentControlOptions& options, VmHost& host);
  ~AgentControlPlane();
  AgentControlPlane(const AgentControlPlane&) = delete;
  AgentControlPlane& operator=(const AgentControlPlane&) = delete;

  [[nodiscard]] int port() const;
  [[nodiscard]] NodeId node_id() const;
  MasterClient& master() { return *client_; }
  /// The held VM's host counters (VmHost::Stats) and the control plane's, read now (any thread).
  std::map<std::string, uint64_t> Counters();
  /// The VM this node holds ("" = none).
  std::string vm() const;
  /// Stops heartbeating and serving; a prepared VM is stopped on the host. Idempotent.
  void Shutdown();

 private:
  struct Impl;
  AgentControlPlane(std::unique_ptr<Impl> impl, std::unique_ptr<MasterClient> client);
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<MasterClient> client_;
};

}  // namespace aggvm::agent::control
