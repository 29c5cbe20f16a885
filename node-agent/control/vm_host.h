// What the node agent's control plane drives: this node's share of one VM. The VM runner (node-agent/, vcpu/) plugs
// in behind this interface; the control plane (NodeAgentService) validates requests and keeps the state machine
//   (none) --Prepare--> PREPARED --Start--> RUNNING --Pause--> PAUSED --Start--> RUNNING ... --Stop--> (none)
// so a VmHost only sees calls that are legal in its current state, one at a time.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "common/types.h"
#include "proto/aggvm.pb.h"

namespace aggvm::agent::control {

namespace v1 = ::aggvm::v1;

/// This node's part of a VM, decoded from PrepareVmRequest.
struct LocalVmPlan {
  v1::VmSpec spec;                     // validated by the master, defaults filled
  std::string node;                    // this node's name
  NodeId node_id;                      // this node's id (from its registration)
  std::vector<VcpuIndex> local_vcpus;  // the vCPUs this node runs, ascending
  v1::Topology topology;               // every vCPU of the VM: node, node id, APIC ID
  std::vector<v1::NodeStatus> peers;   // data-plane endpoints of the VM's nodes
};

/// Where a VmHost reports guest output; it reaches the master's one console for the VM. Thread-safe, non-blocking
/// (output is queued and may be dropped under pressure, counted by the implementation).
class GuestOutput {
 public:
  virtual ~GuestOutput() = default;
  virtual void ConsoleLine(const std::string& vm, VcpuIndex vcpu, std::string_view text) = 0;
  virtual void Record(const std::string& vm, VcpuIndex vcpu, uint32_t type, uint64_t a, uint64_t b, uint64_t c,
                      uint64_t d) = 0;
};

class VmHost {
 public:
  virtual ~VmHost() = default;
  /// Builds the VM for `plan` (memory, image, this node's vCPUs, data-plane endpoint); nothing runs yet. Guest output
  /// goes to `output`, which outlives the VM.
  virtual absl::Status Prepare(const LocalVmPlan& plan, GuestOutput& output) = 0;
  /// Runs (or resumes) this node's vCPUs.
  virtual absl::Status Start() = 0;
  /// Pauses this node's vCPUs (they keep their state).
  virtual absl::Status Pause() = 0;
  /// Stops and releases the VM. Called in any state after a successful Prepare.
  virtual absl::Status Stop() = 0;
  /// Counters for GetStats (interrupts forwarded, delivered, dropped, ...).
  virtual std::map<std::string, uint64_t> Stats() = 0;
};

}  // namespace aggvm::agent::control
