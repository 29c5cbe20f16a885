// The user irqchip's ICR routing with vCPUs on other nodes (UserIrqchip::SetRemote, the RemoteIpiSink contract),
// INIT / SIPI run state and priorities, without /dev/kvm: the guest's APIC register accesses are fed to the vCPU's
// hooks as the decoded exits KVM would produce (MsrWrite / MsrRead for x2APIC, MmioWrite for xAPIC), and the
// results are read back the same way (IRR words through the x2APIC MSRs 0x820..0x827).
#include <cstdint>
#include <vector>

#include <gtest/gtest.h>

#include "irqchip/apic_regs.h"
#include "irqchip/destination.h"
#include "tests/support/alloc_counter.h"
#include "vcpu/user_irqchip.h"

namespace aggvm::testing {
namespace {

using irqchip::ApicAddressing;
using irqchip::DeliveryMode;
using irqchip::InterruptMessage;
using vcpu::UserIrqchip;
using Disposition = vcpu::VcpuInterruptHooks::Disposition;

constexpr uint32_t kMsrApicBase = 0x1B;
constexpr uint32_t kMsrTpr = 0x808;
constexpr uint32_t kMsrSvr = 0x80F;
constexpr uint32_t kMsrIrr0 = 0x820;
constexpr uint32_t kMsrIcr = 0x830;
constexpr uint64_t kEnable = 1u << 11, kExtd = 1u << 10;
// ICR low bits (SDM vol. 3, 11.6.1).
constexpr uint32_t kLogical = 1u << 11;
constexpr uint32_t kAssert = 1u << 14;
constexpr uint32_t kLowest = 1u << 8, kNmi = 4u << 8, kInit = 5u << 8, kSipi = 6u << 8;
constexpr uint32_t kSelf = 1u << 18, kAllIncl = 2u << 18, kAllExcl = 3u << 18;

class RecordingSink final : public vcpu::RemoteIpiSink {
 public:
  RecordingSink() { got.reserve(512); }  // no allocation inside OnRemoteIcr
  void OnRemoteIcr(VcpuIndex source, const InterruptMessage& message) override { got.push_back({source, message}); }
  struct Entry {
    VcpuIndex source;
    InterruptMessage message;
  };
  std::vector<Entry> got;
};

void WrMsr(UserIrqchip& chip, uint32_t vcpu, uint32_t msr, uint64_t value) {
  uint8_t error = 0;
  vcpu::VcpuExit e = vcpu::MsrWrite{msr, vcpu::MsrExitReason::kInvalid, value, &error};
  EXPECT_EQ(chip.hooks(VcpuIndex(vcpu)).OnExit(e), Disposition::kHandled);
  EXPECT_EQ(error, 0) << "WRMSR " << std::hex << msr << " = " << value << " got #GP";
}

uint64_t RdMsr(UserIrqchip& chip, uint32_t vcpu, uint32_t msr) {
  __u64 data = 0;
  uint8_t error = 0;
  vcpu::VcpuExit e = vcpu::MsrRead{msr, vcpu::MsrExitReason::kInvalid, &data, &error};
  EXPECT_EQ(chip.hooks(VcpuIndex(vcpu)).OnExit(e), Disposition::kHandled);
  EXPECT_EQ(error, 0);
  return data;
}

void XapicWrite(UserIrqchip& chip, uint32_t vcpu, uint32_t offset, uint32_t value) {
  vcpu::VcpuExit e = vcpu::MmioWrite{GuestAddress(0xFEE00000 + offset),
                                     std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&value), 4)};
  EXPECT_EQ(chip.hooks(VcpuIndex(vcpu)).OnExit(e), Disposition::kHandled);
}

