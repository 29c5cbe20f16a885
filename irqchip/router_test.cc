// The master's routing decision: SDM vol. 3, 11.6.2 (destinations), 11.6.2.4 (lowest priority), 11.11.1 (RH),
// 11.4.7.2 (disabled APIC), plus the platform policies, and a randomized property test against a reference scan.
#include "irqchip/router.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>
#include <vector>

#include "irqchip/destination.h"

namespace aggvm::irqchip {
namespace {

ApicAddressing Xapic(uint32_t id, uint8_t logical_id = 0, uint8_t dfr = kDfrFlat) {
  return ApicAddressing{ApicId(id), false, static_cast<uint32_t>(logical_id) << 24, dfr, true};
}
ApicAddressing X2apic(uint32_t id) { return ApicAddressing{ApicId(id), true, X2apicLdrFromId(ApicId(id)), 0xF, true}; }

// n x2APIC vCPUs with APIC ID = index, spread round-robin over `nodes` nodes.
std::vector<VcpuInfo> X2apicVm(uint32_t n, uint16_t nodes = 1) {
  std::vector<VcpuInfo> v;
  for (uint32_t i = 0; i < n; ++i) v.push_back(VcpuInfo{NodeId(static_cast<uint16_t>(i % nodes)), X2apic(i), 0});
  return v;
}

InterruptRequest Req(DeliveryMode mode, DestMode dm, uint32_t dest, uint8_t vector = 0x40, bool x2 = true) {
  InterruptRequest r;
  r.message.vector = Vector(vector);
  r.message.mode = mode;
  r.message.dest_mode = dm;
  r.message.destination = dest;
  r.message.x2apic_destination = x2;
  return r;
}

Router MakeRouter(std::vector<VcpuInfo> v, RouterConfig c = {}) {
  auto r = Router::Create(std::move(v), c);
  EXPECT_TRUE(r.ok()) << r.status();
  return std::move(*r);
}

std::vector<uint32_t> Targets(Router& r, const InterruptRequest& req) {
  std::vector<Delivery> out(r.vcpu_count());
  const RouteResult res = r.Route(req, out);
  std::vector<uint32_t> t;
  for (uint32_t i = 0; i < res.count; ++i) t.push_back(out[i].vcpu.value());
  std::sort(t.begin(), t.end());
  return t;
}

TEST(Router, Sdm_11_6_2_1_FixedPhysicalReachesTheOneIdAndItsNode) {
  auto r = MakeRouter(X2apicVm(8, 4));
  std::vector<Delivery> out(8);
  auto res = r.Route(Req(DeliveryMode::kFixed, DestMode::kPhysical, 6), out);
  ASSERT_EQ(res.outcome, RouteOutcome::kDelivered);
  ASSERT_EQ(res.count, 1u);
  EXPECT_EQ(out[0], (Delivery{VcpuIndex(6), NodeId(2)}));
}

TEST(Router, Sdm_11_6_2_1_PhysicalBroadcastReachesAll) {
  auto r = MakeRouter(X2apicVm(5));
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kFixed, DestMode::kPhysical, 0xFFFFFFFF)),
            (std::vector<uint32_t>{0, 1, 2, 3, 4}));
  // An IOAPIC (xAPIC-format) broadcast reaches x2APIC vCPUs too (SDM 11.12.9).
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kFixed, DestMode::kPhysical, 0xFF, 0x40, false)).size(), 5u);
}

TEST(Router, Sdm_11_12_10_2_X2apicLogicalCluster) {
  auto r = MakeRouter(X2apicVm(40));
  // Cluster 1 = IDs 16..31; bits 0, 2 and 15 -> IDs 16, 18, 31.
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kFixed, DestMode::kLogical, 0x0001'8005)),
            (std::vector<uint32_t>{16, 18, 31}));
  // Cluster 2 bit 9 -> ID 41 does not exist.
  std::vector<Delivery> out(40);
  auto res = r.Route(Req(DeliveryMode::kFixed, DestMode::kLogical, 0x0002'0200), out);
  EXPECT_EQ(res.outcome, RouteOutcome::kNoDestination);
  EXPECT_EQ(r.counters().no_destination, 1u);
}

TEST(Router, Sdm_11_6_2_2_XapicFlatAndClusterLogical) {
  std::vector<VcpuInfo> flat;
  for (uint32_t i = 0; i < 8; ++i) flat.push_back(VcpuInfo{NodeId(0), Xapic(i, static_cast<uint8_t>(1u << i)), 0});
  auto r = MakeRouter(flat);
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kFixed, DestMode::kLogical, 0x81, 0x40, false)),
            (std::vector<uint32_t>{0, 7}));
  std::vector<VcpuInfo> cl;
  for (uint32_t i = 0; i < 8; ++i) {
    cl.push_back(VcpuInfo{NodeId(0), Xapic(i, static_cast<uint8_t>(((i / 4) << 4) | (1u << (i % 4))), kDfrCluster), 0});
  }
  auto rc = MakeRouter(cl);
  EXPECT_EQ(Targets(rc, Req(DeliveryMode::kFixed, DestMode::kLogical, 0x13, 0x40, false)),
            (std::vector<uint32_t>{4, 5}));
}

