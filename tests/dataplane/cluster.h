// Test harness: the data plane of one VM in one process — a GlobalController (node 0) and N LocalControllers with
// IoForwarders (nodes 1..N), each on its own real TcpTransport over loopback and its own data-plane thread.
// vCPU i runs on node 1 + i / vcpus_per_node with APIC ID i (x2APIC).
#pragma once

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "master/global_controller.h"
#include "node-agent/io_forwarder.h"
#include "node-agent/local_controller.h"
#include "tests/dataplane/tcp_mesh.h"

namespace aggvm::testing {

struct Injection {
  VcpuIndex vcpu;
  Vector vector;
  irqchip::DeliveryMode mode;
  bool level;
};

/// A VmPort that records what it is asked to inject (and can wait for it).
class RecordingVmPort : public agent::VmPort {
 public:
  absl::Status Inject(VcpuIndex vcpu, Vector vector, irqchip::DeliveryMode mode, bool level) override {
    std::lock_guard<std::mutex> l(mu_);
    injections_.push_back({vcpu, vector, mode, level});
    cv_.notify_all();
    return absl::OkStatus();
  }
  bool WaitFor(size_t n, absl::Duration timeout = absl::Seconds(5)) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, absl::ToChronoNanoseconds(timeout), [&] { return injections_.size() >= n; });
  }
  std::vector<Injection> injections() {
    std::lock_guard<std::mutex> l(mu_);
    return injections_;
  }
  size_t count() {
    std::lock_guard<std::mutex> l(mu_);
    return injections_.size();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Injection> injections_;
};

inline bool WaitUntil(const std::function<bool()>& pred, absl::Duration timeout = absl::Seconds(5)) {
  const absl::Time end = absl::Now() + timeout;
  while (absl::Now() < end) {
    if (pred()) return true;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return pred();
}

class DataplaneCluster {
 public:
  struct Node {
    NodeId id;
    agent::VmPort* port = nullptr;
    std::unique_ptr<agent::LocalController> lc;
    std::unique_ptr<agent::IoForwarder> io;
    std::jthread thread;
  };

  /// `port_for(node index 0..nodes-1)` gives each node's VmPort (owned by the caller, outliving the cluster).
  /// `configure` may adjust the master's config (pins, policy) before creation.
  static std::unique_ptr<DataplaneCluster> Make(
      uint32_t nodes, uint32_t vcpus_per_node, const std::function<agent::VmPort*(uint32_t)>& port_for,
      const std::function<void(master::GlobalControllerConfig&)>& configure = {}) {
    auto c = std::unique_ptr<DataplaneCluster>(new DataplaneCluster());
    std::vector<NodeId> ids{NodeId(0)};
    for (uint32_t i = 0; i < nodes; ++i) ids.push_back(NodeId(1 + i));
    auto star = TcpStar::Make(ids);
    EXPECT_TRUE(star.ok()) << star.status();
    if (!star.ok()) return nullptr;
    c->star_ = *std::move(star);
    const uint32_t vcpus = nodes * vcpus_per_node;

    master::GlobalControllerConfig mc;
    for (uint32_t i = 0; i < nodes; ++i) mc.nodes.push_back(NodeId(1 + i));
    for (uint32_t v = 0; v < vcpus; ++v) {
      mc.vcpus.push_back(master::X2apicVcpu(NodeId(1 + v / vcpus_per_node), ApicId(v)));
    }
    DataplaneCluster* raw = c.get();
    mc.console = [raw](VcpuIndex v, std::string_view line) {
      std::lock_guard<std::mutex> l(raw->mu_);
      raw->console_.emplace_back(v.value(), std::string(line));
    };
    mc.on_node_lost = [raw](NodeId n, const absl::Status& why) {
      std::lock_guard<std::mutex> l(raw->mu_);
      raw->lost_.emplace_back(n, std::string(why.message()));
    };
    if (configure) configure(mc);
    auto gc = master::GlobalController::Create(std::move(mc), &c->star_.master());
    EXPECT_TRUE(gc.ok()) << gc.status();
    if (!gc.ok()) return nullptr;
    c->gc_ = *std::move(gc);
    c->master_thread_ = std::jthread([raw](std::stop_token st) { raw->master_status_ = raw->gc_->Run(st); });

    for (uint32_t i = 0; i < nodes; ++i) {
      auto n = std::make_unique<Node>();
      n->id = NodeId(1 + i);
      n->port = port_for(i);
      agent::LocalControllerConfig lc;
      lc.master = NodeId(0);
      lc.num_vcpus = vcpus;
      for (uint32_t v = i * vcpus_per_node; v < (i + 1) * vcpus_per_node; ++v) lc.owned.push_back(VcpuIndex(v));
      lc.on_trace = [raw](const transport::TraceBlock& t) {
        std::lock_guard<std::mutex> l(raw->mu_);
        raw->traces_.push_back(t);
      };
      auto l = agent::LocalController::Create(std::move(lc), &c->star_.node(1 + i), n->port);
      EXPECT_TRUE(l.ok()) << l.status();
      if (!l.ok()) return nullptr;
      n->lc = *std::move(l);
      n->io = std::make_unique<agent::IoForwarder>(n->lc.get(), vcpus);
      Node* np = n.get();
      n->thread = std::jthread([np](std::stop_token st) { (void)np->lc->Run(st); });
      c->nodes_.push_back(std::move(n));
    }
    return c;
  }

  ~DataplaneCluster() {
    for (auto& n : nodes_) {
      n->thread.request_stop();
      if (n->thread.joinable()) n->thread.join();
    }
    master_thread_.request_stop();
    if (master_thread_.joinable()) master_thread_.join();
  }

  master::GlobalController& master() { return *gc_; }
  /// Node by index 0..N-1 (node id index + 1).
  Node& node(uint32_t index) { return *nodes_.at(index); }
  transport::TcpTransport& transport_of(uint32_t index) { return star_.node(1 + index); }
  /// Stops node `index`'s data-plane thread and closes its transport (the node "disappears").
  void KillNode(uint32_t index) {
    Node& n = node(index);
    n.thread.request_stop();
    n.thread.join();
    transport_of(index).Close();
  }
  std::vector<std::pair<uint32_t, std::string>> console() {
    std::lock_guard<std::mutex> l(mu_);
    return console_;
  }
  /// Completed traces (every hop filled) of traced deliveries, from any node.
  std::vector<transport::TraceBlock> traces() {
    std::lock_guard<std::mutex> l(mu_);
    return traces_;
  }
  std::vector<std::pair<NodeId, std::string>> lost() {
    std::lock_guard<std::mutex> l(mu_);
    return lost_;
  }

 private:
  DataplaneCluster() = default;
  TcpStar star_;
  std::unique_ptr<master::GlobalController> gc_;
  std::jthread master_thread_;
  absl::Status master_status_;
  std::vector<std::unique_ptr<Node>> nodes_;
  std::mutex mu_;
  std::vector<std::pair<uint32_t, std::string>> console_;
  std::vector<std::pair<NodeId, std::string>> lost_;
  std::vector<transport::TraceBlock> traces_;
};

}  // namespace aggvm::testing
