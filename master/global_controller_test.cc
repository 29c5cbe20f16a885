// GlobalController over real TcpTransports on loopback: the master runs its data-plane thread; the "nodes" are raw
// transports driven by the test, so every frame the master sends or refuses is visible.
#include "master/global_controller.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <thread>

#include "common/clock.h"
#include "tests/dataplane/tcp_mesh.h"
#include "tests/support/thread_watch.h"

namespace aggvm::master {
namespace {

using irqchip::DeliveryMode;
using irqchip::DestMode;
using irqchip::TriggerMode;
using testing::EoiFrame;
using testing::GsiFrame;
using testing::IoFrame;
using testing::NextFrame;
using testing::TcpStar;
using transport::ControlPayload;
using transport::DeliverPayload;
using transport::FrameType;
using transport::IoRequestPayload;
using ::testing::ElementsAre;

constexpr NodeId kMaster{0};
constexpr NodeId kA{1}, kB{2}, kC{3}, kStranger{9};

// 3 nodes x 2 vCPUs: vCPU i on node 1 + i / 2, APIC ID i. Node 9 is connected but not part of the VM.
struct Fixture {
  TcpStar star;
  std::unique_ptr<GlobalController> gc;
  std::jthread thread;
  std::mutex mu;
  std::vector<std::pair<uint32_t, std::string>> console;
  std::vector<NodeId> lost;
  std::atomic<pid_t> tid{0};  // the data-plane thread's