TEST(Router, Sdm_11_6_1_ShorthandsUseTheSender) {
  auto r = MakeRouter(X2apicVm(4));
  auto req = Req(DeliveryMode::kFixed, DestMode::kPhysical, 0);
  req.message.source = ApicId(2);
  req.message.shorthand = Shorthand::kSelf;
  EXPECT_EQ(Targets(r, req), (std::vector<uint32_t>{2}));
  req.message.shorthand = Shorthand::kAllIncludingSelf;
  EXPECT_EQ(Targets(r, req), (std::vector<uint32_t>{0, 1, 2, 3}));
  req.message.shorthand = Shorthand::kAllExcludingSelf;
  EXPECT_EQ(Targets(r, req), (std::vector<uint32_t>{0, 1, 3}));
}

TEST(Router, Sdm_11_6_2_4_LowestPriorityPicksTheMinimum) {
  auto v = X2apicVm(8);
  for (uint32_t i = 0; i < 8; ++i) v[i].priority = static_cast<uint8_t>(0x80 - i * 0x10);  // vCPU 7 lowest
  auto r = MakeRouter(v);
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kLowestPriority, DestMode::kPhysical, 0xFFFFFFFF)),
            (std::vector<uint32_t>{7}));
  ASSERT_TRUE(r.UpdatePriority(VcpuIndex(3), 0x00).ok());
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kLowestPriority, DestMode::kPhysical, 0xFFFFFFFF)),
            (std::vector<uint32_t>{3}));
  EXPECT_EQ(r.counters().arbitrated, 2u);
}

