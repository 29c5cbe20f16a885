// Test support for the control-plane tests: a real MasterServer and real AgentControlPlanes (gRPC on 127.0.0.1,
// port 0) in this process, each agent driving a RecordingVmHost that records every call it gets and reports console
// lines for its vCPUs when started, as a VM runner would.
#pragma once

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "master/master_server.h"
#include "node-agent/control/agent_control.h"
#include "proto/aggvm.grpc.pb.h"

namespace aggvm::testing {

namespace v1 = ::aggvm::v1;
using agent::control::GuestOutput;
using agent::control::LocalVmPlan;

class RecordingVmHost final : public agent::control::VmHost {
 public:
  absl::Status Prepare(const LocalVmPlan& plan, GuestOutput& output) override {
    std::lock_guard lock(mu_);
    calls_.push_back("prepare " + plan.spec.name());
    if (!fail_prepare_.ok()) return fail_prepare_;
    plan_ = plan;
    output_ = &output;
    return absl::OkStatus();
  }
  absl::Status Start() override {
    std::lock_guard lock(mu_);
    calls_.push_back("start");
    for (auto v : plan_.local_vcpus) {
      output_->ConsoleLine(plan_.spec.name(), v, fmt::format("hello from vCPU {} on {}", v.value(), plan_.node));
    }
    cv_.notify_all();
    return absl::OkStatus();
  }
  absl::Status Pause() override { return Record("pause"); }
  absl::Status Stop() override { return Record("stop"); }
  std::map<std::string, uint64_t> Stats() override {
    std::lock_guard lock(mu_);
    return {{"starts", Count("start")}};
  }

  void FailPrepare(absl::Status st) {
    std::lock_guard lock(mu_);
    fail_prepare_ = std::move(st);
  }
  std::vector<std::string> calls() const {
    std::lock_guard lock(mu_);
    return calls_;
  }
  LocalVmPlan plan() const {
    std::lock_guard lock(mu_);
    return plan_;
  }
  uint64_t Times(const std::string& call) const {
    std::lock_guard lock(mu_);
    return Count(call);
  }
  /// Waits until `call` was made at least `n` times (Stop after a node loss comes from the master's detector thread).
  bool WaitFor(const std::string& call, uint64_t n, absl::Duration timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] { return Count(call) >= n; });
  }

 private:
  uint64_t Count(const std::string& call) const {  // mu_ held
    uint64_t n = 0;
    for (const auto& c : calls_) n += c == call;
    return n;
  }
  absl::Status Record(const std::string& call) {
    std::lock_guard lock(mu_);
    calls_.push_back(call);
    cv_.notify_all();
    return absl::OkStatus();
  }
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> calls_;
  absl::Status fail_prepare_;
  LocalVmPlan plan_;
  GuestOutput* output_ = nullptr;
};

/// A master and named agents, all in this process.
class TestCluster {
 public:
  explicit TestCluster(absl::Duration heartbeat = absl::Milliseconds(100), uint32_t lost_after = 3) {
    master::MasterOptions mo;
    mo.listen_address = "127.0.0.1:0";
    mo.heartbeat_interval = heartbeat;
    mo.lost_after_intervals = lost_after;
    mo.agent_call_timeout = absl::Seconds(10);
    auto m = master::MasterServer::Start(mo);
    EXPECT_TRUE(m.ok()) << m.status();
    master_ = std::move(*m);
    address_ = fmt::format("127.0.0.1:{}", master_->port());
    stub_ = v1::Master::NewStub(grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
  }
  ~TestCluster() {
    agents_.clear();  // agents first: they stop heartbeating, then the master goes
    master_->Shutdown();
  }

  absl::StatusOr<agent::control::AgentControlPlane*> StartAgent(const std::string& name,
                                                                absl::Duration deadline = absl::Seconds(10)) {
    auto& host = hosts_[name];
    if (!host) host = std::make_unique<RecordingVmHost>();
    agent::control::AgentControlOptions ao;
    ao.node = name;
    ao.master_address = address_;
    ao.listen_address = "127.0.0.1:0";
    ao.register_deadline = deadline;
    auto a = agent::control::AgentControlPlane::Start(ao, *host);
    if (!a.ok()) return a.status();
    auto* raw = a->get();
    agents_[name] = std::move(*a);
    return raw;
  }
  void StopAgent(const std::string& name) { agents_.erase(name); }

  RecordingVmHost& host(const std::string& name) { return *hosts_.at(name); }
  agent::control::AgentControlPlane& agent(const std::string& name) { return *agents_.at(name); }
  v1::Master::Stub& stub() { return *stub_; }
  const std::string& address() const { return address_; }
  master::MasterServer& master() { return *master_; }

 private:
  std::unique_ptr<master::MasterServer> master_;
  std::string address_;
  std::unique_ptr<v1::Master::Stub> stub_;
  std::map<std::string, std::unique_ptr<RecordingVmHost>> hosts_;  // outlive the agents
  std::map<std::string, std::unique_ptr<agent::control::AgentControlPlane>> agents_;
};

inline std::chrono::system_clock::time_point In(absl::Duration d) {
  return std::chrono::system_clock::now() + absl::ToChronoNanoseconds(d);
}

/// A 3-node spec: vCPUs 2i, 2i+1 on node i (probe guest, defaults elsewhere).
inline v1::VmSpec Spec3x2(const std::string& name, const std::vector<std::string>& nodes = {"a", "b", "c"}) {
  v1::VmSpec spec;
  spec.set_name(name);
  spec.set_vcpus(2 * static_cast<uint32_t>(nodes.size()));
  for (size_t i = 0; i < nodes.size(); ++i) {
    auto* p = spec.add_placement();
    p->set_node(nodes[i]);
    p->add_vcpus(static_cast<uint32_t>(2 * i));
    p->add_vcpus(static_cast<uint32_t>(2 * i + 1));
  }
  return spec;
}

}  // namespace aggvm::testing