  static std::unique_ptr<Fixture> Make(std::vector<PinProgram> pins = {}) {
    auto f = std::make_unique<Fixture>();
    auto star = TcpStar::Make({kMaster, kA, kB, kC, kStranger});
    EXPECT_TRUE(star.ok()) << star.status();
    if (!star.ok()) return nullptr;
    f->star = *std::move(star);
    GlobalControllerConfig c;
    c.nodes = {kA, kB, kC};
    for (uint32_t i = 0; i < 6; ++i) c.vcpus.push_back(X2apicVcpu(NodeId(1 + i / 2), ApicId(i)));
    c.pins = std::move(pins);
    Fixture* raw = f.get();
    c.console = [raw](VcpuIndex v, std::string_view line) {
      std::lock_guard<std::mutex> l(raw->mu);
      raw->console.emplace_back(v.value(), std::string(line));
    };
    c.on_node_lost = [raw](NodeId n, const absl::Status&) {
      std::lock_guard<std::mutex> l(raw->mu);
      raw->lost.push_back(n);
    };
    auto gc = GlobalController::Create(std::move(c), &f->star.master());
    EXPECT_TRUE(gc.ok()) << gc.status();
    if (!gc.ok()) return nullptr;
    f->gc = *std::move(gc);
    f->thread = std::jthread([raw](std::stop_token st) {
      raw->tid.store(::gettid());
      EXPECT_TRUE(raw->gc->Run(st).ok());
    });
    return f;
  }
  transport::TcpTransport& node(NodeId n) { return star.node(n == kStranger ? 4 : n.value()); }
  void Send(NodeId from, transport::Frame f) { ASSERT_TRUE(node(from).Send(kMaster, f).ok()); }
};

DeliverPayload ExpectDeliver(transport::Transport& t) {
  auto f = NextFrame(t);
  EXPECT_TRUE(f.has_value()) << "no frame arrived";
  if (!f) return {};
  EXPECT_EQ(f->frame.type, FrameType::kDeliver);
  const auto* d = std::get_if<DeliverPayload>(&f->frame.payload);
  EXPECT_NE(d, nullptr);
  return d ? *d : DeliverPayload{};
}

bool WaitFor(const std::function<bool()>& pred, absl::Duration timeout = absl::Seconds(5)) {
  const absl::Time end = absl::Now() + timeout;
  while (absl::Now() < end) {
    if (pred()) return true;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return pred();
}

TEST(GlobalController, EdgeGsiIsRoutedToTheOwnerOfThePhysicalDestination) {
  // Pin 3 -> vector 0x33, fixed, physical APIC 4 (vCPU 4 on node C).
  auto f = Fixture::Make({{3, RedirectionEntry(Vector(0x33), DeliveryMode::kFixed, DestMode::kPhysical,
                                               TriggerMode::kEdge, 4)}});
  ASSERT_TRUE(f);
  f->Send(kA, GsiFrame(3, true));
  f->Send(kA, GsiFrame(3, false));
  const DeliverPayload d = ExpectDeliver(f->node(kC));
  EXPECT_EQ(d.vcpu, VcpuIndex(4));
  EXPECT_EQ(d.vector, Vector(0x33));
  EXPECT_EQ(d.mode, DeliveryMode::kFixed);
  EXPECT_EQ(d.level_triggered, 0);
  EXPECT_EQ(d.ipi_source_vcpu, 0xffffffffu);
  // A second edge is a second delivery; the deassert frames deliver nothing.
  f->Send(kB, GsiFrame(3, true));
  f->Send(kB, GsiFrame(3, false));
  EXPECT_EQ(ExpectDeliver(f->node(kC)).vcpu, VcpuIndex(4));
  EXPECT_FALSE(NextFrame(f->node(kA), absl::Milliseconds(50)));
  EXPECT_FALSE(NextFrame(f->node(kB), absl::Milliseconds(50)));
  EXPECT_FALSE(NextFrame(f->node(kC), absl::Milliseconds(50)));
  // The one-frame edge (what RaiseEdge sends): one delivery; and the pin is low again after it.
  f->Send(kA, testing::GsiEdgeFrame(3));
  EXPECT_EQ(ExpectDeliver(f->node(kC)).vcpu, VcpuIndex(4));
  f->Send(kA, testing::GsiEdgeFrame(3));
  EXPECT_EQ(ExpectDeliver(f->node(kC)).vcpu, VcpuIndex(4)) << "a second edge frame is a second rising edge";
  EXPECT_FALSE(NextFrame(f->node(kC), absl::Milliseconds(50)));
  const auto c = f->gc->counters();
  EXPECT_EQ(c.gsi_changes, 6u);
  EXPECT_EQ(c.raised, 4u);
  EXPECT_EQ(c.routed, 4u);
  EXPECT_EQ(c.delivered, 4u);
  EXPECT_EQ(c.level_delivered, 0u);
}

TEST(GlobalController, TracedInterruptGetsMasterHopsInEveryDelivery) {
  // Logical broadcast, fixed: every vCPU gets it (6 deliveries over 3 nodes).
  auto f = Fixture::Make({{5, RedirectionEntry(Vector(0x50), DeliveryMode::kFixed, DestMode::kLogical,
                                               TriggerMode::kEdge, 0xFF)}});
  ASSERT_TRUE(f);
  transport::Frame raise = GsiFrame(5, true);
  raise.flags = transport::kFlagTraced;
  raise.trace.trace_id = 77;
  raise.trace.raised = MonotonicNanos() - 1000;
  raise.trace.local_controller = raise.trace.raised + 500;
  f->Send(kA, raise);
  std::vector<uint32_t> vcpus;
  for (NodeId n : {kA, kB, kC}) {
    for (int k = 0; k < 2; ++k) {
      auto fr = NextFrame(f->node(n));
      ASSERT_TRUE(fr);
      ASSERT_TRUE(fr->frame.traced());
      const auto& t = fr->frame.trace;
      EXPECT_EQ(t.trace_id, 77u);
      EXPECT_EQ(t.raised, raise.trace.raised);
      EXPECT_EQ(t.local_controller, raise.trace.local_controller);
      EXPECT_GT(t.master_received, t.local_controller);
      EXPECT_GE(t.master_decided, t.master_received);
      EXPECT_EQ(t.target_received, 0u);
      vcpus.push_back(std::get<DeliverPayload>(fr->frame.payload).vcpu.value());
    }
  }
  std::sort(vcpus.begin(), vcpus.end());
  EXPECT_THAT(vcpus, ElementsAre(0, 1, 2, 3, 4, 5));
}

TEST(GlobalController, LevelGsiWaitsForTheEoiFromTheHandlingNode) {
  // Pin 7 level -> vector 0x70 on vCPU 2 (node B). Raised on node A.
  auto f = Fixture::Make({{7, RedirectionEntry(Vector(0x70), DeliveryMode::kFixed, DestMode::kPhysical,
                                               TriggerMode::kLevel, 2)}});
  ASSERT_TRUE(f);
  f->Send(kA, GsiFrame(7, true));
  DeliverPayload d = ExpectDeliver(f->node(kB));
  EXPECT_EQ(d.vcpu, VcpuIndex(2));
  EXPECT_EQ(d.level_triggered, 1);
  EXPECT_EQ(d.gsi, Gsi(7));
  auto table = f->gc->GetRoutingTable();
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_TRUE(table->pins[7].remote_irr);
  EXPECT_TRUE(table->pins[7].input);

  // Still asserted, remote IRR set: nothing more, however long we wait; an EOI from the wrong node changes nothing.
  f->Send(kA, GsiFrame(7, true));
  f->Send(kC, EoiFrame(2, 0x70, 7));
  EXPECT_FALSE(NextFrame(f->node(kB), absl::Milliseconds(200)));
  EXPECT_TRUE(WaitFor([&] { return f->gc->counters().dropped_wrong_node == 1; }));

  // The EOI from node B (which handled it): remote IRR cleared, the pin is still asserted -> delivered again.
  f->Send(kB, EoiFrame(2, 0x70, 7));
  d = ExpectDeliver(f->node(kB));
  EXPECT_EQ(d.vcpu, VcpuIndex(2));
  EXPECT_EQ(d.level_triggered, 1);

  // Deassert, then (once the master has seen it: A and B are different connections) EOI: remote IRR clears, no new
  // delivery.
  const uint64_t changes = f->gc->counters().gsi_changes;
  f->Send(kA, GsiFrame(7, false));
  ASSERT_TRUE(WaitFor([&] { return f->gc->counters().gsi_changes == changes + 1; }));
  f->Send(kB, EoiFrame(2, 0x70, 7));
  EXPECT_FALSE(NextFrame(f->node(kB), absl::Milliseconds(200)));
  table = f->gc->GetRoutingTable();
  ASSERT_TRUE(table.ok());
  EXPECT_FALSE(table->pins[7].remote_irr);
  EXPECT_FALSE(table->pins[7].input);
  const auto c = f->gc->counters();
  EXPECT_EQ(c.level_delivered, 2u);
  EXPECT_EQ(c.eois, 2u);
}

TEST(GlobalController, MsiIsDecodedAndRouted) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  transport::Frame m;
  m.type = FrameType::kInterrupt;
  transport::InterruptPayload p;
  p.kind = transport::InterruptPayload::Kind::kMsi;
  p.msi_address = 0xFEE00000u | (3u << 12);  // APIC 3 = vCPU 3 on node B
  p.msi_data = 0x41;
  m.payload = p;
  f->Send(kC, m);
  const DeliverPayload d = ExpectDeliver(f->node(kB));
  EXPECT_EQ(d.vcpu, VcpuIndex(3));
  EXPECT_EQ(d.vector, Vector(0x41));
  // Remappable format (address bit 4): refused by DecodeMsi, counted.
  p.msi_address |= 1u << 4;
  m.payload = p;
  f->Send(kC, m);
  EXPECT_TRUE(WaitFor([&] { return f->gc->counters().dropped_bad_msi == 1; }));
  EXPECT_EQ(f->gc->counters().msis, 1u);
}

// Issue 6: guest IPIs. A proxy-resolved IPI (a node's proxy vCPU caught it; sender unknown) names one physical APIC
// ID and is routed without a sender check; an ICR from a known sender is routed with its sender (shorthands).
TEST(GlobalController, GuestIpisAreRoutedToTheirOwners) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  auto ipi = [](uint32_t source, uint32_t dest, DeliveryMode mode, uint8_t vector, uint8_t shorthand = 0) {
    transport::Frame m;
    m.type = FrameType::kIpi;
    transport::IpiPayload p;
    p.source_vcpu = VcpuIndex(source);
    p.destination = dest;
    p.mode = mode;
    p.vector = Vector(vector);
    p.shorthand = shorthand;
    m.payload = p;
    return m;
  };
  f->Send(kA, ipi(transport::kIpiSourceProxyResolved, 5, DeliveryMode::kNmi, 0));
  DeliverPayload d = ExpectDeliver(f->node(kC));
  EXPECT_EQ(d.vcpu, VcpuIndex(5));
  EXPECT_EQ(d.mode, DeliveryMode::kNmi);
  EXPECT_EQ(d.ipi_source_vcpu, transport::kIpiSourceProxyResolved);
  f->Send(kA, ipi(transport::kIpiSourceProxyResolved, 2, DeliveryMode::kStartup, 0x9F));
  d = ExpectDeliver(f->node(kB));
  EXPECT_EQ(d.vcpu, VcpuIndex(2));
  EXPECT_EQ(d.mode, DeliveryMode::kStartup);
  EXPECT_EQ(d.vector, Vector(0x9F));
  // From a known sender: all-excluding-self from vCPU 1 reaches the five others, on every node.
  f->Send(kA, ipi(1, 0, DeliveryMode::kFixed, 0x40, 3));
  EXPECT_EQ(ExpectDeliver(f->node(kA)).vcpu, VcpuIndex(0));
  for (NodeId n : {kB, kC}) {
    for (int i = 0; i < 2; ++i) EXPECT_EQ(ExpectDeliver(f->node(n)).ipi_source_vcpu, 1u);
  }
  // A proxy-resolved IPI to an APIC ID nobody has, and an ICR claiming another node's vCPU as sender.
  f->Send(kA, ipi(transport::kIpiSourceProxyResolved, 0x77, DeliveryMode::kFixed, 0x40));
  f->Send(kA, ipi(4, 0, DeliveryMode::kFixed, 0x40));
  // frames_received moves when a frame's handling starts: wait for the last counters the frames move.
  ASSERT_TRUE(WaitFor([&] {
    const auto c = f->gc->counters();
    return c.frames_received == 5 && c.dropped_wrong_node == 1 && c.delivered == 7;
  }));
  const auto c = f->gc->counters();
  EXPECT_EQ(c.ipis, 4u);
  EXPECT_EQ(c.ipis_proxy_resolved, 3u);
  EXPECT_EQ(c.dropped_no_destination, 1u);
  EXPECT_EQ(c.dropped_wrong_node, 1u);
  EXPECT_EQ(c.delivered, 7u);
}

// An INIT level de-assert (ICR level 0, trigger level; SDM vol. 3, 11.6.1) has no effect on a CPU: the master must not
// turn it into a kDeliver (which carries no level bit and would reset the owner's vCPU). An INIT assert still goes.
TEST(GlobalController, InitLevelDeassertIsNotDelivered) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  auto init = [](bool assert_level) {
    transport::Frame m;
    m.type = FrameType::kIpi;
    transport::IpiPayload p;
    p.source_vcpu = VcpuIndex(1);
    p.destination = 2;
    p.mode = DeliveryMode::kInit;
    p.level = assert_level ? 1 : 0;
    p.trigger_level = 1;
    m.payload = p;
    return m;
  };
  f->Send(kA, init(false));
  f->Send(kA, init(true));
  const DeliverPayload d = ExpectDeliver(f->node(kB));
  EXPECT_EQ(d.vcpu, VcpuIndex(2));
  EXPECT_EQ(d.mode, DeliveryMode::kInit);
  // The counters are bumped after the send: the node may hold the kDeliver before `delivered` moves.
  ASSERT_TRUE(WaitFor([&] {
    const auto c = f->gc->counters();
    return c.frames_received == 2 && c.delivered == 1;
  }));
  EXPECT_EQ(f->gc->counters().init_deasserts, 1u);
}