TEST(Router, Sdm_11_6_2_4_TieBreakRotatesPerVector) {
  auto r = MakeRouter(X2apicVm(4));  // all priority 0
  auto req = Req(DeliveryMode::kLowestPriority, DestMode::kLogical, 0x0000'000F);
  std::vector<uint32_t> seq;
  for (int i = 0; i < 6; ++i) seq.push_back(Targets(r, req)[0]);
  EXPECT_EQ(seq, (std::vector<uint32_t>{0, 1, 2, 3, 0, 1}));
  // Another vector has its own rotation.
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kLowestPriority, DestMode::kLogical, 0x0000'000F, 0x41))[0], 0u);
}

TEST(Router, Sdm_11_11_1_RedirectableFixedMsiIsArbitrated) {
  auto v = X2apicVm(4);
  v[0].priority = 0x40;
  v[1].priority = 0x10;
  v[2].priority = 0x30;
  v[3].priority = 0x20;
  auto r = MakeRouter(v);
  auto req = Req(DeliveryMode::kFixed, DestMode::kLogical, 0x0000'000F);
  EXPECT_EQ(Targets(r, req).size(), 4u);  // RH = 0: every destination
  req.message.redirection_hint = true;
  EXPECT_EQ(Targets(r, req), (std::vector<uint32_t>{1}));
}

TEST(Router, Sdm_11_6_2_4_FocusProcessorOption) {
  auto v = X2apicVm(4);
  v[2].priority = 0xE0;
  auto r = MakeRouter(v, RouterConfig{.policy = RoutingPolicy::kSdm, .focus_processor = true});
  ASSERT_TRUE(r.SetVectorActive(VcpuIndex(2), Vector(0x40), true).ok());
  auto req = Req(DeliveryMode::kLowestPriority, DestMode::kPhysical, 0xFFFFFFFF);
  EXPECT_EQ(Targets(r, req), (std::vector<uint32_t>{2}));
  EXPECT_EQ(r.counters().focus_wins, 1u);
  ASSERT_TRUE(r.SetVectorActive(VcpuIndex(2), Vector(0x40), false).ok());
  EXPECT_NE(Targets(r, req), (std::vector<uint32_t>{2}));
  // Without the option the focus bit is ignored.
  auto off = MakeRouter(v);
  ASSERT_TRUE(off.SetVectorActive(VcpuIndex(2), Vector(0x40), true).ok());
  EXPECT_NE(Targets(off, req), (std::vector<uint32_t>{2}));
}

TEST(Router, PolicyRoundRobinIgnoresPriority) {
  auto v = X2apicVm(3);
  v[0].priority = 0x00;
  v[1].priority = 0xF0;
  v[2].priority = 0xF0;
  auto r = MakeRouter(v, RouterConfig{.policy = RoutingPolicy::kRoundRobin});
  auto req = Req(DeliveryMode::kLowestPriority, DestMode::kPhysical, 0xFFFFFFFF);
  std::vector<uint32_t> seq;
  for (int i = 0; i < 4; ++i) seq.push_back(Targets(r, req)[0]);
  EXPECT_EQ(seq, (std::vector<uint32_t>{0, 1, 2, 0}));
}

TEST(Router, PolicyNodeLocalFirst) {
  auto v = X2apicVm(8, 2);  // even vCPUs on node 0, odd on node 1
  v[0].priority = 0x00;     // globally lowest, on node 0
  v[3].priority = 0x10;
  for (uint32_t i : {1u, 5u, 7u}) v[i].priority = 0x20;
  for (uint32_t i : {2u, 4u, 6u}) v[i].priority = 0x30;
  auto r = MakeRouter(v, RouterConfig{.policy = RoutingPolicy::kNodeLocalFirst});
  auto req = Req(DeliveryMode::kLowestPriority, DestMode::kPhysical, 0xFFFFFFFF);
  req.source_node = NodeId(1);
  EXPECT_EQ(Targets(r, req), (std::vector<uint32_t>{3}));  // lowest among node 1, not the global minimum
  req.source_node = NodeId(0);
  EXPECT_EQ(Targets(r, req), (std::vector<uint32_t>{0}));
  req.source_node = NodeId(9);  // no vCPU there: lowest priority overall
  EXPECT_EQ(Targets(r, req), (std::vector<uint32_t>{0}));
  EXPECT_EQ(r.counters().node_local_wins, 2u);
  EXPECT_EQ(r.counters().node_local_fallbacks, 1u);
  // Only candidates count: cluster 0 bits 2,3 -> vCPUs 2 (node 0) and 3 (node 1).
  auto narrow = Req(DeliveryMode::kLowestPriority, DestMode::kLogical, 0x0000'000C);
  narrow.source_node = NodeId(0);
  EXPECT_EQ(Targets(r, narrow), (std::vector<uint32_t>{2}));
}

TEST(Router, PolicyStaticPinsByGsiThenVector) {
  auto r = MakeRouter(X2apicVm(8), RouterConfig{.policy = RoutingPolicy::kStatic});
  ASSERT_TRUE(r.PinVector(Vector(0x40), VcpuIndex(5)).ok());
  ASSERT_TRUE(r.PinGsi(Gsi(10), VcpuIndex(6)).ok());
  auto req = Req(DeliveryMode::kLowestPriority, DestMode::kPhysical, 0xFFFFFFFF);
  EXPECT_EQ(Targets(r, req), (std::vector<uint32_t>{5}));
  req.gsi = Gsi(10);
  EXPECT_EQ(Targets(r, req), (std::vector<uint32_t>{6}));
  req.gsi = Gsi(11);  // no GSI pin: the vector pin
  EXPECT_EQ(Targets(r, req), (std::vector<uint32_t>{5}));
  // A pin outside the guest's destination set is not used: fallback to sdm, counted.
  auto narrow = Req(DeliveryMode::kLowestPriority, DestMode::kLogical, 0x0000'0003);
  const auto t = Targets(r, narrow);
  ASSERT_EQ(t.size(), 1u);
  EXPECT_LT(t[0], 2u);
  EXPECT_EQ(r.counters().static_fallbacks, 1u);
  EXPECT_EQ(r.counters().static_pinned, 3u);
  ASSERT_TRUE(r.PinGsi(Gsi(10), std::nullopt).ok());
  req.gsi = Gsi(10);
  EXPECT_EQ(Targets(r, req), (std::vector<uint32_t>{5}));
  EXPECT_FALSE(r.PinVector(Vector(1), VcpuIndex(8)).ok());
}

TEST(Router, Sdm_11_4_7_2_DisabledApicSkippedExceptNmiInitSmiSipi) {
  auto v = X2apicVm(4);
  v[1].apic.enabled = false;
  v[1].priority = 0;
  for (uint32_t i : {0u, 2u, 3u}) v[i].priority = 0x50;
  auto r = MakeRouter(v);
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kFixed, DestMode::kPhysical, 0xFFFFFFFF)),
            (std::vector<uint32_t>{0, 2, 3}));
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kNmi, DestMode::kPhysical, 0xFFFFFFFF)).size(), 4u);
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kInit, DestMode::kPhysical, 1)), (std::vector<uint32_t>{1}));
  // The disabled vCPU has the lowest priority but never wins.
  EXPECT_NE(Targets(r, Req(DeliveryMode::kLowestPriority, DestMode::kPhysical, 0xFFFFFFFF)),
            (std::vector<uint32_t>{1}));
  std::vector<Delivery> out(4);
  auto res = r.Route(Req(DeliveryMode::kFixed, DestMode::kPhysical, 1), out);
  EXPECT_EQ(res.outcome, RouteOutcome::kNoDestination);
  EXPECT_GE(r.counters().disabled_skipped, 3u);
}