uint32_t XapicRead(UserIrqchip& chip, uint32_t vcpu, uint32_t offset) {
  uint32_t value = 0;
  vcpu::VcpuExit e =
      vcpu::MmioRead{GuestAddress(0xFEE00000 + offset), std::span<uint8_t>(reinterpret_cast<uint8_t*>(&value), 4)};
  EXPECT_EQ(chip.hooks(VcpuIndex(vcpu)).OnExit(e), Disposition::kHandled);
  return value;
}

bool XapicIrrHas(UserIrqchip& chip, uint32_t vcpu, uint8_t vector) {
  return ((XapicRead(chip, vcpu, 0x200 + (vector / 32) * 0x10) >> (vector % 32)) & 1) != 0;
}

bool IrrHas(UserIrqchip& chip, uint32_t vcpu, uint8_t vector) {
  return ((RdMsr(chip, vcpu, kMsrIrr0 + vector / 32) >> (vector % 32)) & 1) != 0;
}

// Guest side of "enable the APIC": x2APIC mode (or xAPIC) and SVR.enable, as a guest kernel does at boot.
void EnableApic(UserIrqchip& chip, uint32_t vcpu, bool x2apic) {
  const uint64_t base = RdMsr(chip, vcpu, kMsrApicBase);
  if (x2apic) {
    WrMsr(chip, vcpu, kMsrApicBase, base | kEnable | kExtd);
    WrMsr(chip, vcpu, kMsrSvr, 0x1FF);
  } else {
    XapicWrite(chip, vcpu, 0xF0, 0x1FF);  // SVR
    XapicWrite(chip, vcpu, 0xE0, 0xFFFFFFFF);  // DFR flat
  }
}

void SendX2(UserIrqchip& chip, uint32_t vcpu, uint32_t dest, uint32_t low) {
  WrMsr(chip, vcpu, kMsrIcr, (static_cast<uint64_t>(dest) << 32) | low);
}

ApicAddressing Remote(uint32_t id, bool x2apic) {
  ApicAddressing a;
  a.id = ApicId(id);
  a.x2apic = x2apic;
  return a;
}

// Local vCPUs: APIC IDs 0 and 1 (indices 0, 1). Remote: 2 and 3 (x2APIC), as on a second node. The guest runs
// x2APIC mode. IDs 16 and 17 are in x2APIC cluster 1.
class X2apicRoutingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const ApicAddressing remote[] = {Remote(2, true), Remote(3, true), Remote(17, true)};
    chip_.SetRemote(remote, &sink_);
    for (uint32_t i = 0; i < 3; ++i) EnableApic(chip_, i, true);
  }
  const ApicId ids_[3] = {ApicId(0), ApicId(1), ApicId(16)};
  UserIrqchip chip_{ids_, UserIrqchip::Options{}};
  RecordingSink sink_;
};

TEST_F(X2apicRoutingTest, PhysicalLocalStaysLocalRemoteGoesWholeToSink) {
  SendX2(chip_, 0, 1, 0x40);  // local ID 1
  EXPECT_TRUE(IrrHas(chip_, 1, 0x40));
  EXPECT_TRUE(sink_.got.empty());

  SendX2(chip_, 0, 2, 0x41);  // remote ID 2
  ASSERT_EQ(sink_.got.size(), 1u);
  EXPECT_EQ(sink_.got[0].source, VcpuIndex(0));
  EXPECT_EQ(sink_.got[0].message.source, ApicId(0));
  EXPECT_EQ(sink_.got[0].message.destination, 2u);
  EXPECT_EQ(sink_.got[0].message.vector, Vector(0x41));
  EXPECT_EQ(sink_.got[0].message.mode, DeliveryMode::kFixed);
  EXPECT_TRUE(sink_.got[0].message.x2apic_destination);
  for (uint32_t i = 0; i < 3; ++i) EXPECT_FALSE(IrrHas(chip_, i, 0x41)) << "vCPU " << i;

  SendX2(chip_, 1, 9, 0x42);  // no vCPU anywhere: local, undelivered
  EXPECT_EQ(sink_.got.size(), 1u);
  const vcpu::UserIrqchipCounters c = chip_.counters();
  EXPECT_EQ(c.ipis, 3u);
  EXPECT_EQ(c.remote_ipis, 1u);
  EXPECT_EQ(c.undelivered, 1u);
  EXPECT_EQ(c.remote_xapic_logical_refused, 0u);
}