// Issue 6: a node reports its vCPUs' PPR (kControl priority); lowest-priority IPIs then go to the lowest one.
TEST(GlobalController, ReportedPrioritiesDecideLowestPriorityIpis) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  auto prio = [](uint32_t vcpu, uint8_t ppr) {
    transport::Frame m;
    m.type = FrameType::kControl;
    m.payload = ControlPayload{.op = ControlPayload::Op::kPriority, .arg0 = vcpu, .arg1 = ppr};
    return m;
  };
  f->Send(kA, prio(0, 0x30));
  f->Send(kA, prio(1, 0x20));
  f->Send(kB, prio(2, 0x50));
  f->Send(kB, prio(3, 0x60));
  f->Send(kC, prio(4, 0x40));
  f->Send(kC, prio(5, 0x10));  // the lowest
  f->Send(kA, prio(5, 0x00));  // vCPU 5 is C's: refused
  ASSERT_TRUE(WaitFor([&] {
    const auto c = f->gc->counters();
    return c.frames_received == 7 && c.priorities + c.dropped_wrong_node == 7;
  }));
  EXPECT_EQ(f->gc->counters().priorities, 6u);
  EXPECT_EQ(f->gc->counters().dropped_wrong_node, 1u);
  transport::Frame m;
  m.type = FrameType::kIpi;
  transport::IpiPayload p;
  p.source_vcpu = VcpuIndex(0);
  p.mode = DeliveryMode::kLowestPriority;
  p.vector = Vector(0x50);
  p.shorthand = 2;  // all including self
  m.payload = p;
  f->Send(kA, m);
  const DeliverPayload d = ExpectDeliver(f->node(kC));
  EXPECT_EQ(d.vcpu, VcpuIndex(5));
  EXPECT_EQ(d.mode, DeliveryMode::kFixed) << "the arbitration is final";
}