TEST(Router, BadInputIsCountedAndDropped) {
  auto r = MakeRouter(X2apicVm(4));
  std::vector<Delivery> out(4);
  auto bad = Req(DeliveryMode::kFixed, DestMode::kPhysical, 0);
  bad.message.mode = static_cast<DeliveryMode>(3);
  EXPECT_EQ(r.Route(bad, out).outcome, RouteOutcome::kBadMessage);
  bad.message.mode = static_cast<DeliveryMode>(200);
  EXPECT_EQ(r.Route(bad, out).outcome, RouteOutcome::kBadMessage);
  EXPECT_EQ(r.counters().bad_message, 2u);
  // Naming no existing vCPU.
  EXPECT_EQ(r.Route(Req(DeliveryMode::kFixed, DestMode::kPhysical, 77), out).outcome, RouteOutcome::kNoDestination);
  EXPECT_EQ(r.counters().no_destination, 1u);
  // A buffer too small: truncated, counted, never overflowed.
  std::vector<Delivery> two(2);
  auto res = r.Route(Req(DeliveryMode::kFixed, DestMode::kPhysical, 0xFFFFFFFF), two);
  EXPECT_EQ(res.outcome, RouteOutcome::kTruncated);
  EXPECT_EQ(res.count, 2u);
  EXPECT_EQ(r.counters().truncated, 1u);
  EXPECT_EQ(r.Route(Req(DeliveryMode::kLowestPriority, DestMode::kPhysical, 1), std::span<Delivery>()).outcome,
            RouteOutcome::kTruncated);
}

TEST(Router, TopologyValidation) {
  EXPECT_FALSE(Router::Create({}).ok());
  EXPECT_FALSE(Router::Create({VcpuInfo{NodeId(0), X2apic(3), 0}, VcpuInfo{NodeId(1), X2apic(3), 0}}).ok());
  EXPECT_FALSE(Router::Create({VcpuInfo{NodeId(0), Xapic(0xFF), 0}}).ok());
  EXPECT_FALSE(Router::Create({VcpuInfo{NodeId(0), X2apic(0xFFFFFFFF), 0}}).ok());
  EXPECT_TRUE(Router::Create({VcpuInfo{NodeId(0), X2apic(0x12345), 0}}).ok());
  auto r = MakeRouter(X2apicVm(2));
  // The guest gives vCPU 0 the ID of vCPU 1: followed (as hardware would), counted; see GuestDuplicateApicId*.
  EXPECT_TRUE(r.UpdateAddressing(VcpuIndex(0), X2apic(1)).ok());
  EXPECT_EQ(r.counters().apic_id_conflicts, 1u);
  EXPECT_FALSE(r.UpdatePriority(VcpuIndex(2), 0).ok());
  EXPECT_EQ(r.UpdateAddressing(VcpuIndex(5), X2apic(9)).code(), absl::StatusCode::kOutOfRange);
  // Broadcast IDs are refused, counted, and the previous addressing kept.
  EXPECT_EQ(r.UpdateAddressing(VcpuIndex(1), Xapic(0xFF)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.UpdateAddressing(VcpuIndex(1), X2apic(0xFFFFFFFF)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.counters().addressing_refused, 2u);
  EXPECT_EQ(r.vcpu(VcpuIndex(1)).apic.id, ApicId(1));
  ASSERT_TRUE(r.UpdateAddressing(VcpuIndex(0), X2apic(0x500)).ok());
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kFixed, DestMode::kPhysical, 0x500)), (std::vector<uint32_t>{0}));
  EXPECT_TRUE(Targets(r, Req(DeliveryMode::kFixed, DestMode::kPhysical, 0)).empty());
  EXPECT_EQ(ParseRoutingPolicy("node-local-first").value(), RoutingPolicy::kNodeLocalFirst);
  EXPECT_FALSE(ParseRoutingPolicy("random").ok());
}