TEST_F(X2apicRoutingTest, X2apicClusterLogicalSpanningNodesGoesToSink) {
  SendX2(chip_, 0, 0x0000'0002, kLogical | 0x50);  // cluster 0, bit 1: local ID 1 only
  EXPECT_TRUE(IrrHas(chip_, 1, 0x50));
  EXPECT_TRUE(sink_.got.empty());

  SendX2(chip_, 0, 0x0000'0006, kLogical | 0x51);  // cluster 0, bits 1 and 2: local 1 + remote 2
  ASSERT_EQ(sink_.got.size(), 1u);
  EXPECT_EQ(sink_.got[0].message.destination, 6u);
  EXPECT_FALSE(IrrHas(chip_, 1, 0x51)) << "delivered locally as well as sent to the sink";

  SendX2(chip_, 0, 0x0001'0001, kLogical | 0x52);  // cluster 1, bit 0: local ID 16 only
  EXPECT_TRUE(IrrHas(chip_, 2, 0x52));
  SendX2(chip_, 0, 0x0001'0002, kLogical | 0x53);  // cluster 1, bit 1: remote ID 17
  EXPECT_EQ(sink_.got.size(), 2u);
  EXPECT_FALSE(IrrHas(chip_, 2, 0x53));
  EXPECT_EQ(chip_.counters().remote_xapic_logical_refused, 0u);
}

TEST_F(X2apicRoutingTest, BroadcastAndShorthands) {
  SendX2(chip_, 1, 0xFFFFFFFF, 0x60);  // physical broadcast
  ASSERT_EQ(sink_.got.size(), 1u);
  EXPECT_FALSE(IrrHas(chip_, 0, 0x60));

  SendX2(chip_, 1, 0, kSelf | 0x61);  // self: local only, the sender
  EXPECT_TRUE(IrrHas(chip_, 1, 0x61));
  EXPECT_FALSE(IrrHas(chip_, 0, 0x61));
  EXPECT_EQ(sink_.got.size(), 1u);

  SendX2(chip_, 1, 0, kAllExcl | 0x62);  // all excluding self: remote vCPUs exist
  ASSERT_EQ(sink_.got.size(), 2u);
  EXPECT_EQ(sink_.got[1].message.shorthand, irqchip::Shorthand::kAllExcludingSelf);
  EXPECT_EQ(sink_.got[1].source, VcpuIndex(1));
  EXPECT_EQ(sink_.got[1].message.source, ApicId(1));
  EXPECT_FALSE(IrrHas(chip_, 0, 0x62));

  SendX2(chip_, 1, 0, kAllIncl | 0x63);  // all including self
  ASSERT_EQ(sink_.got.size(), 3u);
  EXPECT_FALSE(IrrHas(chip_, 1, 0x63)) << "the sender got it locally and from the master";
  EXPECT_EQ(chip_.counters().remote_ipis, 3u);
}

TEST_F(X2apicRoutingTest, LowestPriorityWithRemoteVcpusGoesToSink) {
  SendX2(chip_, 0, 1, kLowest | 0x70);  // physical, only a local candidate: still the master's arbitration
  ASSERT_EQ(sink_.got.size(), 1u);
  EXPECT_EQ(sink_.got[0].message.mode, DeliveryMode::kLowestPriority);
  EXPECT_FALSE(IrrHas(chip_, 1, 0x70));
  SendX2(chip_, 0, 0x0000'000F, kLogical | kLowest | 0x71);  // x2APIC logical over both nodes
  EXPECT_EQ(sink_.got.size(), 2u);
}

TEST_F(X2apicRoutingTest, NmiInitSipiToRemoteGoToSink) {
  SendX2(chip_, 0, 3, kNmi);
  SendX2(chip_, 0, 3, kInit | kAssert);
  SendX2(chip_, 0, 3, kSipi | 0x09);
  ASSERT_EQ(sink_.got.size(), 3u);
  EXPECT_EQ(sink_.got[0].message.mode, DeliveryMode::kNmi);
  EXPECT_EQ(sink_.got[1].message.mode, DeliveryMode::kInit);
  EXPECT_EQ(sink_.got[2].message.mode, DeliveryMode::kStartup);
  EXPECT_EQ(sink_.got[2].message.vector, Vector(0x09));
  EXPECT_EQ(chip_.counters().inits, 0u) << "a remote INIT was applied here";
}

// x2APIC physical destinations above 255 name nobody here: not APIC ID 1 / 2 by their low byte, not the sink.
TEST_F(X2apicRoutingTest, PhysicalIdsAbove255MatchNobody) {
  SendX2(chip_, 0, 0x101, 0x40);         // low byte = local ID 1
  SendX2(chip_, 0, 0x102, 0x41);         // low byte = remote ID 2
  SendX2(chip_, 0, 0x8000'0001, kNmi);   // high bit set
  EXPECT_FALSE(IrrHas(chip_, 1, 0x40));
  EXPECT_TRUE(sink_.got.empty());
  const vcpu::UserIrqchipCounters c = chip_.counters();
  EXPECT_EQ(c.undelivered, 3u);
  EXPECT_EQ(c.remote_ipis, 0u);
}

TEST_F(X2apicRoutingTest, RoutingAllocatesNothing) {
  SendX2(chip_, 0, 1, 0x40);  // warm-up
  const uint64_t before = ThreadAllocations();
  for (int i = 0; i < 100; ++i) {
    SendX2(chip_, 0, 1, 0x40);                      // local
    SendX2(chip_, 0, 2, 0x41);                      // remote
    SendX2(chip_, 0, 0x0000'0006, kLogical | 0x42);  // logical spanning
  }
  EXPECT_EQ(ThreadAllocations(), before);
  EXPECT_EQ(sink_.got.size(), 200u);
}

// Messages the master routed here come in through Deliver: never to the sink, delivered to local APICs only.
TEST_F(X2apicRoutingTest, DeliverFromOutsideIsLocalOnly) {
  InterruptMessage m;
  m.x2apic_destination = true;
  m.vector = Vector(0x80);
  m.shorthand = irqchip::Shorthand::kAllIncludingSelf;
  m.source = ApicId(2);  // a remote sender
  EXPECT_EQ(chip_.Deliver(m), 3u);
  EXPECT_TRUE(sink_.got.empty());

  InterruptMessage lp;  // lowest priority the master decided, sent as fixed to the winner
  lp.x2apic_destination = true;
  lp.vector = Vector(0x81);
  lp.destination = 16;
  EXPECT_EQ(chip_.Deliver(lp), 1u);
  EXPECT_TRUE(IrrHas(chip_, 2, 0x81));

  InterruptMessage nmi;
  nmi.mode = DeliveryMode::kNmi;
  nmi.destination = 1;
  nmi.x2apic_destination = true;
  EXPECT_EQ(chip_.Deliver(nmi), 1u);
  EXPECT_TRUE(sink_.got.empty());
}

TEST_F(X2apicRoutingTest, InitAndSipiRunState) {
  InterruptMessage init;
  init.mode = DeliveryMode::kInit;
  init.destination = 1;
  init.x2apic_destination = true;
  EXPECT_FALSE(chip_.WaitingForSipi(VcpuIndex(1)));
  WrMsr(chip_, 1, kMsrTpr, 0x30);
  EXPECT_EQ(chip_.Deliver(init), 1u);
  EXPECT_TRUE(chip_.WaitingForSipi(VcpuIndex(1)));
  EXPECT_FALSE(chip_.WaitingForSipi(VcpuIndex(0)));
  // INIT reset the APIC (SDM 11.4.7.3): TPR 0, software-disabled (a fixed interrupt is refused), ID kept (a
  // physical SIPI to it below still matches).
  EXPECT_EQ(chip_.Priority(VcpuIndex(1)), 0);
  InterruptMessage fixed = init;
  fixed.mode = DeliveryMode::kFixed;
  fixed.vector = Vector(0x90);
  EXPECT_EQ(chip_.Deliver(fixed), 0u);

  InterruptMessage sipi = init;
  sipi.mode = DeliveryMode::kStartup;
  sipi.vector = Vector(0x10);
  EXPECT_EQ(chip_.Deliver(sipi), 1u);
  EXPECT_FALSE(chip_.WaitingForSipi(VcpuIndex(1)));
  sipi.destination = 0;  // running vCPU 0: ignored
  EXPECT_EQ(chip_.Deliver(sipi), 0u);
  const vcpu::UserIrqchipCounters c = chip_.counters();
  EXPECT_EQ(c.inits, 1u);
  EXPECT_EQ(c.sipis, 1u);
  EXPECT_EQ(c.sipis_ignored, 1u);
  EXPECT_EQ(c.unsupported_events, 0u);

  // INIT level de-assert (SDM 11.6.1) changes nothing: vCPU 1, started by the SIPI above, is not put back into
  // WaitForSipi (a real INIT would).
  init.trigger = irqchip::TriggerMode::kLevel;
  init.level = false;
  EXPECT_EQ(chip_.Deliver(init), 0u);
  EXPECT_FALSE(chip_.WaitingForSipi(VcpuIndex(1)));
  EXPECT_EQ(chip_.counters().inits, 1u);
}

// The guest's ICR sends of INIT level de-assert (Linux sends one after every INIT of its AP bring-up) go nowhere:
// not applied locally, and not to the sink — the master's delivery has no level bit, so the remote node would apply
// a forwarded de-assert as a real INIT.
TEST_F(X2apicRoutingTest, InitLevelDeassertIsNotRouted) {
  constexpr uint32_t kTriggerLevel = 1u << 15;
  SendX2(chip_, 0, 3, kInit | kTriggerLevel);             // remote physical
  SendX2(chip_, 0, 1, kInit | kTriggerLevel);             // local physical
  SendX2(chip_, 0, 0, kInit | kTriggerLevel | kAllExcl);  // every other vCPU, both nodes
  EXPECT_TRUE(sink_.got.empty()) << "a de-assert was forwarded, mode " << static_cast<int>(sink_.got[0].message.mode);
  EXPECT_FALSE(chip_.WaitingForSipi(VcpuIndex(1)));
  EXPECT_FALSE(chip_.WaitingForSipi(VcpuIndex(2)));
  const vcpu::UserIrqchipCounters c = chip_.counters();
  EXPECT_EQ(c.init_deasserts, 3u);
  EXPECT_EQ(c.inits, 0u);
  EXPECT_EQ(c.remote_ipis, 0u);
  EXPECT_EQ(c.undelivered, 0u);
  // The assert form still goes to the sink (NmiInitSipiToRemoteGoToSink) and resets a local AP.
  SendX2(chip_, 0, 1, kInit | kTriggerLevel | kAssert);
  EXPECT_TRUE(chip_.WaitingForSipi(VcpuIndex(1)));
  EXPECT_EQ(chip_.counters().inits, 1u);
}

TEST_F(X2apicRoutingTest, PriorityIsPpr) {
  EXPECT_EQ(chip_.Priority(VcpuIndex(0)), 0);
  WrMsr(chip_, 1, kMsrTpr, 0x5A);
  EXPECT_EQ(chip_.Priority(VcpuIndex(1)), 0x5A);  // nothing in service: PPR = TPR (SDM 11.8.3.1)
  WrMsr(chip_, 2, kMsrTpr, 0xC0);
  EXPECT_EQ(chip_.Priority(VcpuIndex(2)), 0xC0);
  EXPECT_EQ(chip_.Priority(VcpuIndex(0)), 0);
}

// Without remote vCPUs nothing changes: lowest priority is arbitrated locally, broadcasts stay local.
TEST(UserIrqchipNoRemote, EverythingLocal) {
  const ApicId ids[] = {ApicId(0), ApicId(1)};
  UserIrqchip chip(ids, UserIrqchip::Options{});
  for (uint32_t i = 0; i < 2; ++i) EnableApic(chip, i, true);
  WrMsr(chip, 0, kMsrTpr, 0x80);
  SendX2(chip, 0, 0xFFFFFFFF, kLowest | 0x40);
  EXPECT_FALSE(IrrHas(chip, 0, 0x40));
  EXPECT_TRUE(IrrHas(chip, 1, 0x40)) << "lowest priority did not pick the vCPU with the lower TPR";
  SendX2(chip, 1, 0, kAllExcl | 0x41);
  EXPECT_TRUE(IrrHas(chip, 0, 0x41));
  const vcpu::UserIrqchipCounters c = chip.counters();
  EXPECT_EQ(c.remote_ipis, 0u);
  EXPECT_EQ(c.remote_without_sink, 0u);
}

// xAPIC logical mode across nodes is refused: the remote LDR / DFR are unknown here.
TEST(UserIrqchipXapicRemote, LogicalRefusedPhysicalAndBroadcastForwarded) {
  const ApicId ids[] = {ApicId(0), ApicId(1)};
  UserIrqchip chip(ids, UserIrqchip::Options{});
  const ApicAddressing remote[] = {Remote(2, false)};
  RecordingSink sink;
  chip.SetRemote(remote, &sink);
  for (uint32_t i = 0; i < 2; ++i) EnableApic(chip, i, false);
  XapicWrite(chip, 1, 0xD0, 0x01000000);  // vCPU 1: LDR logical ID 0x01 (flat)

  XapicWrite(chip, 0, 0x310, 0x01000000);  // destination 0x01
  XapicWrite(chip, 0, 0x300, kLogical | 0x40);
  EXPECT_TRUE(sink.got.empty());
  EXPECT_FALSE(XapicIrrHas(chip, 1, 0x40)) << "xAPIC logical delivered locally although a remote vCPU may match";
  EXPECT_EQ(chip.counters().remote_xapic_logical_refused, 1u);

  XapicWrite(chip, 0, 0x310, 0x02000000);  // physical ID 2 (remote)
  XapicWrite(chip, 0, 0x300, 0x41);
  ASSERT_EQ(sink.got.size(), 1u);
  EXPECT_EQ(sink.got[0].message.destination, 2u);
  EXPECT_FALSE(sink.got[0].message.x2apic_destination);

  XapicWrite(chip, 0, 0x310, 0x01000000);  // physical ID 1 (local)
  XapicWrite(chip, 0, 0x300, 0x42);
  EXPECT_TRUE(XapicIrrHas(chip, 1, 0x42));

  XapicWrite(chip, 0, 0x310, 0xFF000000);  // logical broadcast names everyone: no LDR needed
  XapicWrite(chip, 0, 0x300, kLogical | 0x43);
  EXPECT_EQ(sink.got.size(), 2u);
  EXPECT_EQ(chip.counters().remote_xapic_logical_refused, 1u);
  EXPECT_EQ(chip.counters().remote_ipis, 2u);
}

// The agent's entry point for routed messages, whatever the irqchip mode: user mode takes every delivery mode.
TEST_F(X2apicRoutingTest, UserInjectorDeliversSipiAndReportsRefusal) {
  vcpu::UserIrqchipInjector injector(chip_);
  vcpu::InterruptInjector& i = injector;
  InterruptMessage m;
  m.x2apic_destination = true;
  m.destination = 16;
  m.mode = DeliveryMode::kInit;
  ASSERT_TRUE(i.Deliver(m).ok());
  EXPECT_TRUE(chip_.WaitingForSipi(VcpuIndex(2)));
  m.mode = DeliveryMode::kStartup;
  m.vector = Vector(0x9A);
  ASSERT_TRUE(i.Deliver(m).ok());
  EXPECT_FALSE(chip_.WaitingForSipi(VcpuIndex(2)));
  EXPECT_EQ(i.Deliver(m).code(), absl::StatusCode::kUnavailable) << "second SIPI: ignored";
  m.mode = DeliveryMode::kFixed;
  m.destination = 5;  // no such vCPU here
  EXPECT_EQ(i.Deliver(m).code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(sink_.got.empty());
}

// The default InterruptInjector::Deliver (kernel mode) goes through InjectMsi; SIPI and shorthands cannot.
class MsiRecorder final : public vcpu::InterruptInjector {
 public:
  absl::Status InjectMsi(const vcpu::MsiMessage& msi) override {
    got.push_back(msi);
    return absl::OkStatus();
  }
  std::vector<vcpu::MsiMessage> got;
};

TEST(InterruptInjectorDefault, DeliverEncodesMsiRefusesSipi) {
  MsiRecorder r;
  InterruptMessage m;
  m.mode = DeliveryMode::kNmi;
  m.destination = 0x1234;
  m.x2apic_destination = true;
  ASSERT_TRUE(r.Deliver(m).ok());
  ASSERT_EQ(r.got.size(), 1u);
  EXPECT_EQ(r.got[0].address_lo, 0xFEE34000u);  // destination bits 7:0 in 19:12, physical
  EXPECT_EQ(r.got[0].address_hi, 0x1200u);      // bits 31:8 (KVM_X2APIC_API_USE_32BIT_IDS)
  EXPECT_EQ((r.got[0].data >> 8) & 7, 4u);      // NMI
  m.mode = DeliveryMode::kStartup;
  EXPECT_EQ(r.Deliver(m).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.got.size(), 1u);
}

// KVM's x2APIC MSI convention (vcpu/msi.h: destination bits 31:8 in address_hi bits 31:8) reaches APIC IDs > 255.
TEST(UserIrqchipMsi, X2apicDestinationAbove255) {
  const ApicId ids[] = {ApicId(0x34), ApicId(0x1234)};
  UserIrqchip chip(ids, UserIrqchip::Options{});
  for (uint32_t i = 0; i < 2; ++i) EnableApic(chip, i, true);
  ASSERT_TRUE(chip.InjectMsi(vcpu::FixedMsi(ApicId(0x1234), Vector(0x45))).ok());
  EXPECT_TRUE(IrrHas(chip, 1, 0x45));
  EXPECT_FALSE(IrrHas(chip, 0, 0x45));
  ASSERT_TRUE(chip.InjectMsi(vcpu::FixedMsi(ApicId(0x34), Vector(0x46))).ok());
  EXPECT_TRUE(IrrHas(chip, 0, 0x46));
  EXPECT_FALSE(IrrHas(chip, 1, 0x46));
}

// Remote vCPUs declared but no sink: sends that name them are dropped and counted, never delivered half.
TEST(UserIrqchipRemoteWithoutSink, DroppedAndCounted) {
  const ApicId ids[] = {ApicId(0)};
  UserIrqchip chip(ids, UserIrqchip::Options{});
  const ApicAddressing remote[] = {Remote(1, true)};
  chip.SetRemote(remote, nullptr);
  EnableApic(chip, 0, true);
  SendX2(chip, 0, 1, 0x40);
  SendX2(chip, 0, 0, kAllIncl | 0x41);
  EXPECT_FALSE(IrrHas(chip, 0, 0x41));
  EXPECT_EQ(chip.counters().remote_without_sink, 2u);
}

}  // namespace
}  // namespace aggvm::testing