TEST(GlobalController, FramesNamingUnknownThingsAreCountedAndDropped) {
  auto f = Fixture::Make({{1, RedirectionEntry(Vector(0x21), DeliveryMode::kFixed, DestMode::kPhysical,
                                               TriggerMode::kEdge, 0x3F)}});  // APIC 0x3F: no such vCPU
  ASSERT_TRUE(f);
  f->Send(kA, GsiFrame(30, true));                      // the IOAPIC has 24 pins
  f->Send(kA, EoiFrame(99, 0x30, 1));                    // no vCPU 99
  f->Send(kA, EoiFrame(0, 0x30, 40));                    // vCPU 0 is A's, GSI 40 unknown
  f->Send(kA, IoFrame(42, 0x3F8, true, 1, 'x'));         // no vCPU 42
  f->Send(kA, IoFrame(5, 0x3F8, true, 1, 'x'));          // vCPU 5 is C's, not A's
  f->Send(kStranger, GsiFrame(1, true));                 // node 9 is not part of the VM
  f->Send(kA, GsiFrame(1, true));                        // routed to nobody
  transport::Frame deliver;
  deliver.type = FrameType::kDeliver;
  deliver.payload = DeliverPayload{.vcpu = VcpuIndex(0), .vector = Vector(0x40)};
  f->Send(kA, deliver);                                  // not for the master
  ASSERT_TRUE(WaitFor([&] {
    const auto c = f->gc->counters();
    return c.dropped_unknown_gsi + c.dropped_unknown_vcpu + c.dropped_wrong_node + c.dropped_unknown_node +
               c.dropped_no_destination + c.dropped_unexpected_type ==
           8;
  }));
  const auto c = f->gc->counters();
  EXPECT_EQ(c.dropped_unknown_gsi, 2u);
  EXPECT_EQ(c.dropped_unknown_vcpu, 2u);
  EXPECT_EQ(c.dropped_wrong_node, 1u);
  EXPECT_EQ(c.dropped_unknown_node, 1u);
  EXPECT_EQ(c.dropped_no_destination, 1u);
  EXPECT_EQ(c.dropped_unexpected_type, 1u);
  EXPECT_EQ(c.delivered, 0u);
  EXPECT_EQ(c.io_requests, 0u);
  for (NodeId n : {kA, kB, kC}) EXPECT_FALSE(NextFrame(f->node(n), absl::Milliseconds(20)));
}