// A guest may give two APICs one ID (xAPIC IDs are writable, SDM vol. 3, 11.4.6). The router follows the guest
// instead of refusing (which left it out of step with the guest) and delivers as hardware does: every APIC whose ID
// equals a physical destination accepts (11.6.2.1).
TEST(Router, GuestDuplicateApicIdIsFollowedCountedAndBothMatchInPhysicalMode) {
  std::vector<VcpuInfo> v;
  for (uint32_t i = 0; i < 4; ++i) {
    v.push_back(VcpuInfo{NodeId(static_cast<uint16_t>(i)), Xapic(i, static_cast<uint8_t>(1u << i)), 0});
  }
  auto r = MakeRouter(v);
  EXPECT_EQ(r.shared_apic_ids(), 0u);
  ASSERT_TRUE(r.UpdateAddressing(VcpuIndex(3), Xapic(1, 0x08)).ok());  // vCPU 3 takes vCPU 1's ID
  EXPECT_EQ(r.vcpu(VcpuIndex(3)).apic.id, ApicId(1)) << "the router keeps the guest's state";
  EXPECT_EQ(r.counters().apic_id_conflicts, 1u);
  EXPECT_EQ(r.shared_apic_ids(), 1u);
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kFixed, DestMode::kPhysical, 1, 0x40, false)),
            (std::vector<uint32_t>{1, 3}));
  EXPECT_TRUE(Targets(r, Req(DeliveryMode::kFixed, DestMode::kPhysical, 3, 0x40, false)).empty());
  // Logical addressing is by LDR, unaffected.
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kFixed, DestMode::kLogical, 0x08, 0x40, false)), (std::vector<uint32_t>{3}));
  // Lowest priority among the two holders of the ID: the lower priority wins.
  ASSERT_TRUE(r.UpdatePriority(VcpuIndex(1), 0x20).ok());
  ASSERT_TRUE(r.UpdatePriority(VcpuIndex(3), 0x10).ok());
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kLowestPriority, DestMode::kPhysical, 1, 0x40, false)),
            (std::vector<uint32_t>{3}));
  // Self and all-excluding-self: the sender is known by its APIC ID only.
  InterruptRequest self = Req(DeliveryMode::kFixed, DestMode::kPhysical, 0, 0x40, false);
  self.message.shorthand = Shorthand::kSelf;
  self.message.source = ApicId(1);
  EXPECT_EQ(Targets(r, self), (std::vector<uint32_t>{1, 3}));
  self.message.shorthand = Shorthand::kAllExcludingSelf;
  EXPECT_EQ(Targets(r, self), (std::vector<uint32_t>{0, 2}));
  // A third holder, then the guest moves them apart again.
  ASSERT_TRUE(r.UpdateAddressing(VcpuIndex(0), Xapic(1, 0x01)).ok());
  EXPECT_EQ(r.counters().apic_id_conflicts, 2u);
  EXPECT_EQ(r.shared_apic_ids(), 1u);
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kFixed, DestMode::kPhysical, 1, 0x40, false)),
            (std::vector<uint32_t>{0, 1, 3}));
  ASSERT_TRUE(r.UpdateAddressing(VcpuIndex(0), Xapic(0, 0x01)).ok());
  ASSERT_TRUE(r.UpdateAddressing(VcpuIndex(3), Xapic(3, 0x08)).ok());
  EXPECT_EQ(r.shared_apic_ids(), 0u);
  EXPECT_EQ(r.counters().apic_id_conflicts, 2u) << "moving apart is not a conflict";
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kFixed, DestMode::kPhysical, 1, 0x40, false)), (std::vector<uint32_t>{1}));
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kFixed, DestMode::kPhysical, 3, 0x40, false)), (std::vector<uint32_t>{3}));
}

