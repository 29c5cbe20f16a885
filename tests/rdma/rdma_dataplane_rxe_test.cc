// The master's data plane over real verbs (runs inside the rdma_rxe VM, tests/rdma/rxe_vm.sh): aggvm-master's
// VmDataPlane for a TRANSPORT_KIND_RDMA spec (RdmaTransport + TCP bootstrap, the GlobalController on it) and two
// nodes, each an RdmaTransport with a LocalController over a recording VM port (no KVM inside the TCG VM):
//   - a traced doorbell raised on node 1 reaches the vCPU on node 2 its route names, every trace hop stamped in order;
//   - a train of edges raised by node 1 on its own clock: every edge delivered once, in order;
//   - a level interrupt held on node 1 is re-delivered after each EOI from node 2 and not after the deassert.
#include <algorithm>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "master/vm_dataplane.h"
#include "node-agent/local_controller.h"
#include "tests/dataplane/cluster.h"
#include "tests/support/data_plane_spec.h"
#include "transport/rdma/rdma_transport.h"
#include "transport/rdma/tcp_bootstrap.h"

namespace aggvm::testing {
namespace {

namespace v1 = ::aggvm::v1;
using transport::rdma::RdmaOptions;
using transport::rdma::RdmaTransport;
using transport::rdma::TcpBootstrap;

constexpr uint32_t kEdgeGsi = 4, kLevelGsi = 5, kTarget = 3;  // vCPU 3 runs on node 2

v1::VmSpec Spec() {
  v1::VmSpec spec = TwoNodeDataPlaneSpec("rdma-dp");
  spec.set_transport(v1::TRANSPORT_KIND_RDMA);
  for (uint32_t gsi : {kEdgeGsi, kLevelGsi}) {
    auto* r = spec.add_interrupt_routes();
    r->set_gsi(gsi);
    r->set_vector(gsi == kEdgeGsi ? 0x44 : 0x55);
    r->set_delivery(v1::INTERRUPT_DELIVERY_FIXED);
    r->set_dest_mode(v1::DESTINATION_MODE_PHYSICAL);
    r->set_destination(kTarget);
    r->set_trigger(gsi == kEdgeGsi ? v1::INTERRUPT_TRIGGER_EDGE : v1::INTERRUPT_TRIGGER_LEVEL);
  }
  return spec;
}

struct Node {
  std::unique_ptr<RdmaTransport> transport;
  std::string bootstrap_address;
  RecordingVmPort port;
  std::unique_ptr<agent::LocalController> lc;
  std::jthread thread;
  std::mutex mu;
  std::vector<transport::TraceBlock> traces;
};

TEST(RdmaDataplaneRxe, MasterAndTwoNodesOverVerbs) {
  const v1::VmSpec spec = Spec();
  Node nodes[2];
  std::vector<master::VmNodeEndpoint> endpoints;
  for (uint16_t i = 0; i < 2; ++i) {
    auto boot = TcpBootstrap::Listen(NodeId(i + 1), "127.0.0.1:0");
    ASSERT_TRUE(boot.ok()) << boot.status();
    nodes[i].bootstrap_address = (*boot)->address();
    RdmaOptions ro;
    ro.self = NodeId(i + 1);
    ro.wait_mode = transport::WaitMode::kEvent;
    auto t = RdmaTransport::Create(ro, *std::move(boot));
    ASSERT_TRUE(t.ok()) << t.status();
    nodes[i].transport = *std::move(t);
    endpoints.push_back({NodeId(i + 1), i == 0 ? "a" : "b", nodes[i].bootstrap_address});
  }
  master::VmDataPlaneOptions o;
  o.listen_address = "127.0.0.1:0";
  o.connect_timeout = absl::Seconds(60);
  auto dp = master::VmDataPlane::Begin(spec, TopologyByPlacementOrder(spec), endpoints, o);
  ASSERT_TRUE(dp.ok()) << dp.status();
  std::vector<std::thread> connects;
  absl::Status results[2];
  for (int i = 0; i < 2; ++i) {
    connects.emplace_back([&, i] {
      const transport::PeerEndpoint m{NodeId(0), (*dp)->listen_address()};
      results[i] = nodes[i].transport->Connect({&m, 1}, absl::Seconds(60));
    });
  }
  for (auto& c : connects) c.join();
  for (const auto& r : results) ASSERT_TRUE(r.ok()) << r;
  ASSERT_TRUE((*dp)->Activate().ok());
  master::GlobalController* gc = (*dp)->controller();
  ASSERT_NE(gc, nullptr);
  EXPECT_EQ(gc->counters().rings, 0u);

  for (uint16_t i = 0; i < 2; ++i) {
    agent::LocalControllerConfig c;
    c.num_vcpus = 4;
    c.owned = {VcpuIndex(2 * i), VcpuIndex(2 * i + 1)};
    Node* n = &nodes[i];
    c.on_trace = [n](const transport::TraceBlock& t) {
      std::lock_guard l(n->mu);
      n->traces.push_back(t);
    };
    auto lc = agent::LocalController::Create(std::move(c), n->transport.get(), &n->port);
    ASSERT_TRUE(lc.ok()) << lc.status();
    n->lc = *std::move(lc);
    n->thread = std::jthread([n](std::stop_token st) { (void)n->lc->Run(st); });
  }

  // One traced edge raised on node 1 (a) -> the master -> vCPU 3 on node 2 (b).
  ASSERT_TRUE(gc->Ring(NodeId(1), Gsi(kEdgeGsi), irqchip::TriggerMode::kEdge, true, true).ok());
  ASSERT_TRUE(nodes[1].port.WaitFor(1, absl::Seconds(20)));
  auto inj = nodes[1].port.injections();
  EXPECT_EQ(inj[0].vcpu, VcpuIndex(kTarget));
  EXPECT_EQ(inj[0].vector, Vector(0x44));
  EXPECT_EQ(nodes[0].port.count(), 0u);
  ASSERT_TRUE(WaitUntil([&] { std::lock_guard l(nodes[1].mu); return !nodes[1].traces.empty(); }));
  {
    std::lock_guard l(nodes[1].mu);
    const transport::TraceBlock& t = nodes[1].traces[0];
    const uint64_t hops[] = {t.raised, t.local_controller, t.master_received, t.master_decided, t.target_received,
                             t.injected};
    for (size_t h = 1; h < std::size(hops); ++h) {
      EXPECT_NE(hops[h], 0u) << "hop " << h << " not stamped";
      EXPECT_GE(hops[h], hops[h - 1]) << "hop " << h << " before hop " << h - 1 << " (one clock: one machine)";
    }
  }

  // A train of 20 edges, one every 5 ms, raised by node 1 on its own clock. Under TCG the train's thread can wake
  // more than one interval late; the deadlines it missed are skipped and counted (raise_train.h), so the check is
  // that every deadline was raised or skipped, and every raised edge was delivered exactly once.
  constexpr uint32_t kTrain = 20;
  ASSERT_TRUE(gc->Ring(NodeId(1), Gsi(kEdgeGsi), irqchip::TriggerMode::kEdge, true, false, absl::Seconds(2),
                       master::RingTrain{.count = kTrain, .interval_us = 5000}).ok());
  agent::LocalController& a = *nodes[0].lc;
  ASSERT_TRUE(WaitUntil([&] { return a.counters().train_raises + a.train_skipped() == kTrain; }, absl::Seconds(30)))
      << "raised " << a.counters().train_raises << ", skipped " << a.train_skipped() << " of " << kTrain;
  const uint64_t raised = a.counters().train_raises;
  EXPECT_GE(raised, kTrain / 4) << a.train_skipped() << " of " << kTrain << " deadlines skipped";
  ASSERT_TRUE(nodes[1].port.WaitFor(1 + raised, absl::Seconds(30)))
      << "delivered " << nodes[1].port.count() - 1 << " of " << raised << " raised edges";
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(nodes[1].port.count(), 1 + raised) << "one delivery per raised edge (" << a.train_skipped()
                                               << " deadlines skipped by a late train thread)";

  // A level held on node 1: delivered, re-delivered after each EOI node 2 sends, not after the deassert.
  const size_t before = nodes[1].port.count();
  ASSERT_TRUE(gc->Ring(NodeId(1), Gsi(kLevelGsi), irqchip::TriggerMode::kLevel, true).ok());
  for (size_t k = 1; k <= 3; ++k) {
    ASSERT_TRUE(nodes[1].port.WaitFor(before + k, absl::Seconds(20))) << "level delivery " << k;
    absl::SleepFor(absl::Milliseconds(20));
    EXPECT_EQ(nodes[1].port.count(), before + k) << "re-delivered before its EOI";
    EXPECT_TRUE(nodes[1].port.injections().back().level);
    nodes[1].lc->OnGuestEoi(VcpuIndex(kTarget), Vector(0x55));
  }
  ASSERT_TRUE(nodes[1].port.WaitFor(before + 4, absl::Seconds(20)));
  ASSERT_TRUE(gc->Ring(NodeId(1), Gsi(kLevelGsi), irqchip::TriggerMode::kLevel, false).ok());
  absl::SleepFor(absl::Milliseconds(50));
  nodes[1].lc->OnGuestEoi(VcpuIndex(kTarget), Vector(0x55));
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(nodes[1].port.count(), before + 4) << "re-delivered after the deassert";
  EXPECT_EQ(gc->counters().dropped_send_failed, 0u);

  for (auto& n : nodes) {
    n.thread.request_stop();
    n.thread.join();
  }
  (*dp)->Stop();
  for (auto& n : nodes) n.transport->Close();
}

}  // namespace
}  // namespace aggvm::testing
