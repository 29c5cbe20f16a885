// The whole device-interrupt data path in one process over real TcpTransports: a master GlobalController and three
// nodes (LocalController + IoForwarder + a recording VmPort), 2 vCPUs each. A doorbell rung for node A is raised ON
// A, sent to the master, routed by the policy, and injected on the node that runs the chosen vCPU.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <set>

#include "tests/dataplane/cluster.h"

namespace aggvm::testing {
namespace {

using irqchip::DeliveryMode;
using irqchip::DestMode;
using irqchip::RoutingPolicy;
using irqchip::TriggerMode;
using master::RedirectionEntry;
using ::testing::ElementsAre;
using ::testing::UnorderedElementsAre;

constexpr NodeId kA{1}, kB{2}, kC{3};
constexpr uint32_t kDoorbellGsi = 4;
constexpr uint8_t kDoorbellVector = 0x44;

struct Harness {
  std::array<RecordingVmPort, 3> ports;
  std::unique_ptr<DataplaneCluster> c;

  explicit Harness(const std::function<void(master::GlobalControllerConfig&)>& configure) {
    c = DataplaneCluster::Make(3, 2, [this](uint32_t i) { return &ports[i]; }, configure);
  }
  // Which (node index, vCPU) got each injection so far.
  std::vector<std::pair<uint32_t, uint32_t>> All() {
    std::vector<std::pair<uint32_t, uint32_t>> out;
    for (uint32_t n = 0; n < 3; ++n) {
      for (const auto& i : ports[n].injections()) out.emplace_back(n, i.vcpu.value());
    }
    return out;
  }
  size_t Total() { return ports[0].count() + ports[1].count() + ports[2].count(); }
  // Rings the doorbell GSI on `node` and waits for one more injection anywhere; returns (node index, vCPU).
  std::pair<uint32_t, uint32_t> RingAndWait(NodeId node) {
    std::vector<size_t> before;
    for (auto& p : ports) before.push_back(p.count());
    const absl::Status s = c->master().Ring(node, Gsi(kDoorbellGsi), TriggerMode::kEdge, true);
    EXPECT_TRUE(s.ok()) << s;
    const size_t total = before[0] + before[1] + before[2];
    EXPECT_TRUE(WaitUntil([&] { return Total() > total; })) << "no injection after a ring on node " << node.value();
    for (uint32_t n = 0; n < 3; ++n) {
      const auto injections = ports[n].injections();
      if (injections.size() > before[n]) {
        const Injection& i = injections[before[n]];
        EXPECT_EQ(i.vector, Vector(kDoorbellVector));
        EXPECT_EQ(i.mode, DeliveryMode::kFixed);
        EXPECT_FALSE(i.level);
        return {n, i.vcpu.value()};
      }
    }
    return {99, 99};
  }
};

// Lowest priority to every vCPU (x2APIC logical, cluster 0, all bits): the policy picks the one target.
void DoorbellToAll(master::GlobalControllerConfig& c, RoutingPolicy policy) {
  c.router.policy = policy;
  c.pins = {{kDoorbellGsi, RedirectionEntry(Vector(kDoorbellVector), DeliveryMode::kLowestPriority,
                                            DestMode::kLogical, TriggerMode::kEdge, 0xFF)}};
}

// Priorities: vCPU 3 (node B) is the least busy of the VM.
void SetPriorities(master::GlobalController& gc) {
  for (uint32_t v = 0; v < 6; ++v) ASSERT_TRUE(gc.SetVcpuPriority(VcpuIndex(v), v == 3 ? 0x00 : 0x20).ok());
}

TEST(DataplaneCluster, SdmPolicyPicksTheLowestPriorityVcpuOnAnotherNode) {
  Harness h([](auto& c) { DoorbellToAll(c, RoutingPolicy::kSdm); });
  ASSERT_TRUE(h.c);
  SetPriorities(h.c->master());
  for (int k = 0; k < 3; ++k) EXPECT_EQ(h.RingAndWait(kA), (std::pair<uint32_t, uint32_t>{1, 3}));
  // The raise really happened on A: A's local controller handled the master's raise-gsi and sent the interrupt.
  // (Counters are bumped after the send / inject they count: wait for them.)
  EXPECT_TRUE(WaitUntil([&] { return h.c->node(0).lc->counters().control_raises == 3; }));
  EXPECT_EQ(h.c->node(0).lc->counters().raised, 3u);
  EXPECT_EQ(h.c->node(1).lc->counters().control_raises, 0u);
  EXPECT_TRUE(WaitUntil([&] { return h.c->node(1).lc->counters().delivered == 3; }));
  EXPECT_TRUE(WaitUntil([&] { return h.c->master().counters().delivered == 3; }));
  const auto mc = h.c->master().counters();
  EXPECT_EQ(mc.rings, 3u);
  EXPECT_EQ(mc.routed, 3u);
}

TEST(DataplaneCluster, RoundRobinPolicyVisitsEveryVcpuOnEveryNode) {
  Harness h([](auto& c) { DoorbellToAll(c, RoutingPolicy::kRoundRobin); });
  ASSERT_TRUE(h.c);
  SetPriorities(h.c->master());  // ignored by round-robin
  std::set<std::pair<uint32_t, uint32_t>> seen;
  for (int k = 0; k < 6; ++k) seen.insert(h.RingAndWait(kA));
  EXPECT_THAT(seen, ElementsAre(std::pair<uint32_t, uint32_t>{0, 0}, std::pair<uint32_t, uint32_t>{0, 1},
                                std::pair<uint32_t, uint32_t>{1, 2}, std::pair<uint32_t, uint32_t>{1, 3},
                                std::pair<uint32_t, uint32_t>{2, 4}, std::pair<uint32_t, uint32_t>{2, 5}));
}

TEST(DataplaneCluster, NodeLocalFirstPolicyStaysOnTheRaisingNode) {
  Harness h([](auto& c) { DoorbellToAll(c, RoutingPolicy::kNodeLocalFirst); });
  ASSERT_TRUE(h.c);
  SetPriorities(h.c->master());  // vCPU 3 on B is the global lowest, but C's and A's rings stay home
  for (int k = 0; k < 2; ++k) {
    const auto [node, vcpu] = h.RingAndWait(kC);
    EXPECT_EQ(node, 2u);
    EXPECT_TRUE(vcpu == 4 || vcpu == 5) << vcpu;
  }
  const auto [node, vcpu] = h.RingAndWait(kA);
  EXPECT_EQ(node, 0u);
  EXPECT_TRUE(vcpu == 0 || vcpu == 1) << vcpu;
  EXPECT_EQ(h.RingAndWait(kB), (std::pair<uint32_t, uint32_t>{1, 3}));
}

TEST(DataplaneCluster, StaticPolicyDeliversToThePinnedVcpu) {
  Harness h([](auto& c) { DoorbellToAll(c, RoutingPolicy::kStatic); });
  ASSERT_TRUE(h.c);
  SetPriorities(h.c->master());
  ASSERT_TRUE(h.c->master().PinGsi(Gsi(kDoorbellGsi), VcpuIndex(5)).ok());
  for (int k = 0; k < 3; ++k) EXPECT_EQ(h.RingAndWait(kA), (std::pair<uint32_t, uint32_t>{2, 5}));
  // Switched at run time: the same ring now follows sdm (vCPU 3 on B).
  ASSERT_TRUE(h.c->master().SetRoutingPolicy(RoutingPolicy::kSdm).ok());
  EXPECT_EQ(h.RingAndWait(kA), (std::pair<uint32_t, uint32_t>{1, 3}));
  auto table = h.c->master().GetRoutingTable();
  ASSERT_TRUE(table.ok());
  EXPECT_EQ(table->policy, RoutingPolicy::kSdm);
}

TEST(DataplaneCluster, LevelInterruptIsRedeliveredOnlyAfterTheEoiFromTheHandlingNode) {
  constexpr uint32_t kGsi = 9;
  constexpr uint8_t kVector = 0x90;
  Harness h([](auto& c) {
    c.pins = {{kGsi, RedirectionEntry(Vector(kVector), DeliveryMode::kFixed, DestMode::kPhysical,
                                      TriggerMode::kLevel, 3)}};  // vCPU 3, node B
  });
  ASSERT_TRUE(h.c);
  master::GlobalController& gc = h.c->master();
  agent::LocalController& b = *h.c->node(1).lc;
  RecordingVmPort& pb = h.ports[1];

  ASSERT_TRUE(gc.Ring(kA, Gsi(kGsi), TriggerMode::kLevel, true).ok());
  ASSERT_TRUE(pb.WaitFor(1));
  EXPECT_TRUE(pb.injections()[0].level);
  EXPECT_EQ(pb.injections()[0].vcpu, VcpuIndex(3));
  EXPECT_EQ(b.pending_level(VcpuIndex(3), Vector(kVector)), Gsi(kGsi));
  // Still asserted on A, no EOI yet: not delivered again.
  ASSERT_TRUE(gc.Ring(kA, Gsi(kGsi), TriggerMode::kLevel, true).ok());  // unchanged level: A sends nothing
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(pb.count(), 1u);
  EXPECT_EQ(h.Total(), 1u);

  // The guest on B EOIs: kEoi from B, remote IRR cleared, the pin is still asserted -> delivered again.
  b.OnGuestEoi(VcpuIndex(3), Vector(kVector));
  ASSERT_TRUE(pb.WaitFor(2));
  EXPECT_TRUE(pb.injections()[1].level);

  // A deasserts; once the master has seen it, the EOI clears remote IRR and nothing more is delivered.
  const uint64_t changes = gc.counters().gsi_changes;
  ASSERT_TRUE(gc.Ring(kA, Gsi(kGsi), TriggerMode::kLevel, false).ok());
  ASSERT_TRUE(WaitUntil([&] { return gc.counters().gsi_changes > changes; }));
  b.OnGuestEoi(VcpuIndex(3), Vector(kVector));
  ASSERT_TRUE(WaitUntil([&] { return gc.counters().eois == 2; }));
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(pb.count(), 2u);
  auto table = gc.GetRoutingTable();
  ASSERT_TRUE(table.ok());
  EXPECT_FALSE(table->pins[kGsi].remote_irr);
  EXPECT_FALSE(table->pins[kGsi].input);
  EXPECT_EQ(gc.counters().level_delivered, 2u);
  EXPECT_TRUE(WaitUntil([&] { return b.counters().eois_sent == 2; }));
}

TEST(DataplaneCluster, UartCollectsLinesFromVcpusOnDifferentNodes) {
  Harness h({});
  ASSERT_TRUE(h.c);
  std::vector<std::jthread> vcpus;
  std::atomic<int> errors{0};
  for (uint32_t v : {0u, 3u, 5u}) {
    vcpus.emplace_back([&, v] {
      agent::IoForwarder& io = *h.c->node(v / 2).io;
      const std::string line = "hello from vcpu " + std::to_string(v) + "\n";
      for (char ch : line) {
        // Poll LSR for THR empty, then write THR: what a 16550 driver does.
        auto lsr = io.Forward(VcpuIndex(v), agent::IoAccess{.size = 1, .address = 0x3FD});
        if (!lsr.ok() || (lsr->data & 0x20) == 0) errors.fetch_add(1);
        auto w = io.Forward(VcpuIndex(v), agent::IoAccess{.is_write = true, .size = 1, .address = 0x3F8,
                                                          .data = static_cast<uint8_t>(ch)});
        if (!w.ok() || w->no_device) errors.fetch_add(1);
      }
    });
  }
  vcpus.clear();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_THAT(h.c->console(), UnorderedElementsAre(std::pair<uint32_t, std::string>{0, "hello from vcpu 0"},
                                                   std::pair<uint32_t, std::string>{3, "hello from vcpu 3"},
                                                   std::pair<uint32_t, std::string>{5, "hello from vcpu 5"}));
  // No device at 0x2F8 (COM2): status 1, reads all ones.
  auto none = h.c->node(1).io->Forward(VcpuIndex(2), agent::IoAccess{.size = 1, .address = 0x2F8});
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->no_device);
  EXPECT_EQ(none->data, 0xFFu);
}

TEST(DataplaneCluster, UnknownGsiAndForeignVcpuAreCountedAndDropped) {
  Harness h({});
  ASSERT_TRUE(h.c);
  ASSERT_TRUE(h.c->master().Ring(kA, Gsi(30), TriggerMode::kEdge, true).ok());  // raised on A, no pin 30
  ASSERT_TRUE(WaitUntil([&] { return h.c->master().counters().dropped_unknown_gsi == 1; }));  // one edge frame
  // Node A sends I/O for vCPU 4, which runs on C, and an EOI for vCPU 9, which does not exist: both refused.
  transport::Frame io = IoFrame(4, 0x3FD, false, 1);
  ASSERT_TRUE(h.c->node(0).lc->SendToMaster(io).ok());
  transport::Frame eoi = EoiFrame(9, 0x40, 1);
  ASSERT_TRUE(h.c->node(0).lc->SendToMaster(eoi).ok());
  EXPECT_TRUE(WaitUntil([&] { return h.c->master().counters().dropped_wrong_node == 1; }));
  EXPECT_TRUE(WaitUntil([&] { return h.c->master().counters().dropped_unknown_vcpu == 1; }));
  EXPECT_EQ(h.c->master().counters().io_requests, 0u);
  EXPECT_EQ(h.Total(), 0u);
}

TEST(DataplaneCluster, ALostNodeIsReportedAndTheOthersCarryOn) {
  Harness h([](auto& c) { DoorbellToAll(c, RoutingPolicy::kStatic); });
  ASSERT_TRUE(h.c);
  ASSERT_TRUE(h.c->master().PinGsi(Gsi(kDoorbellGsi), VcpuIndex(4)).ok());  // node C
  h.c->KillNode(2);
  ASSERT_TRUE(WaitUntil([&] { return h.c->master().node_lost(kC); }));
  const auto lost = h.c->lost();
  ASSERT_EQ(lost.size(), 1u);
  EXPECT_EQ(lost[0].first, kC);
  EXPECT_THAT(lost[0].second, ::testing::HasSubstr("node 3"));
  EXPECT_EQ(h.c->master().Ring(kC, Gsi(kDoorbellGsi), TriggerMode::kEdge, true).code(),
            absl::StatusCode::kUnavailable);
  // Rung on A, routed to the pinned vCPU on the lost node: counted, not delivered, no hang.
  ASSERT_TRUE(h.c->master().Ring(kA, Gsi(kDoorbellGsi), TriggerMode::kEdge, true).ok());
  ASSERT_TRUE(WaitUntil([&] { return h.c->master().counters().dropped_send_failed == 1; }));
  ASSERT_TRUE(h.c->master().PinGsi(Gsi(kDoorbellGsi), VcpuIndex(2)).ok());
  EXPECT_EQ(h.RingAndWait(kA), (std::pair<uint32_t, uint32_t>{1, 2}));
}

}  // namespace
}  // namespace aggvm::testing