TEST(GlobalController, IoRequestsReachTheMasterDevices) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  auto io = [&](NodeId n, transport::Frame req) {
    f->Send(n, req);
    auto r = NextFrame(f->node(n));
    EXPECT_TRUE(r);
    if (!r) return IoRequestPayload{};
    EXPECT_EQ(r->frame.type, FrameType::kIoResponse);
    return std::get<IoRequestPayload>(r->frame.payload);
  };
  // Two vCPUs on different nodes interleave characters: each gets its own line.
  for (char ch : std::string("hi\n")) {
    EXPECT_EQ(io(kA, IoFrame(1, 0x3F8, true, 1, ch)).status, 0);
    EXPECT_EQ(io(kC, IoFrame(5, 0x3F8, true, 1, ch == '\n' ? '\n' : ch + 1)).status, 0);
  }
  const IoRequestPayload lsr = io(kB, IoFrame(2, 0x3FD, false, 1));
  EXPECT_EQ(lsr.status, 0);
  EXPECT_EQ(lsr.data, 0x60u);
  const IoRequestPayload none = io(kB, IoFrame(2, 0x1234, false, 2));
  EXPECT_EQ(none.status, 1);
  EXPECT_EQ(none.data, 0xFFFFu);
  // IOAPIC registers through forwarded MMIO: IOREGSEL = 1 (version), IOWIN reads 0x00170011 (24 pins, 0x11).
  EXPECT_EQ(io(kA, IoFrame(0, 0xFEC00000, true, 4, 1, IoRequestPayload::Space::kMmio)).status, 0);
  const IoRequestPayload ver = io(kA, IoFrame(0, 0xFEC00010, false, 4, 0, IoRequestPayload::Space::kMmio));
  EXPECT_EQ(ver.status, 0);
  EXPECT_EQ(ver.data, 0x00170011u);
  {
    std::lock_guard<std::mutex> l(f->mu);
    EXPECT_THAT(f->console, ElementsAre(std::pair<uint32_t, std::string>{1, "hi"},
                                        std::pair<uint32_t, std::string>{5, "ij"}));
  }
  const auto c = f->gc->counters();
  EXPECT_EQ(c.io_requests, 10u);
  EXPECT_EQ(c.io_no_device, 1u);
}

