// The node agent's control plane in one object: the NodeAgent gRPC service (driving a VmHost) listening on this
// node, and the MasterClient that registers the node and heartbeats. The agent daemon and the tests create one per
// node. No gRPC types in this header.
#pragma once

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
  /// Stops heartbeating and serving; a prepared VM is stopped on the host. Idempotent.
  void Shutdown();

 private:
  struct Impl;
  AgentControlPlane(std::unique_ptr<Impl> impl, std::unique_ptr<MasterClient> client);
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<MasterClient> client_;
};

}  // namespace aggvm::agent::control