// Large (x2APIC) IDs shared: the sorted index holds both; physical and x2APIC logical destinations reach both.
TEST(Router, GuestDuplicateLargeApicIdMatchesEveryHolder) {
  auto r = MakeRouter(X2apicVm(300));
  ASSERT_TRUE(r.UpdateAddressing(VcpuIndex(10), X2apic(290)).ok());
  EXPECT_EQ(r.shared_apic_ids(), 1u);
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kFixed, DestMode::kPhysical, 290)), (std::vector<uint32_t>{10, 290}));
  // ID 290 = cluster 18, bit 2.
  EXPECT_EQ(Targets(r, Req(DeliveryMode::kFixed, DestMode::kLogical, (18u << 16) | 0x4)),
            (std::vector<uint32_t>{10, 290}));
  EXPECT_TRUE(Targets(r, Req(DeliveryMode::kFixed, DestMode::kPhysical, 10)).empty());
}

class RecordingSink : public InterruptSink {
 public:
  void SendMessage(const InterruptMessage&, std::optional<Gsi>) override {}
  void Deliver(VcpuIndex v, NodeId n, const InterruptMessage& m) override { got.push_back({v, n, m.vector}); }
  void BroadcastEoi(Vector) override {}
  void Forward(NodeId, const InterruptMessage&) override {}
  struct Got {
    VcpuIndex v;
    NodeId n;
    Vector vec;
  };
  std::vector<Got> got;
};

TEST(Router, DispatchDeliversThroughTheSink) {
  auto r = MakeRouter(X2apicVm(3, 3));
  RecordingSink sink;
  r.Dispatch(Req(DeliveryMode::kFixed, DestMode::kPhysical, 0xFFFFFFFF, 0x99), sink);
  ASSERT_EQ(sink.got.size(), 3u);
  EXPECT_EQ(sink.got[2].v, VcpuIndex(2));
  EXPECT_EQ(sink.got[2].n, NodeId(2));
  EXPECT_EQ(sink.got[2].vec, Vector(0x99));
}

// ---- Randomized property test (fixed seeds) ----------------------------------------------------------------------

std::vector<VcpuInfo> RandomTopology(std::mt19937_64& rng) {
  const uint32_t n = 1 + static_cast<uint32_t>(rng() % 80);
  const int kind = static_cast<int>(rng() % 4);  // 0 xAPIC flat, 1 xAPIC cluster, 2 x2APIC, 3 mixed
  std::vector<VcpuInfo> v;
  std::set<uint32_t> used;
  for (uint32_t i = 0; i < n; ++i) {
    VcpuInfo info;
    info.node = NodeId(static_cast<uint16_t>(rng() % 4));
    info.priority = static_cast<uint8_t>(rng() % 4 * 0x10 + rng() % 3);
    const bool x2 = kind == 2 || (kind == 3 && (rng() & 1));
    uint32_t id;
    do {
      id = x2 ? static_cast<uint32_t>(rng() % 3 == 0 ? rng() % 0x40000 : rng() % 96) : static_cast<uint32_t>(rng() % 0xFF);
    } while (!used.insert(id).second);
    if (x2) {
      info.apic = X2apic(id);
    } else if (kind == 1 || (kind == 3 && (rng() & 2))) {
      info.apic = Xapic(id, static_cast<uint8_t>((rng() % 16) << 4 | (1u << (rng() % 4))), kDfrCluster);
    } else {
      info.apic = Xapic(id, static_cast<uint8_t>(1u << (rng() % 8)), kDfrFlat);
    }
    info.apic.enabled = rng() % 10 != 0;
    v.push_back(info);
  }
  return v;
}