TEST(GlobalController, RingSendsRaiseGsiToTheNode) {
  auto f = Fixture::Make();
  ASSERT_TRUE(f);
  ASSERT_TRUE(f->gc->Ring(kB, Gsi(4), TriggerMode::kLevel, true, true).ok());
  auto fr = NextFrame(f->node(kB));
  ASSERT_TRUE(fr);
  const auto& c = std::get<ControlPayload>(fr->frame.payload);
  EXPECT_EQ(c.op, ControlPayload::Op::kRaiseGsi);
  EXPECT_EQ(c.arg0, 4u);
  EXPECT_EQ(c.arg1, ControlPayload::kRaiseLevel | ControlPayload::kRaiseAssert | ControlPayload::kRaiseTraced);
  EXPECT_EQ(f->gc->Ring(kStranger, Gsi(4), TriggerMode::kEdge, true).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f->gc->Ring(kB, Gsi(4096), TriggerMode::kEdge, true).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f->gc->Ring(kB, Gsi(4), TriggerMode::kEdge, false).code(), absl::StatusCode::kInvalidArgument);
  // A guest rings through the doorbell's ports (forwarded PIO): NODE = 3, GSI = 6, RING = edge.
  f->Send(kA, IoFrame(0, Doorbell::kDefaultBase + 0, true, 2, 3));
  f->Send(kA, IoFrame(0, Doorbell::kDefaultBase + 2, true, 2, 6));
  f->Send(kA, IoFrame(0, Doorbell::kDefaultBase + 4, true, 1, Doorbell::kRingAssert));
  fr = NextFrame(f->node(kC));
  ASSERT_TRUE(fr);
  const auto& g = std::get<ControlPayload>(fr->frame.payload);
  EXPECT_EQ(g.op, ControlPayload::Op::kRaiseGsi);
  EXPECT_EQ(g.arg0, 6u);
  EXPECT_EQ(g.arg1, ControlPayload::kRaiseAssert);
  EXPECT_TRUE(WaitFor([&] { return f->gc->counters().rings == 2; }));  // counted once Send returned
}

