// The master devices as pure logic: the console UART's 16550 registers and per-vCPU lines, the doorbell's ports
// and validation, the PIO bus's windows.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "master/devices/console_uart.h"
#include "master/devices/doorbell.h"
#include "master/devices/pio_device.h"

namespace aggvm::master {
namespace {

using ::testing::ElementsAre;
using Line = std::pair<uint32_t, std::string>;

struct UartFixture {
  std::vector<Line> lines;
  ConsoleUart uart{3, [this](VcpuIndex v, std::string_view l) { lines.emplace_back(v.value(), std::string(l)); }};
  void Put(uint32_t vcpu, std::string_view s) {
    for (char c : s) uart.Write(VcpuIndex(vcpu), 0, 1, static_cast<uint8_t>(c));
  }
};

TEST(ConsoleUart, CollectsOneLinePerVcpu) {
  UartFixture f;
  f.Put(0, "hel");
  f.Put(2, "other\r\n");
  f.Put(0, "lo\n");
  f.Put(1, "\n");
  EXPECT_THAT(f.lines, ElementsAre(Line{2, "other"}, Line{0, "hello"}, Line{1, ""}));
  f.Put(1, "tail");
  f.uart.Flush();
  EXPECT_EQ(f.lines.back(), (Line{1, "tail"}));
  EXPECT_EQ(f.uart.counters().lines, 4u);
}

TEST(ConsoleUart, RegistersBehaveLikeAnIdle16550) {
  UartFixture f;
  ConsoleUart& u = f.uart;
  const VcpuIndex v(0);
  EXPECT_EQ(u.Read(v, 5, 1), 0x60u) << "LSR: THR empty + transmitter empty";
  EXPECT_EQ(u.Read(v, 2, 1), 0x01u) << "IIR: no interrupt pending";
  u.Write(v, 2, 1, 0x07);  // FCR: FIFO enable
  EXPECT_EQ(u.Read(v, 2, 1), 0xC1u);
  EXPECT_EQ(u.Read(v, 0, 1), 0u) << "RBR: nothing received";
  // DLAB: offsets 0/1 become the divisor latch; a THR write would be a divisor write.
  u.Write(v, 3, 1, 0x83);
  u.Write(v, 0, 1, 0x0C);
  u.Write(v, 1, 1, 0x00);
  EXPECT_EQ(u.Read(v, 0, 1), 0x0Cu);
  u.Write(v, 3, 1, 0x03);
  EXPECT_EQ(u.Read(v, 3, 1), 0x03u);
  u.Write(v, 1, 1, 0xFF);
  EXPECT_EQ(u.Read(v, 1, 1), 0x0Fu) << "IER bits 3:0";
  u.Write(v, 7, 1, 0x5A);
  EXPECT_EQ(u.Read(v, 7, 1), 0x5Au);
  u.Write(v, 5, 1, 0);  // LSR write: ignored
  EXPECT_EQ(u.counters().ignored_writes, 1u);
  EXPECT_EQ(u.Read(v, 0, 2), 0xFFFFFFFFu);
  u.Write(v, 0, 4, 'x');
  EXPECT_EQ(u.counters().wide_accesses, 2u);
  EXPECT_TRUE(f.lines.empty());
  EXPECT_EQ(u.counters().characters, 0u);
}

TEST(ConsoleUart, LongLinesAreSplitAndBadVcpusCounted) {
  UartFixture f;
  f.Put(0, std::string(ConsoleUart::kMaxLine + 3, 'a') + "\n");
  ASSERT_EQ(f.lines.size(), 2u);
  EXPECT_EQ(f.lines[0].second.size(), ConsoleUart::kMaxLine);
  EXPECT_EQ(f.lines[1].second, "aaa");
  EXPECT_EQ(f.uart.counters().split_lines, 1u);
  f.uart.Write(VcpuIndex(3), 0, 1, 'x');
  EXPECT_EQ(f.uart.counters().bad_vcpus, 1u);
}

struct RecordingTarget : DoorbellTarget {
  struct Ring {
    NodeId node;
    Gsi gsi;
    irqchip::TriggerMode trigger;
    bool asserted, traced;
    RingTrain train;
  };
  std::vector<Ring> rings;
  absl::Status RaiseOnNode(NodeId node, Gsi gsi, irqchip::TriggerMode trigger, bool asserted, bool traced,
                           RingTrain train) override {
    if (node.value() > 3) return absl::InvalidArgumentError("no such node");
    rings.push_back({node, gsi, trigger, asserted, traced, train});
    return absl::OkStatus();
  }
};

TEST(Doorbell, OperatorRingsAreValidated) {
  RecordingTarget t;
  Doorbell d(&t);
  EXPECT_TRUE(d.Ring(NodeId(2), Gsi(5), irqchip::TriggerMode::kEdge, true).ok());
  EXPECT_TRUE(d.Ring(NodeId(2), Gsi(5), irqchip::TriggerMode::kLevel, false, true).ok());
  EXPECT_EQ(d.Ring(NodeId(2), Gsi(5), irqchip::TriggerMode::kEdge, false).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.Ring(NodeId(2), Gsi(4096), irqchip::TriggerMode::kEdge, true).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.Ring(NodeId(7), Gsi(5), irqchip::TriggerMode::kEdge, true).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_EQ(t.rings.size(), 2u);
  EXPECT_EQ(t.rings[1].trigger, irqchip::TriggerMode::kLevel);
  EXPECT_FALSE(t.rings[1].asserted);
  EXPECT_TRUE(t.rings[1].traced);
  EXPECT_EQ(d.counters().rings, 2u);
  EXPECT_EQ(d.counters().refused, 3u);
}

TEST(Doorbell, TrainsAreValidatedAndPassedOn) {
  RecordingTarget t;
  Doorbell d(&t);
  constexpr auto kEdge = irqchip::TriggerMode::kEdge;
  EXPECT_TRUE(d.Ring(NodeId(2), Gsi(5), kEdge, true, true, RingTrain{.count = 1000, .interval_us = 500}).ok());
  ASSERT_EQ(t.rings.size(), 1u);
  EXPECT_EQ(t.rings[0].train.count, 1000u);
  EXPECT_EQ(t.rings[0].train.interval_us, 500u);
  struct Bad {
    irqchip::TriggerMode trigger;
    RingTrain train;
    const char* says;
  };
  for (const Bad& b : {Bad{irqchip::TriggerMode::kLevel, {10, 100}, "edges only"}, Bad{kEdge, {0, 100}, "count 0"},
                       Bad{kEdge, {1'000'001, 100}, "count 1000001"}, Bad{kEdge, {10, 9}, "interval 9"},
                       Bad{kEdge, {10, 1'000'001}, "interval 1000001"}, Bad{kEdge, {1000, 1'000'000}, "1000 s"}}) {
    const absl::Status s = d.Ring(NodeId(2), Gsi(5), b.trigger, true, false, b.train);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << b.says;
    EXPECT_NE(s.message().find(b.says), std::string_view::npos) << s.message();
  }
  EXPECT_EQ(t.rings.size(), 1u) << "a refused train reached the node";
  EXPECT_EQ(d.counters().refused, 6u);
}

TEST(Doorbell, GuestRingsThroughPorts) {
  RecordingTarget t;
  Doorbell d(&t);
  const VcpuIndex v(0);
  d.Write(v, 0, 1, 0x03);  // NODE low byte
  d.Write(v, 1, 1, 0x00);  // NODE high byte
  d.Write(v, 2, 2, 9);     // GSI
  EXPECT_EQ(d.Read(v, 0, 2), 3u);
  EXPECT_EQ(d.Read(v, 2, 2), 9u);
  EXPECT_EQ(d.Read(v, 3, 1), 0u);
  d.Write(v, 4, 1, Doorbell::kRingLevel | Doorbell::kRingAssert);
  EXPECT_EQ(d.Read(v, 4, 1), 0u) << "last ring ok";
  d.Write(v, 4, 1, 0);  // an edge always asserts
  ASSERT_EQ(t.rings.size(), 2u);
  EXPECT_EQ(t.rings[0].node, NodeId(3));
  EXPECT_EQ(t.rings[0].gsi, Gsi(9));
  EXPECT_EQ(t.rings[0].trigger, irqchip::TriggerMode::kLevel);
  EXPECT_TRUE(t.rings[0].asserted);
  EXPECT_EQ(t.rings[1].trigger, irqchip::TriggerMode::kEdge);
  EXPECT_TRUE(t.rings[1].asserted);
  d.Write(v, 0, 2, 8);     // a node the target refuses
  d.Write(v, 4, 1, Doorbell::kRingAssert);
  EXPECT_EQ(d.Read(v, 4, 1), 1u) << "last ring refused";
  d.Write(v, 4, 1, 0x80);  // unknown RING bits
  d.Write(v, 6, 1, 1);     // reserved
  EXPECT_EQ(d.Read(v, 6, 1), 0u);
  EXPECT_EQ(d.Read(v, 4, 4), 0xFFFFFFFFu);
  EXPECT_EQ(d.counters().guest_rings, 2u);
  EXPECT_EQ(d.counters().ignored, 3u);
}

struct FakeDevice : PioDevice {
  uint16_t b, n;
  FakeDevice(uint16_t base, uint16_t size) : b(base), n(size) {}
  std::string_view name() const override { return "fake"; }
  uint16_t base() const override { return b; }
  uint16_t size() const override { return n; }
  uint32_t Read(VcpuIndex, uint16_t, uint8_t) override { return 0; }
  void Write(VcpuIndex, uint16_t, uint8_t, uint32_t) override {}
};

TEST(PioBus, FindsWindowsAndRefusesOverlaps) {
  PioBus bus;
  FakeDevice a(0x3F8, 8), b(0x400, 4), overlap(0x3FF, 2), wrap(0xFFFF, 2);
  ASSERT_TRUE(bus.Add(&a).ok());
  ASSERT_TRUE(bus.Add(&b).ok());
  EXPECT_FALSE(bus.Add(&overlap).ok());
  EXPECT_FALSE(bus.Add(&wrap).ok());
  uint16_t off = 0;
  EXPECT_EQ(bus.Find(0x3FD, 1, &off), &a);
  EXPECT_EQ(off, 5);
  EXPECT_EQ(bus.Find(0x3FE, 4, &off), nullptr) << "straddles the window's end";
  EXPECT_EQ(bus.Find(0x402, 2, &off), &b);
  EXPECT_EQ(bus.Find(0x404, 1, &off), nullptr);
}

}  // namespace
}  // namespace aggvm::master
