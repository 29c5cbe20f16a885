// A local aggvm cluster of processes for integration tests and benchmarks: aggvm-master and N aggvm-agents
// (node-a, node-b, ...), as root each in its own network namespace on a veth bridge (netns.h), otherwise — or when
// asked — all on 127.0.0.1. The caller's thread enters the master's namespace, so the gRPC stubs it makes (and gRPC's
// own threads) reach every process; an agent is node i (1..N) in namespace i, the master host 0.
//
//   ClusterOptions o; o.master_bin = ...; o.agent_bin = ...; auto c = ClusterLauncher::Start(o);
//   VmWatch w(c->stub(), "vm");            // console lines, guest records, state changes of one VM
//   CreateVm(c->stub(), spec); Lifecycle(c->stub(), "start", "vm"); ...
//
// The destructor stops every daemon (SIGTERM, SIGKILL after 5 s) and removes the namespaces, on every exit path.
// gRPC is in this header: include it only from the cluster tests and benches.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/aggvm.grpc.pb.h"
#include "tests/support/netns.h"

namespace aggvm::testing {

struct ClusterOptions {
  int agents = 3;
  std::string tag = "cl";           // goes into the namespace names (a few [a-z0-9] chars)
  std::string master_bin, agent_bin;
  bool loopback = false;            // every process on 127.0.0.1 even as root
  int base_port = 17570;            // host i: gRPC base_port + 10 i, data plane base_port + 10 i + 1
  std::string log_dir;              // empty: daemons write to this process's stdout/stderr; else DIR/<who>.log
  int heartbeat_ms = 100;           // aggvm-master --heartbeat-ms
  int lost_after = 5;               // aggvm-master --lost-after (missed heartbeats before a node is LOST)
  std::vector<std::string> master_args, agent_args;  // extra flags
  absl::Duration register_timeout = absl::Seconds(20);  // all agents UP within this, or Start fails
};

class ClusterLauncher {
 public:
  /// Starts the master and the agents and waits until all agents are UP. Falls back to loopback (with a note on
  /// stderr) when not root or when the namespaces cannot be made.
  static absl::StatusOr<std::unique_ptr<ClusterLauncher>> Start(ClusterOptions options);
  ~ClusterLauncher();
  ClusterLauncher(const ClusterLauncher&) = delete;
  ClusterLauncher& operator=(const ClusterLauncher&) = delete;

  /// "node-a" for node 1, "node-b" for 2, ...; "master" for 0.
  static std::string NodeName(int i);
  bool in_namespaces() const { return topo_.has_value(); }
  const NetnsTopology* topology() const { return topo_ ? &*topo_ : nullptr; }
  std::string host(int i) const;
  std::string grpc_address(int i) const;
  std::string data_address(int i) const;

  v1::Master::Stub& stub() { return *stub_; }
  /// A stub for node i's NodeAgent service (GetStats).
  std::unique_ptr<v1::NodeAgent::Stub> AgentStub(int i) const;

  /// (Re)starts node i's agent.
  absl::Status SpawnAgent(int i);
  /// Kills node i's agent with `sig` and reaps it.
  void KillAgent(int i, int sig);
  /// Nodes the master lists as UP, -1 if it does not answer.
  int UpNodes();
  bool WaitUp(int n, absl::Duration timeout);
  /// Runs fn on a thread in host i's namespace (or on a plain thread on loopback).
  absl::Status RunIn(int i, const std::function<absl::Status()>& fn) const;
  /// The last lines of every daemon's log on stderr (log_dir only), for a failure's diagnosis.
  void TailLogs(int lines = 6) const;
  /// Stops every daemon (also done by the destructor).
  void StopAll();

 private:
  explicit ClusterLauncher(ClusterOptions o) : options_(std::move(o)) {}
  absl::Status SpawnOne(int i, const std::vector<std::string>& argv);
  static void Reap(pid_t pid);

  ClusterOptions options_;
  std::optional<NetnsTopology> topo_;
  std::map<int, pid_t> pids_;  // host index -> pid
  std::unique_ptr<v1::Master::Stub> stub_;
};

/// One VM's events from the master's WatchEvents stream (console lines included), collected on a thread.
class VmWatch {
 public:
  VmWatch(v1::Master::Stub& stub, const std::string& vm);
  ~VmWatch();
  VmWatch(const VmWatch&) = delete;
  VmWatch& operator=(const VmWatch&) = delete;

  std::vector<v1::Event> events();
  /// Guest (or host) records of `type`, in arrival order; with vector >= 0 only those whose `a` equals it.
  std::vector<v1::GuestRecord> records(uint32_t type, int64_t vector = -1);
  size_t count(uint32_t type);
  /// The record of `type` at position `index` once it has arrived, or nothing after `timeout`.
  std::optional<v1::GuestRecord> RecordAt(uint32_t type, size_t index, absl::Duration timeout);
  /// Console text of `vcpu` (all its lines joined with '\n').
  std::string console(uint32_t vcpu);
  /// Waits until pred() holds (re-checked on every event), up to `timeout`.
  bool WaitFor(const std::function<bool()>& pred, absl::Duration timeout);

 private:
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<v1::Event>> reader_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<v1::Event> events_;
  std::map<uint32_t, std::vector<v1::GuestRecord>> by_type_;
};

/// Calls f with a context whose deadline is `seconds` away.
grpc::Status Call(const std::function<grpc::Status(grpc::ClientContext&)>& f, int seconds = 30);
grpc::Status CreateVm(v1::Master::Stub& stub, const v1::VmSpec& spec);
/// verb: "start", "pause" or "stop".
grpc::Status Lifecycle(v1::Master::Stub& stub, const std::string& verb, const std::string& vm);
grpc::Status Ring(v1::Master::Stub& stub, const std::string& vm, const std::string& node, uint32_t gsi,
                  bool level = false, bool asserted = true);
absl::StatusOr<v1::RoutingTable> Table(v1::Master::Stub& stub, const std::string& vm);
/// A 3-node spec: `vcpus_per_node` vCPUs on each of node-a.., vCPU i on node 1 + i / vcpus_per_node.
v1::VmSpec ClusterSpec(const std::string& name, const std::string& workload, v1::IrqchipMode irqchip, int nodes = 3,
                       int vcpus_per_node = 2);

}  // namespace aggvm::testing