InterruptRequest RandomRequest(std::mt19937_64& rng, const std::vector<VcpuInfo>& v) {
  InterruptRequest r;
  InterruptMessage& m = r.message;
  static constexpr DeliveryMode kModes[] = {DeliveryMode::kFixed, DeliveryMode::kLowestPriority, DeliveryMode::kSmi,
                                            DeliveryMode::kNmi,   DeliveryMode::kInit,           DeliveryMode::kStartup,
                                            DeliveryMode::kExtInt};
  m.mode = rng() % 50 == 0 ? static_cast<DeliveryMode>(3) : kModes[rng() % 7];
  if (rng() % 3 == 0) m.mode = DeliveryMode::kLowestPriority;
  m.vector = Vector(static_cast<uint8_t>(rng() % 4 + 0x30));
  m.dest_mode = (rng() & 1) ? DestMode::kLogical : DestMode::kPhysical;
  m.x2apic_destination = rng() & 1;
  m.redirection_hint = rng() % 4 == 0;
  const auto& pick = v[rng() % v.size()].apic;
  switch (rng() % 6) {
    case 0: m.destination = pick.id.value(); break;
    case 1: m.destination = pick.x2apic ? X2apicLdrFromId(pick.id) | static_cast<uint32_t>(rng() & 0xFFFF)
                                        : (pick.ldr >> 24) | static_cast<uint32_t>(rng() & 0x3); break;
    case 2: m.destination = (rng() & 1) ? 0xFF : 0xFFFFFFFF; break;
    case 3: m.destination = static_cast<uint32_t>(rng()); break;
    default: m.destination = static_cast<uint32_t>(rng() % 0x100); break;
  }
  if (rng() % 8 == 0) m.shorthand = static_cast<Shorthand>(1 + rng() % 3);
  m.source = v[rng() % v.size()].apic.id;
  r.source_node = NodeId(static_cast<uint16_t>(rng() % 5));
  if (rng() & 1) r.gsi = Gsi(static_cast<uint32_t>(rng() % 4));
  return r;
}

TEST(RouterProperty, DeliveriesMatchReferenceAndArbitrationPicksMinimum) {
  for (uint64_t seed : {1ull, 2ull, 3ull, 0xA66Dull, 0xC0FFEEull}) {
    std::mt19937_64 rng(seed);
    for (int topo = 0; topo < 60; ++topo) {
      const auto v = RandomTopology(rng);
      for (auto policy : {RoutingPolicy::kSdm, RoutingPolicy::kRoundRobin, RoutingPolicy::kNodeLocalFirst,
                          RoutingPolicy::kStatic}) {
        const bool focus = rng() & 1;
        auto router = MakeRouter(v, RouterConfig{.policy = policy, .focus_processor = focus});
        auto twin = MakeRouter(v, RouterConfig{.policy = policy, .focus_processor = focus});
        for (uint32_t i = 0; i < v.size(); i += 3) {
          const auto vec = Vector(static_cast<uint8_t>(0x30 + i % 4));
          ASSERT_TRUE(router.SetVectorActive(VcpuIndex(i), vec, true).ok());
          ASSERT_TRUE(twin.SetVectorActive(VcpuIndex(i), vec, true).ok());
        }
        const auto pin = VcpuIndex(static_cast<uint32_t>(rng() % v.size()));
        ASSERT_TRUE(router.PinVector(Vector(0x31), pin).ok());
        ASSERT_TRUE(twin.PinVector(Vector(0x31), pin).ok());
        std::vector<Delivery> out(v.size()), out2(v.size());
        for (int k = 0; k < 40; ++k) {
          const InterruptRequest req = RandomRequest(rng, v);
          const InterruptMessage& m = req.message;
          const RouteResult res = router.Route(req, out);
          const RouteResult res2 = twin.Route(req, out2);
          // Determinism: same inputs and state, same decision.
          ASSERT_EQ(res.count, res2.count);
          ASSERT_EQ(res.outcome, res2.outcome);
          for (uint32_t d = 0; d < res.count; ++d) ASSERT_EQ(out[d], out2[d]);
          const auto mode_bits = static_cast<uint8_t>(m.mode);
          if (mode_bits == 3) {
            ASSERT_EQ(res.outcome, RouteOutcome::kBadMessage);
            continue;
          }
          // Reference: a plain scan with the SDM matching rules.
          std::vector<uint32_t> expected;
          for (uint32_t i = 0; i < v.size(); ++i) {
            if (!MatchesDestination(m, v[i].apic)) continue;
            if (!v[i].apic.enabled && (IsArbitrated(m) || !AcceptedWhileDisabled(m.mode))) continue;
            expected.push_back(i);
          }
          std::vector<uint32_t> got;
          for (uint32_t d = 0; d < res.count; ++d) {
            got.push_back(out[d].vcpu.value());
            ASSERT_EQ(out[d].node, v[out[d].vcpu.value()].node);
          }
          std::sort(got.begin(), got.end());
          ASSERT_EQ(std::adjacent_find(got.begin(), got.end()), got.end()) << "duplicate delivery";
          if (expected.empty()) {
            ASSERT_EQ(res.outcome, RouteOutcome::kNoDestination);
            ASSERT_EQ(res.count, 0u);
            continue;
          }
          if (!IsArbitrated(m)) {
            ASSERT_EQ(got, expected) << "seed " << seed;
            continue;
          }
          ASSERT_EQ(got.size(), 1u);
          const uint32_t w = got[0];
          ASSERT_TRUE(std::binary_search(expected.begin(), expected.end(), w)) << "winner is not a candidate";
          uint8_t min_prio = 0xFF;
          for (uint32_t i : expected) min_prio = std::min(min_prio, v[i].priority);
          const bool any_focus = std::any_of(expected.begin(), expected.end(), [&](uint32_t i) {
            return i % 3 == 0 && (0x30 + i % 4) == m.vector.value();
          });
          if (policy == RoutingPolicy::kSdm && !(focus && any_focus)) {
            ASSERT_EQ(v[w].priority, min_prio) << "lowest priority must pick a minimum-priority candidate";
          }
          if (policy == RoutingPolicy::kSdm && focus && any_focus) {
            ASSERT_EQ(w % 3, 0u);
          }
          if (policy == RoutingPolicy::kNodeLocalFirst && !(focus && any_focus)) {
            uint8_t local_min = 0xFF;
            for (uint32_t i : expected) {
              if (v[i].node == req.source_node) local_min = std::min(local_min, v[i].priority);
            }
            if (local_min != 0xFF) {
              ASSERT_EQ(v[w].node, req.source_node);
              ASSERT_EQ(v[w].priority, local_min);
            } else {
              ASSERT_EQ(v[w].priority, min_prio);
            }
          }
          if (policy == RoutingPolicy::kStatic && m.vector == Vector(0x31) && !req.gsi &&
              std::binary_search(expected.begin(), expected.end(), pin.value())) {
            ASSERT_EQ(w, pin.value());
          }
        }
      }
    }
  }
}

