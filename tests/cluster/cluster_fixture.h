// Test support for the control-plane tests: a real MasterServer and real AgentControlPlanes (gRPC on 127.0.0.1,
// port 0) in this process, each agent driving a RecordingVmHost that records every call it gets and reports console
// lines for its vCPUs when started, as a VM runner would. Each host also runs the node end of the data-plane
// bootstrap for real: a TcpTransport on its announced address, connected to the master during PrepareVm (no vCPUs,
// nothing polls it).
#pragma once

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "master/master_server.h"
#include "transport/tcp_transport.h"
#include "node-agent/control/agent_control.h"
#include "proto/aggvm.grpc.pb.h"

namespace aggvm::testing {

namespace v1 = ::aggvm::v1;
using agent::control::GuestOutput;
using agent::control::LocalVmPlan;

/// A free TCP port on 127.0.0.1 (bound to port 0, then released).
inline uint16_t FreeLoopbackPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  uint16_t port = 0;
  if (fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  if (fd >= 0) ::close(fd);
  return port;
}

class RecordingVmHost final : public agent::control::VmHost {
 public:
  RecordingVmHost() : data_address_(fmt::format("127.0.0.1:{}", FreeLoopbackPort())) {}
  ~RecordingVmHost() override { CloseDataPlane(); }

  /// The data-plane address this host's agent announces.
  const std::string& data_address() const { return data_address_; }

  absl::Status Prepare(const LocalVmPlan& plan, GuestOutput& output) override {
    std::lock_guard lock(mu_);
    calls_.push_back("prepare " + plan.spec.name());
    if (!fail_prepare_.ok()) return fail_prepare_;
    plan_ = plan;
    output_ = &output;
    // The node end of the data-plane bootstrap, as the real agent does it: listen on the announced address and
    // accept the master's dial in the background (PrepareVm does not wait: the master dials after every node
    // prepared); Start waits for it.
    transport::TcpTransportOptions o;
    o.listen_address = data_address_;
    auto t = transport::TcpTransport::Create(plan.node_id, o);
    if (!t.ok()) return t.status();
    auto link = std::make_shared<DataLink>();
    link->transport = *std::move(t);
    std::thread([link] {
      const transport::PeerEndpoint master{NodeId(0), "master"};
      absl::Status s = link->transport->Connect({&master, 1}, absl::Seconds(10));
      std::lock_guard l(link->mu);
      link->result = std::move(s);
      link->done = true;
      if (link->closed) link->transport->Close();
      link->cv.notify_all();
    }).detach();
    link_ = link;
    return absl::OkStatus();
  }
  absl::Status Start() override {
    std::lock_guard lock(mu_);
    calls_.push_back("start");
    if (link_) {
      std::unique_lock l(link_->mu);
      if (!link_->cv.wait_for(l, std::chrono::seconds(10), [&] { return link_->done; })) {
        return absl::DeadlineExceededError("the master never connected the data plane");
      }
      if (!link_->result.ok()) return link_->result;
    }
    for (auto v : plan_.local_vcpus) {
      output_->ConsoleLine(plan_.spec.name(), v, fmt::format("hello from vCPU {} on {}", v.value(), plan_.node));
    }
    cv_.notify_all();
    return absl::OkStatus();
  }
  absl::Status Pause() override { return Record("pause"); }
  absl::Status Stop() override {
    CloseDataPlane();
    return Record("stop");
  }
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
  // The node's data-plane transport; closed by the connecting thread if the VM stops before Connect ended.
  struct DataLink {
    std::unique_ptr<transport::TcpTransport> transport;
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    bool closed = false;
    absl::Status result;
  };
  void CloseDataPlane() {
    std::lock_guard lock(mu_);
    if (!link_) return;
    std::lock_guard l(link_->mu);
    link_->closed = true;
    if (link_->done) link_->transport->Close();
    link_.reset();
  }

  const std::string data_address_;
  std::shared_ptr<DataLink> link_;  // guarded by mu_
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
    mo.data_listen_address = "127.0.0.1:0";
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
    ao.data_plane.set_tcp_address(host->data_address());
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