TEST(GlobalController, RoutingTableAndPolicySwitch) {
  auto f = Fixture::Make({{2, RedirectionEntry(Vector(0x22), DeliveryMode::kLowestPriority, DestMode::kLogical,
                                               TriggerMode::kLevel, 0xFF, true)}});
  ASSERT_TRUE(f);
  auto t = f->gc->GetRoutingTable();
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->policy, irqchip::RoutingPolicy::kSdm);
  ASSERT_EQ(t->pins.size(), 24u);
  EXPECT_EQ(t->pins[2].vector, Vector(0x22));
  EXPECT_EQ(t->pins[2].mode, DeliveryMode::kLowestPriority);
  EXPECT_EQ(t->pins[2].dest_mode, DestMode::kLogical);
  EXPECT_EQ(t->pins[2].trigger, TriggerMode::kLevel);
  EXPECT_EQ(t->pins[2].destination, 0xFF);
  EXPECT_TRUE(t->pins[2].masked);
  EXPECT_TRUE(t->pins[0].masked);
  ASSERT_TRUE(f->gc->SetRoutingPolicy(irqchip::RoutingPolicy::kStatic).ok());
  ASSERT_TRUE(f->gc->PinGsi(Gsi(2), VcpuIndex(5)).ok());
  ASSERT_TRUE(f->gc->ProgramPin({2, RedirectionEntry(Vector(0x22), DeliveryMode::kLowestPriority,
                                                     DestMode::kLogical, TriggerMode::kEdge, 0xFF)}).ok());
  t = f->gc->GetRoutingTable();
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->policy, irqchip::RoutingPolicy::kStatic);
  EXPECT_FALSE(t->pins[2].masked);
  EXPECT_THAT(t->gsi_pins, ElementsAre(std::pair<Gsi, VcpuIndex>{Gsi(2), VcpuIndex(5)}));
  f->Send(kA, GsiFrame(2, true));
  const DeliverPayload d = ExpectDeliver(f->node(kC));
  EXPECT_EQ(d.vcpu, VcpuIndex(5));
  EXPECT_EQ(d.mode, DeliveryMode::kFixed) << "the master's arbitration is final";
  EXPECT_EQ(f->gc->ProgramPin({24, 0}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f->gc->ProgramPin({1, irqchip::IoApic::kRteRemoteIrr}).code(), absl::StatusCode::kInvalidArgument);
}

