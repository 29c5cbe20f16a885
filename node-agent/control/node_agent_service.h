// The gRPC NodeAgent service (proto/aggvm.proto): validates the master's requests for this node and drives a VmHost
// through its state machine (vm_host.h). One VM per agent at a time. Includes gRPC: keep it out of widely included
// headers (agent_control.h wraps it).
#pragma once

#include <map>
#include <mutex>
#include <string>

#include <grpcpp/grpcpp.h>

#include "node-agent/control/vm_host.h"
#include "proto/aggvm.grpc.pb.h"

namespace aggvm::agent::control {

class NodeAgentService final : public v1::NodeAgent::Service {
 public:
  /// `host` and `output` outlive the service.
  NodeAgentService(std::string node, VmHost& host, GuestOutput& output);

  /// This node's id, once registered (goes into LocalVmPlan).
  void set_node_id(NodeId id);

  grpc::Status PrepareVm(grpc::ServerContext*, const v1::PrepareVmRequest*, v1::PrepareVmResponse*) override;
  grpc::Status StartVm(grpc::ServerContext*, const v1::AgentVmRef*, v1::AgentVmState*) override;
  grpc::Status PauseVm(grpc::ServerContext*, const v1::AgentVmRef*, v1::AgentVmState*) override;
  grpc::Status StopVm(grpc::ServerContext*, const v1::AgentVmRef*, v1::AgentVmState*) override;
  grpc::Status GetStats(grpc::ServerContext*, const v1::GetStatsRequest*, v1::Stats*) override;
  /// This node's CLOCK_MONOTONIC and TSC, read while answering (lab clock-offset probes).
  grpc::Status GetClock(grpc::ServerContext*, const v1::GetClockRequest*, v1::ClockReading*) override;

  /// What GetStats returns for the held VM (empty when none), plus control_requests_refused: for the metrics
  /// endpoint, read at scrape time.
  std::map<std::string, uint64_t> Counters();

  /// Stops and releases the VM this agent holds, if any (the agent is shutting down).
  void StopHeldVm();

  /// The VM this agent holds ("" = none) and its state.
  std::string vm() const;
  v1::VmState state() const;

 private:
  grpc::Status HeldLocked(const std::string& vm) const;  // NOT_FOUND unless this agent holds `vm`

  const std::string node_;
  VmHost& host_;
  GuestOutput& output_;
  mutable std::mutex mu_;  // also serialises every call into host_
  NodeId node_id_{0};
  std::string vm_;                                    // guarded by mu_
  v1::VmState state_ = v1::VM_STATE_UNSPECIFIED;      // guarded by mu_
  uint64_t refused_ = 0;                              // guarded by mu_
};

}  // namespace aggvm::agent::control
