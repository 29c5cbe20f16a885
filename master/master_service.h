// The gRPC Master service (proto/aggvm.proto). Includes gRPC: only master_server.cc and tests include this header.
//
// State: one mutex over membership and the VM records. Calls to agents (PrepareVm, StartVm, ...) are made without
// the lock, with a deadline; while one runs the VM is marked busy and other lifecycle calls on it are refused
// (FAILED_PRECONDITION), so a VM's transitions are serialised without blocking the rest of the master.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "master/event_hub.h"
#include "master/master_server.h"
#include "master/membership.h"
#include "master/vm_dataplane.h"
#include "master/vm_spec.h"
#include "proto/aggvm.grpc.pb.h"

namespace aggvm::master {

class MasterService final : public v1::Master::Service {
 public:
  explicit MasterService(const MasterOptions& options);
  ~MasterService() override;

  /// Marks nodes without recent heartbeats LOST, fails their VMs (stopping them on the other agents) and publishes
  /// the events. Called periodically by MasterServer.
  void Sweep(absl::Time now);
  /// Ends every WatchEvents / ReportGuestOutput stream; further lifecycle calls fail UNAVAILABLE.
  void Shutdown();

  EventHub& events() { return events_; }

  grpc::Status RegisterNode(grpc::ServerContext*, const v1::RegisterNodeRequest*, v1::RegisterNodeResponse*) override;
  grpc::Status Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest*, v1::HeartbeatResponse*) override;
  grpc::Status ListNodes(grpc::ServerContext*, const v1::ListNodesRequest*, v1::ListNodesResponse*) override;
  grpc::Status CreateVm(grpc::ServerContext*, const v1::CreateVmRequest*, v1::VmStatus*) override;
  grpc::Status StartVm(grpc::ServerContext*, const v1::VmRef*, v1::VmStatus*) override;
  grpc::Status PauseVm(grpc::ServerContext*, const v1::VmRef*, v1::VmStatus*) override;
  grpc::Status StopVm(grpc::ServerContext*, const v1::VmRef*, v1::VmStatus*) override;
  grpc::Status GetVm(grpc::ServerContext*, const v1::VmRef*, v1::VmStatus*) override;
  grpc::Status ListVms(grpc::ServerContext*, const v1::ListVmsRequest*, v1::ListVmsResponse*) override;
  grpc::Status GetTopology(grpc::ServerContext*, const v1::VmRef*, v1::Topology*) override;
  grpc::Status GetRoutingTable(grpc::ServerContext*, const v1::VmRef*, v1::RoutingTable*) override;
  grpc::Status SetRoutingPolicy(grpc::ServerContext*, const v1::SetRoutingPolicyRequest*, v1::RoutingTable*) override;
  grpc::Status WatchEvents(grpc::ServerContext*, const v1::WatchEventsRequest*, grpc::ServerWriter<v1::Event>*) override;
  grpc::Status ReportGuestOutput(grpc::ServerContext*, grpc::ServerReader<v1::Event>*,
                                 v1::ReportGuestOutputResponse*) override;
  grpc::Status RingDoorbell(grpc::ServerContext*, const v1::RingDoorbellRequest*, v1::RingDoorbellResponse*) override;

 private:
  struct VmRecord {
    v1::VmSpec spec;
    v1::Topology topology;
    v1::VmState state = v1::VM_STATE_CREATED;
    std::string error;
    bool busy = false;            // an agent call is in flight for this VM
    uint64_t failure_epoch = 0;   // bumped when a node loss fails the VM while busy
    // The master's data plane of the VM (transport + GlobalController + thread), from StartVm until it stops or
    // fails. Whoever stops it moves it out of the record under mu_ and stops it without the lock; while the VM is
    // busy the lifecycle call owns it.
    std::shared_ptr<VmDataPlane> dataplane;
  };
  // A node's data-plane connection broke (reported on the data-plane thread; handled by Sweep).
  struct DataPlaneLoss {
    std::string vm;
    std::shared_ptr<VmDataPlane> dataplane;  // identifies the run of the VM that lost the node
    NodeId node;
    std::string why;
  };
  // An agent the master talks to for one VM operation.
  struct AgentTarget {
    std::string node;
    std::shared_ptr<v1::NodeAgent::Stub> stub;
  };
  enum class Op { kStart, kPause, kStop };

  grpc::Status Lifecycle(const std::string& name, Op op, v1::VmStatus* out);
  // Calls one agent RPC on every target; the first failure as "node 'x' (Rpc): message".
  grpc::Status CallAgents(const std::vector<AgentTarget>& targets, const char* rpc,
                          const std::function<grpc::Status(const AgentTarget&, grpc::ClientContext&)>& call);
  void StopOnAgents(const std::vector<AgentTarget>& targets, const std::string& vm);
  std::vector<AgentTarget> TargetsLocked(const VmRecord& vm) const;
  v1::VmStatus StatusLocked(const VmRecord& vm) const;
  void PublishVmLocked(const VmRecord& vm);
  void SetStateLocked(VmRecord& vm, v1::VmState state, std::string error = "");
  // The active VM (not STOPPED/FAILED) with a vCPU on `node`, "" if none.
  std::string VmOnNodeLocked(const std::string& node) const;
  v1::PrepareVmRequest PrepareRequestLocked(const VmRecord& vm, const std::string& node) const;
  // Opens the VM's data plane and starts connecting to its nodes (mu_ held: reads membership).
  absl::StatusOr<std::shared_ptr<VmDataPlane>> BeginDataPlaneLocked(const VmRecord& vm);
  v1::DataPlaneEndpoint MasterEndpoint() const;
  // Fails the VM (unless already STOPPED/FAILED), stops it on its agents and stops its data plane.
  void FailVmLocked(VmRecord& vm, std::string error, std::vector<std::pair<std::string, std::vector<AgentTarget>>>& to_stop,
                    std::vector<std::shared_ptr<VmDataPlane>>& to_close);

  const MasterOptions options_;
  EventHub events_;
  mutable std::mutex mu_;
  Membership membership_;                                            // guarded by mu_
  std::map<std::string, std::shared_ptr<v1::NodeAgent::Stub>> agents_;  // by node name, guarded by mu_
  std::map<std::string, VmRecord> vms_;                              // guarded by mu_
  bool shutting_down_ = false;                                       // guarded by mu_
  std::mutex loss_mu_;
  std::vector<DataPlaneLoss> losses_;                                // guarded by loss_mu_
  uint64_t guest_output_dropped_ = 0;                                // guarded by mu_
};

}  // namespace aggvm::master