TEST(GlobalController, ALostNodeIsReportedAndNothingHangs) {
  auto f = Fixture::Make({{3, RedirectionEntry(Vector(0x33), DeliveryMode::kFixed, DestMode::kPhysical,
                                               TriggerMode::kEdge, 2)}});
  ASSERT_TRUE(f);
  f->node(kB).Close();
  ASSERT_TRUE(WaitFor([&] { return f->gc->node_lost(kB); }));
  {
    std::lock_guard<std::mutex> l(f->mu);
    EXPECT_THAT(f->lost, ElementsAre(kB));
  }
  EXPECT_FALSE(f->gc->node_lost(kA));
  const absl::Status s = f->gc->Ring(kB, Gsi(3), TriggerMode::kEdge, true);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  // An interrupt routed to the lost node's vCPU is dropped and counted; the others still work.
  f->Send(kA, GsiFrame(3, true));
  EXPECT_TRUE(WaitFor([&] { return f->gc->counters().dropped_send_failed == 1; }));
  ASSERT_TRUE(f->gc->Ring(kC, Gsi(3), TriggerMode::kEdge, true).ok());
  EXPECT_TRUE(NextFrame(f->node(kC)));
  EXPECT_EQ(f->gc->counters().nodes_lost, 1u);
}

// Event mode waits without a timeout (a 1 ms timeout woke the idle thread a thousand times a second and armed a
// timer around every frame, ~7 µs each way on a virtualised host): a frame, a command or the stop request wakes it.
TEST(GlobalController, AnIdleDataPlaneSleepsUntilAFrameACommandOrTheStop) {
  auto f = Fixture::Make({{3, RedirectionEntry(Vector(0x33), DeliveryMode::kFixed, DestMode::kPhysical,
                                               TriggerMode::kEdge, 2)}});
  ASSERT_TRUE(f);
  ASSERT_TRUE(WaitFor([&] { return f->tid.load() != 0; }));
  absl::SleepFor(absl::Milliseconds(50));
  const int64_t idle = testing::SleepsDuring(f->tid.load(), absl::Milliseconds(300));
  ASSERT_GE(idle, 0) << "no voluntary_ctxt_switches in /proc for the data-plane thread";
  EXPECT_LE(idle, 3) << "the idle data-plane thread woke up " << idle << " times in 300 ms";
  f->Send(kA, GsiFrame(3, true));
  EXPECT_EQ(ExpectDeliver(f->node(kB)).vector, Vector(0x33));
  const absl::Time ring = absl::Now();
  ASSERT_TRUE(f->gc->Ring(kC, Gsi(3), TriggerMode::kEdge, true).ok());  // a command: Execute wakes the thread
  EXPECT_LT(absl::Now() - ring, absl::Seconds(1));
  EXPECT_TRUE(NextFrame(f->node(kC)));
  EXPECT_TRUE(testing::StopsWithin(f->thread, absl::Seconds(2), [&] { f->star.master().Wake(); }))
      << "the stop request did not wake the data-plane thread";
}

TEST(GlobalController, CreateRefusesBadConfigs) {
  auto star = TcpStar::Make({kMaster, kA});
  ASSERT_TRUE(star.ok());
  GlobalControllerConfig c;
  c.nodes = {kA};
  c.vcpus = {X2apicVcpu(kB, ApicId(0))};
  auto gc = GlobalController::Create(c, &star->master());
  ASSERT_FALSE(gc.ok());
  EXPECT_THAT(std::string(gc.status().message()), ::testing::HasSubstr("vcpus[0] is placed on node 2"));
  c.vcpus = {X2apicVcpu(kA, ApicId(0)), X2apicVcpu(kA, ApicId(0))};
  gc = GlobalController::Create(c, &star->master());
  EXPECT_FALSE(gc.ok());
  c.vcpus = {X2apicVcpu(kA, ApicId(0))};
  c.nodes = {kA, kMaster};
  gc = GlobalController::Create(c, &star->master());
  EXPECT_FALSE(gc.ok());
  c.nodes = {kA};
  c.pins = {{30, 0}};
  gc = GlobalController::Create(c, &star->master());
  EXPECT_FALSE(gc.ok());
  c.pins = {};
  EXPECT_TRUE(GlobalController::Create(c, &star->master()).ok());
}

}  // namespace
}  // namespace aggvm::master