// Random guest re-addressing (with collisions on purpose) keeps every fast path equal to the reference scan.
TEST(RouterProperty, SharedIdsAfterGuestUpdatesMatchReference) {
  std::mt19937_64 rng(0x51D);
  for (int topo = 0; topo < 40; ++topo) {
    std::vector<VcpuInfo> v = RandomTopology(rng);
    auto r = MakeRouter(v);
    for (int step = 0; step < 30; ++step) {
      const auto i = static_cast<uint32_t>(rng() % v.size());
      ApicAddressing a = v[i].apic;
      const auto& other = v[rng() % v.size()].apic;
      a.id = other.id;  // often a collision
      if (!a.x2apic && a.id.value() >= kXapicBroadcast) continue;
      if (a.x2apic) a.ldr = X2apicLdrFromId(a.id);
      ASSERT_TRUE(r.UpdateAddressing(VcpuIndex(i), a).ok());
      v[i].apic = a;
      std::vector<Delivery> out(v.size());
      for (int k = 0; k < 20; ++k) {
        InterruptRequest req = RandomRequest(rng, v);
        if (IsArbitrated(req.message) || static_cast<uint8_t>(req.message.mode) == 3) continue;
        const RouteResult res = r.Route(req, out);
        std::vector<uint32_t> expected, got;
        for (uint32_t c = 0; c < v.size(); ++c) {
          if (MatchesDestination(req.message, v[c].apic) &&
              (v[c].apic.enabled || AcceptedWhileDisabled(req.message.mode))) {
            expected.push_back(c);
          }
        }
        for (uint32_t d = 0; d < res.count; ++d) got.push_back(out[d].vcpu.value());
        std::sort(got.begin(), got.end());
        ASSERT_EQ(got, expected) << "topology " << topo << " step " << step;
      }
    }
  }
}

}  // namespace
}  // namespace aggvm::irqchip
