// Unit and property tests of LocalApic. Each test names the Intel SDM vol. 3 section it checks.
#include "irqchip/local_apic.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace aggvm::irqchip {
namespace {

using namespace apic;  // NOLINT

class RecordingSink : public ApicSink {
 public:
  void SendIpi(const InterruptMessage& msg) override { ipis.push_back(msg); }
  void EoiBroadcast(Vector v) override { eois.push_back(v.value()); }
  void InterruptPending() override { ++kicks; }
  std::vector<InterruptMessage> ipis;
  std::vector<uint8_t> eois;
  int kicks = 0;
};

class FakeClock : public ApicClock {
 public:
  uint64_t NowNs() const override { return now; }
  uint64_t now = 1'000'000'000;
};

constexpr uint64_t kXApicBase = kDefaultApicBaseAddress | kApicBaseEnable;
constexpr uint64_t kX2ApicBase = kXApicBase | kApicBaseExtd;

InterruptMessage Fixed(uint8_t v, TriggerMode t = TriggerMode::kEdge) {
  InterruptMessage m;
  m.vector = Vector(v);
  m.trigger = t;
  return m;
}
InterruptMessage OfMode(DeliveryMode mode, uint8_t v = 0) {
  InterruptMessage m;
  m.mode = mode;
  m.vector = Vector(v);
  return m;
}

class LocalApicTest : public ::testing::Test {
 protected:
  LocalApicTest() : apic_(MakeConfig(), sink_, clock_) {}
  static LocalApic::Config MakeConfig() {
    LocalApic::Config c;
    c.initial_id = ApicId(0x35);
    return c;
  }
  void SoftwareEnable() { ASSERT_EQ(apic_.WriteMmio(kRegSvr, kSvrEnable | 0xFF), AccessResult::kOk); }
  void ToX2Apic() { ASSERT_EQ(apic_.SetApicBase(kX2ApicBase), AccessResult::kOk); }
  uint32_t ReadEsr() {  // SDM 11.5.3: write before read
    EXPECT_EQ(apic_.WriteMmio(kRegEsr, 0), AccessResult::kOk);
    return apic_.ReadMmio(kRegEsr);
  }

  RecordingSink sink_;
  FakeClock clock_;
  LocalApic apic_;
};

// ---- Register file ----

TEST_F(LocalApicTest, PowerUpState_SDM_11_4_7_1) {
  EXPECT_EQ(apic_.mode(), ApicMode::kXApic);
  EXPECT_EQ(apic_.ReadMmio(kRegId), 0x35u << 24);
  EXPECT_EQ(apic_.ReadMmio(kRegSvr), 0xFFu);
  EXPECT_EQ(apic_.ReadMmio(kRegDfr), 0xFFFFFFFFu);
  EXPECT_EQ(apic_.ReadMmio(kRegTpr), 0u);
  EXPECT_EQ(apic_.ReadMmio(kRegLdr), 0u);
  for (uint32_t off : {kRegLvtTimer, kRegLvtThermal, kRegLvtPmc, kRegLvtLint0, kRegLvtLint1, kRegLvtError,
                       kRegLvtCmci}) {
    EXPECT_EQ(apic_.ReadMmio(off), kLvtMasked) << std::hex << off;
  }
  // Version (11.4.8): integrated APIC 0x14, 7 LVT entries (max index 6), EOI-broadcast suppression supported.
  EXPECT_EQ(apic_.ReadMmio(kRegVersion), 0x14u | (6u << 16) | (1u << 24));
  EXPECT_EQ(apic_.counters().reserved_accesses, 0u);
}

TEST_F(LocalApicTest, XApicIdIsWritableX2ApicIdIsReadOnly_SDM_11_4_6_and_11_12_5_1) {
  EXPECT_EQ(apic_.WriteMmio(kRegId, 0x07u << 24), AccessResult::kOk);
  EXPECT_EQ(apic_.id(), ApicId(7));
  ToX2Apic();
  // xAPIC -> x2APIC: the ID becomes the initial x2APIC ID again.
  EXPECT_EQ(apic_.ReadMsr(X2ApicMsr(kRegId)).value, 0x35u);
  EXPECT_EQ(apic_.WriteMsr(X2ApicMsr(kRegId), 9), AccessResult::kGeneralProtection);
  EXPECT_EQ(apic_.id(), ApicId(0x35));
  EXPECT_EQ(apic_.counters().readonly_writes, 1u);
}

TEST_F(LocalApicTest, ReadOnlyWritesIgnoredAndCounted_SDM_11_4_1_Table_11_1) {
  apic_.Accept(Fixed(0x40));  // software-disabled: dropped, IRR stays 0
  SoftwareEnable();
  ASSERT_EQ(apic_.Accept(Fixed(0x40)), AcceptResult::kAccepted);
  const uint32_t irr_word = apic_.ReadMmio(kRegIrr + 0x20);
  ASSERT_EQ(irr_word, 1u);  // vector 0x40 = word 2, bit 0
  uint64_t expected = 0;
  for (uint32_t off : {kRegVersion, kRegPpr, kRegApr, kRegRrd, kRegIsr, kRegTmr + 0x70, kRegIrr + 0x20,
                       kRegTimerCurrent}) {
    EXPECT_EQ(apic_.WriteMmio(off, 0xFFFFFFFF), AccessResult::kIgnored) << std::hex << off;
    EXPECT_EQ(apic_.counters().readonly_writes, ++expected);
  }
  EXPECT_EQ(apic_.ReadMmio(kRegIrr + 0x20), irr_word);
  EXPECT_EQ(apic_.ReadMmio(kRegIsr), 0u);
  EXPECT_EQ(apic_.ReadMmio(kRegVersion) & 0xFF, 0x14u);
  EXPECT_EQ(apic_.ReadMmio(kRegPpr), 0u);
  EXPECT_EQ(ReadEsr(), 0u);  // read-only registers are not "reserved": no ESR bit
}

TEST_F(LocalApicTest, ReservedOffsetsCountedAndSetIllegalRegisterAddress_SDM_11_5_3) {
  for (uint32_t off : {0x000u, 0x010u, 0x040u, 0x290u, 0x3A0u, kRegSelfIpi /* x2APIC only */, 0x404u, 0x024u}) {
    EXPECT_EQ(apic_.WriteMmio(off, 1), AccessResult::kIgnored) << std::hex << off;
  }
  EXPECT_EQ(apic_.ReadMmio(0x050), 0u);
  EXPECT_EQ(apic_.counters().reserved_accesses, 9u);
  EXPECT_EQ(ReadEsr(), kEsrIllegalRegister);
  EXPECT_EQ(ReadEsr(), 0u);
}

TEST_F(LocalApicTest, ReservedBitsDroppedAndCounted_SDM_11_5_1_Figure_11_8) {
  SoftwareEnable();
  // LINT0: every writable bit plus reserved bits 31:17 and the read-only remote IRR.
  EXPECT_EQ(apic_.WriteMmio(kRegLvtLint0, 0xFFFFFFFF), AccessResult::kOk);
  EXPECT_EQ(apic_.ReadMmio(kRegLvtLint0), kLvtWritableLint);
  EXPECT_EQ(apic_.counters().reserved_bits_ignored, 1u);
  // Error LVT has no delivery mode field.
  apic_.WriteMmio(kRegLvtError, 0x7FE);
  EXPECT_EQ(apic_.ReadMmio(kRegLvtError), 0xFEu);
  EXPECT_EQ(apic_.counters().reserved_bits_ignored, 2u);
  // Writing back a read value with the delivery status bit is not counted.
  apic_.WriteMmio(kRegLvtThermal, 0x10000 | kLvtDeliveryPending | 0x30);
  EXPECT_EQ(apic_.ReadMmio(kRegLvtThermal), 0x10030u);
  EXPECT_EQ(apic_.counters().reserved_bits_ignored, 2u);
  // DFR bits 27:0 read as ones; LDR bits 23:0 are reserved.
  apic_.WriteMmio(kRegDfr, 0x0);
  EXPECT_EQ(apic_.ReadMmio(kRegDfr), 0x0FFFFFFFu);
  apic_.WriteMmio(kRegLdr, 0x12345678);
  EXPECT_EQ(apic_.ReadMmio(kRegLdr), 0x12000000u);
  EXPECT_EQ(apic_.counters().reserved_bits_ignored, 4u);
}

TEST_F(LocalApicTest, X2ApicMsrAccessRules_SDM_11_12_1_2) {
  // x2APIC MSRs #GP in xAPIC mode.
  EXPECT_EQ(apic_.ReadMsr(X2ApicMsr(kRegTpr)).result, AccessResult::kGeneralProtection);
  EXPECT_EQ(apic_.WriteMsr(X2ApicMsr(kRegTpr), 0), AccessResult::kGeneralProtection);
  ToX2Apic();
  // The MMIO page is gone.
  EXPECT_EQ(apic_.WriteMmio(kRegTpr, 0x20), AccessResult::kIgnored);
  EXPECT_EQ(apic_.ReadMsr(X2ApicMsr(kRegTpr)).value, 0u);
  EXPECT_EQ(apic_.WriteMsr(X2ApicMsr(kRegTpr), 0x20), AccessResult::kOk);
  EXPECT_EQ(apic_.tpr(), 0x20);
  const uint64_t gp_before = apic_.counters().gp_faults;
  // Registers absent in x2APIC mode: DFR, APR, RRD, ICR high half (11.12.1.2, table 11-6).
  for (uint32_t off : {kRegDfr, kRegApr, kRegRrd, kRegIcrHigh, 0x290u}) {
    EXPECT_EQ(apic_.ReadMsr(X2ApicMsr(off)).result, AccessResult::kGeneralProtection) << std::hex << off;
    EXPECT_EQ(apic_.WriteMsr(X2ApicMsr(off), 0), AccessResult::kGeneralProtection) << std::hex << off;
  }
  // Read-only registers, including LDR (derived from the ID in x2APIC mode).
  for (uint32_t off : {kRegId, kRegVersion, kRegPpr, kRegLdr, kRegIsr, kRegTimerCurrent}) {
    EXPECT_EQ(apic_.WriteMsr(X2ApicMsr(off), 0), AccessResult::kGeneralProtection) << std::hex << off;
  }
  // Write-only registers.
  EXPECT_EQ(apic_.ReadMsr(X2ApicMsr(kRegEoi)).result, AccessResult::kGeneralProtection);
  EXPECT_EQ(apic_.ReadMsr(X2ApicMsr(kRegSelfIpi)).result, AccessResult::kGeneralProtection);
  // Non-zero writes to EOI and ESR, and set upper halves of 32-bit registers.
  EXPECT_EQ(apic_.WriteMsr(X2ApicMsr(kRegEoi), 1), AccessResult::kGeneralProtection);
  EXPECT_EQ(apic_.WriteMsr(X2ApicMsr(kRegEsr), 1), AccessResult::kGeneralProtection);
  EXPECT_EQ(apic_.WriteMsr(X2ApicMsr(kRegTpr), 1ull << 32), AccessResult::kGeneralProtection);
  EXPECT_EQ(apic_.tpr(), 0x20);
  EXPECT_EQ(apic_.counters().gp_faults - gp_before, 10u + 6u + 2u + 3u);
  EXPECT_EQ(apic_.counters().readonly_writes, 6u);
  EXPECT_EQ(apic_.counters().writeonly_reads, 2u);
  // Not an APIC MSR at all.
  EXPECT_EQ(apic_.ReadMsr(0x10).result, AccessResult::kGeneralProtection);
}

TEST_F(LocalApicTest, X2ApicLdrDerivedFromId_SDM_11_12_10_2) {
  ToX2Apic();
  // ID 0x35: cluster 0x35 >> 4 = 3, logical bit 1 << 5.
  EXPECT_EQ(apic_.ReadMsr(X2ApicMsr(kRegLdr)).value, (3u << 16) | (1u << 5));
  EXPECT_EQ(apic_.addressing().ldr, (3u << 16) | (1u << 5));
  EXPECT_TRUE(apic_.addressing().x2apic);
}

// ---- IA32_APIC_BASE (11.12.5) ----

TEST_F(LocalApicTest, ApicBaseLegalTransitions_SDM_11_12_5) {
  SoftwareEnable();
  apic_.WriteMmio(kRegTpr, 0x30);
  EXPECT_EQ(apic_.WriteMsr(kMsrApicBase, kX2ApicBase), AccessResult::kOk);  // xAPIC -> x2APIC keeps state
  EXPECT_EQ(apic_.mode(), ApicMode::kX2Apic);
  EXPECT_EQ(apic_.tpr(), 0x30);
  EXPECT_EQ(apic_.SetApicBase(kDefaultApicBaseAddress), AccessResult::kOk);  // x2APIC -> disabled
  EXPECT_EQ(apic_.mode(), ApicMode::kDisabled);
  // SDM 11.4.3: disabling loses the register state.
  EXPECT_EQ(apic_.tpr(), 0);
  EXPECT_EQ(apic_.svr(), 0xFFu);
  // A disabled APIC accepts nothing and has no MMIO page.
  EXPECT_EQ(apic_.Accept(OfMode(DeliveryMode::kNmi)), AcceptResult::kDisabled);
  EXPECT_EQ(apic_.WriteMmio(kRegTpr, 0x10), AccessResult::kIgnored);
  EXPECT_EQ(apic_.SetApicBase(kXApicBase), AccessResult::kOk);  // disabled -> xAPIC
  EXPECT_EQ(apic_.mode(), ApicMode::kXApic);
  EXPECT_EQ(apic_.ReadMmio(kRegId), 0x35u << 24);
  // Relocating the xAPIC page is a same-mode write.
  EXPECT_EQ(apic_.SetApicBase(0xFEC00000 | kApicBaseEnable), AccessResult::kOk);
  EXPECT_EQ(apic_.ReadMsr(kMsrApicBase).value, 0xFEC00000 | kApicBaseEnable);
  EXPECT_EQ(apic_.counters().illegal_apic_base, 0u);
}

TEST_F(LocalApicTest, ApicBaseIllegalTransitionsAreGp_SDM_11_12_5) {
  ToX2Apic();
  EXPECT_EQ(apic_.SetApicBase(kXApicBase), AccessResult::kGeneralProtection);  // x2APIC -> xAPIC
  EXPECT_EQ(apic_.mode(), ApicMode::kX2Apic);
  ASSERT_EQ(apic_.SetApicBase(kDefaultApicBaseAddress), AccessResult::kOk);
  EXPECT_EQ(apic_.SetApicBase(kX2ApicBase), AccessResult::kGeneralProtection);  // disabled -> x2APIC
  EXPECT_EQ(apic_.SetApicBase(kDefaultApicBaseAddress | kApicBaseExtd),
            AccessResult::kGeneralProtection);  // EN=0, EXTD=1: invalid
  EXPECT_EQ(apic_.mode(), ApicMode::kDisabled);
  ASSERT_EQ(apic_.SetApicBase(kXApicBase), AccessResult::kOk);
  EXPECT_EQ(apic_.SetApicBase(kXApicBase | 0x1), AccessResult::kGeneralProtection);          // bits 7:0
  EXPECT_EQ(apic_.SetApicBase(kXApicBase | (1ull << 9)), AccessResult::kGeneralProtection);  // bit 9
  EXPECT_EQ(apic_.SetApicBase(kXApicBase | (1ull << 46)), AccessResult::kGeneralProtection);  // > MAXPHYADDR
  EXPECT_EQ(apic_.counters().illegal_apic_base, 6u);
  EXPECT_EQ(apic_.apic_base(), kXApicBase);
}

TEST(LocalApicConfigTest, X2ApicEnableIsReservedWithoutSupport_SDM_11_12_1) {
  RecordingSink sink;
  FakeClock clock;
  LocalApic::Config c;
  c.x2apic_supported = false;
  LocalApic apic(c, sink, clock);
  EXPECT_EQ(apic.SetApicBase(kX2ApicBase), AccessResult::kGeneralProtection);
  EXPECT_EQ(apic.mode(), ApicMode::kXApic);
}

// ---- Acceptance (11.6.1, 11.8.4) ----

TEST_F(LocalApicTest, FixedSetsIrrAndTmrPerTrigger_SDM_11_8_4) {
  SoftwareEnable();
  EXPECT_EQ(apic_.Accept(Fixed(0x41, TriggerMode::kLevel)), AcceptResult::kAccepted);
  EXPECT_EQ(apic_.Accept(Fixed(0x42)), AcceptResult::kAccepted);
  InterruptMessage lp = Fixed(0x43);
  lp.mode = DeliveryMode::kLowestPriority;
  EXPECT_EQ(apic_.Accept(lp), AcceptResult::kAccepted);
  EXPECT_EQ(apic_.ReadMmio(kRegIrr + 0x20), 0b1110u);
  EXPECT_EQ(apic_.ReadMmio(kRegTmr + 0x20), 0b0010u);
  EXPECT_EQ(apic_.Accept(Fixed(0x42)), AcceptResult::kCoalesced);
  EXPECT_EQ(apic_.counters().coalesced, 1u);
  EXPECT_GE(sink_.kicks, 1);
}

TEST_F(LocalApicTest, SoftwareDisabledDropsFixedButTakesNmiInitSipi_SDM_11_4_7_2) {
  EXPECT_FALSE(apic_.software_enabled());
  EXPECT_EQ(apic_.Accept(Fixed(0x40)), AcceptResult::kDisabled);
  EXPECT_TRUE(apic_.irr().Empty());
  EXPECT_EQ(apic_.Accept(OfMode(DeliveryMode::kNmi)), AcceptResult::kAccepted);
  EXPECT_EQ(apic_.Accept(OfMode(DeliveryMode::kInit)), AcceptResult::kAccepted);
  EXPECT_EQ(apic_.Accept(OfMode(DeliveryMode::kStartup, 0x9A)), AcceptResult::kAccepted);
  EXPECT_TRUE(apic_.TakeNmi());
  EXPECT_TRUE(apic_.TakeInit());
  EXPECT_EQ(apic_.TakeSipi(), Vector(0x9A));
  EXPECT_EQ(apic_.counters().dropped_disabled, 1u);
}

TEST_F(LocalApicTest, NonVectoredModesLatchUntilTaken_SDM_11_6_1) {
  SoftwareEnable();
  EXPECT_EQ(apic_.Accept(OfMode(DeliveryMode::kSmi)), AcceptResult::kAccepted);
  EXPECT_EQ(apic_.Accept(OfMode(DeliveryMode::kExtInt)), AcceptResult::kAccepted);
  EXPECT_EQ(apic_.Accept(OfMode(DeliveryMode::kNmi, 3 /* vector ignored */)), AcceptResult::kAccepted);
  EXPECT_TRUE(apic_.TakeSmi());
  EXPECT_FALSE(apic_.TakeSmi());
  EXPECT_TRUE(apic_.TakeExtInt());
  EXPECT_TRUE(apic_.TakeNmi());
  EXPECT_FALSE(apic_.TakeNmi());
  EXPECT_FALSE(apic_.TakeInit());
  EXPECT_FALSE(apic_.TakeSipi().has_value());
  // INIT level de-assert only synchronizes arbitration IDs: not an INIT.
  InterruptMessage deassert = OfMode(DeliveryMode::kInit);
  deassert.trigger = TriggerMode::kLevel;
  deassert.level = false;
  EXPECT_EQ(apic_.Accept(deassert), AcceptResult::kIgnored);
  EXPECT_FALSE(apic_.TakeInit());
  EXPECT_EQ(ReadEsr(), 0u);  // an NMI with vector 3 is not an illegal vector
}

TEST_F(LocalApicTest, IllegalReceivedVectorSetsEsrWithWriteBeforeRead_SDM_11_5_3) {
  SoftwareEnable();
  for (uint8_t v : {0, 1, 15}) EXPECT_EQ(apic_.Accept(Fixed(v)), AcceptResult::kIllegalVector);
  EXPECT_TRUE(apic_.irr().Empty());
  // Without a write the ESR still shows the state of the last write (nothing).
  EXPECT_EQ(apic_.ReadMmio(kRegEsr), 0u);
  EXPECT_EQ(apic_.WriteMmio(kRegEsr, 0xFFFFFFFF), AccessResult::kOk);  // the written value does not matter
  EXPECT_EQ(apic_.ReadMmio(kRegEsr), kEsrReceiveIllegalVector);
  EXPECT_EQ(apic_.ReadMmio(kRegEsr), kEsrReceiveIllegalVector);  // reading does not clear
  EXPECT_EQ(ReadEsr(), 0u);                                       // the next write does
  EXPECT_EQ(apic_.counters().receive_illegal_vector, 3u);
  EXPECT_EQ(apic_.Accept(Fixed(16)), AcceptResult::kAccepted);  // 16 is the first legal vector
}

TEST_F(LocalApicTest, ErrorRaisesLvtErrorInterrupt_SDM_11_5_3) {
  SoftwareEnable();
  apic_.WriteMmio(kRegLvtError, 0xFE);  // unmasked, vector 0xFE
  apic_.Accept(Fixed(7));
  EXPECT_TRUE(apic_.irr().Test(0xFE));
  // An LVT error entry with an illegal vector reports receive-illegal-vector once, without recursion.
  RecordingSink sink;
  FakeClock clock;
  LocalApic other(LocalApic::Config{}, sink, clock);
  other.WriteMmio(kRegSvr, 0x1FF);
  other.WriteMmio(kRegLvtError, 0x05);
  other.Accept(Fixed(3));
  other.WriteMmio(kRegEsr, 0);
  EXPECT_EQ(other.ReadMmio(kRegEsr), kEsrReceiveIllegalVector);
  EXPECT_TRUE(other.irr().Empty());
}

TEST_F(LocalApicTest, LocalInterruptsFollowTheirLvtEntry_SDM_11_5_1) {
  SoftwareEnable();
  apic_.RaiseLvt(Lvt::kLint0);  // masked at power-up
  EXPECT_FALSE(apic_.TakeExtInt());
  apic_.WriteMmio(kRegLvtLint0, 7u << kLvtDeliveryModeShift);  // ExtINT (the 8259 behind LINT0)
  apic_.WriteMmio(kRegLvtLint1, 4u << kLvtDeliveryModeShift);  // NMI
  apic_.WriteMmio(kRegLvtThermal, 0x55);                        // fixed 0x55
  apic_.RaiseLvt(Lvt::kLint0);
  apic_.RaiseLvt(Lvt::kLint1);
  apic_.RaiseLvt(Lvt::kThermal);
  EXPECT_TRUE(apic_.TakeExtInt());
  EXPECT_TRUE(apic_.TakeNmi());
  EXPECT_TRUE(apic_.irr().Test(0x55));
}

// ---- Priority, acknowledge, EOI (11.8.3 - 11.8.5) ----

TEST_F(LocalApicTest, PprIsMaxOfTprAndIsrClass_SDM_11_8_3_1) {
  SoftwareEnable();
  apic_.Accept(Fixed(0x61));
  ASSERT_EQ(apic_.AcknowledgeInterrupt(), Vector(0x61));
  apic_.WriteMmio(kRegTpr, 0x45);
  EXPECT_EQ(apic_.ReadMmio(kRegPpr), 0x60u);  // TPR class 4 < ISRV class 6: PPR = 0x60
  apic_.WriteMmio(kRegTpr, 0x65);
  EXPECT_EQ(apic_.ReadMmio(kRegPpr), 0x65u);  // same class: PPR = TPR
  apic_.WriteMmio(kRegTpr, 0x7A);
  EXPECT_EQ(apic_.ReadMmio(kRegPpr), 0x7Au);
  apic_.WriteMmio(kRegTpr, 0x00);
  apic_.Eoi();
  EXPECT_EQ(apic_.ReadMmio(kRegPpr), 0x00u);
}

TEST_F(LocalApicTest, PendingOnlyAbovePprClass_SDM_11_8_3_1) {
  SoftwareEnable();
  apic_.WriteMmio(kRegTpr, 0x50);
  apic_.Accept(Fixed(0x5F));
  EXPECT_FALSE(apic_.PendingInterrupt());  // class 5 is not above PPR class 5
  EXPECT_FALSE(apic_.AcknowledgeInterrupt());
  const int kicks = sink_.kicks;
  apic_.WriteMmio(kRegTpr, 0x4F);  // lowering TPR makes it deliverable and kicks the vCPU
  EXPECT_EQ(apic_.PendingInterrupt(), Vector(0x5F));
  EXPECT_GT(sink_.kicks, kicks);
  ASSERT_EQ(apic_.AcknowledgeInterrupt(), Vector(0x5F));
  // A vector of the in-service class waits for the EOI, a higher class preempts.
  apic_.Accept(Fixed(0x50));
  EXPECT_FALSE(apic_.PendingInterrupt());
  apic_.Accept(Fixed(0x60));
  EXPECT_EQ(apic_.PendingInterrupt(), Vector(0x60));
}

TEST_F(LocalApicTest, AcknowledgeMovesHighestIrrToIsr_SDM_11_8_4) {
  SoftwareEnable();
  apic_.Accept(Fixed(0x30));
  apic_.Accept(Fixed(0xE0));
  EXPECT_EQ(apic_.AcknowledgeInterrupt(), Vector(0xE0));
  EXPECT_FALSE(apic_.irr().Test(0xE0));
  EXPECT_TRUE(apic_.isr().Test(0xE0));
  EXPECT_EQ(apic_.ReadMmio(kRegIsr + 0x70), 1u);
  EXPECT_FALSE(apic_.AcknowledgeInterrupt());  // 0x30 is below the in-service 0xE0
  EXPECT_EQ(apic_.counters().acknowledged, 1u);
}

TEST_F(LocalApicTest, EoiClearsHighestIsrAndBroadcastsLevel_SDM_11_8_5) {
  SoftwareEnable();
  apic_.Accept(Fixed(0x40, TriggerMode::kLevel));
  ASSERT_EQ(apic_.AcknowledgeInterrupt(), Vector(0x40));
  apic_.Accept(Fixed(0x80));
  ASSERT_EQ(apic_.AcknowledgeInterrupt(), Vector(0x80));  // nested
  apic_.WriteMmio(kRegEoi, 0);
  EXPECT_FALSE(apic_.isr().Test(0x80));
  EXPECT_TRUE(apic_.isr().Test(0x40));
  EXPECT_TRUE(sink_.eois.empty());  // 0x80 was edge-triggered
  apic_.WriteMmio(kRegEoi, 0xDEAD);  // xAPIC: any value
  EXPECT_TRUE(apic_.isr().Empty());
  ASSERT_EQ(sink_.eois.size(), 1u);
  EXPECT_EQ(sink_.eois[0], 0x40);
  apic_.WriteMmio(kRegEoi, 0);
  EXPECT_EQ(apic_.counters().eoi_without_isr, 1u);
  EXPECT_EQ(apic_.counters().eois, 2u);
}

TEST_F(LocalApicTest, SvrBit12SuppressesEoiBroadcast_SDM_11_8_5) {
  apic_.WriteMmio(kRegSvr, kSvrEnable | kSvrSuppressEoiBroadcast | 0xFF);
  EXPECT_EQ(apic_.ReadMmio(kRegSvr), kSvrEnable | kSvrSuppressEoiBroadcast | 0xFFu);
  apic_.Accept(Fixed(0x40, TriggerMode::kLevel));
  ASSERT_EQ(apic_.AcknowledgeInterrupt(), Vector(0x40));
  apic_.Eoi();
  EXPECT_TRUE(sink_.eois.empty());
  EXPECT_EQ(apic_.counters().eoi_broadcasts_suppressed, 1u);
  // Without the capability (version bit 24 clear) bit 12 is reserved.
  RecordingSink sink;
  FakeClock clock;
  LocalApic::Config c;
  c.eoi_suppression_supported = false;
  LocalApic plain(c, sink, clock);
  EXPECT_EQ(plain.ReadMmio(kRegVersion) & kVersionEoiSuppression, 0u);
  plain.WriteMmio(kRegSvr, kSvrEnable | kSvrSuppressEoiBroadcast | 0xFF);
  EXPECT_EQ(plain.ReadMmio(kRegSvr), kSvrEnable | 0xFFu);
  EXPECT_EQ(plain.counters().reserved_bits_ignored, 1u);
}

TEST_F(LocalApicTest, SoftwareDisableMasksLvtsAndKeepsThemMasked_SDM_11_4_7_2) {
  SoftwareEnable();
  apic_.WriteMmio(kRegLvtTimer, 0x20);
  EXPECT_EQ(apic_.ReadMmio(kRegLvtTimer), 0x20u);
  apic_.WriteMmio(kRegSvr, 0xFF);
  EXPECT_EQ(apic_.ReadMmio(kRegLvtTimer), 0x20u | kLvtMasked);
  apic_.WriteMmio(kRegLvtTimer, 0x21);
  EXPECT_EQ(apic_.ReadMmio(kRegLvtTimer), 0x21u | kLvtMasked);
}

TEST_F(LocalApicTest, AprFollowsP6Rule_SDM_11_6_2_4) {
  SoftwareEnable();
  apic_.WriteMmio(kRegTpr, 0x35);
  EXPECT_EQ(apic_.ReadMmio(kRegApr), 0x35u);  // TPR above IRRV and ISRV: APR = TPR
  apic_.Accept(Fixed(0x70));
  EXPECT_EQ(apic_.ReadMmio(kRegApr), 0x70u);  // else the max of the three classes
}

// ---- ICR (11.6.1, 11.12.9) ----

TEST_F(LocalApicTest, XApicIcrWriteSendsMessage_SDM_11_6_1) {
  SoftwareEnable();
  apic_.WriteMmio(kRegIcrHigh, 0x0C000000);
  EXPECT_TRUE(sink_.ipis.empty());  // writing the high half does not send
  // Lowest priority, logical, level assert, level-triggered, vector 0x31, with the read-only busy bit set.
  apic_.WriteMmio(kRegIcrLow, 0x31 | (1u << 8) | kIcrDestLogical | kIcrLevelAssert | kIcrTriggerLevel |
                                  kIcrDeliveryPending);
  ASSERT_EQ(sink_.ipis.size(), 1u);
  const InterruptMessage& m = sink_.ipis[0];
  EXPECT_EQ(m.vector, Vector(0x31));
  EXPECT_EQ(m.mode, DeliveryMode::kLowestPriority);
  EXPECT_EQ(m.dest_mode, DestMode::kLogical);
  EXPECT_EQ(m.trigger, TriggerMode::kLevel);
  EXPECT_TRUE(m.level);
  EXPECT_EQ(m.shorthand, Shorthand::kNone);
  EXPECT_EQ(m.destination, 0x0Cu);
  EXPECT_FALSE(m.x2apic_destination);
  EXPECT_EQ(m.source, ApicId(0x35));
  EXPECT_EQ(apic_.ReadMmio(kRegIcrLow) & kIcrDeliveryPending, 0u);  // delivered at once: idle
  EXPECT_EQ(apic_.ReadMmio(kRegIcrHigh), 0x0C000000u);
  // All-excluding-self INIT.
  apic_.WriteMmio(kRegIcrLow, (5u << 8) | kIcrLevelAssert | (3u << kIcrShorthandShift));
  ASSERT_EQ(sink_.ipis.size(), 2u);
  EXPECT_EQ(sink_.ipis[1].mode, DeliveryMode::kInit);
  EXPECT_EQ(sink_.ipis[1].shorthand, Shorthand::kAllExcludingSelf);
  EXPECT_EQ(apic_.counters().ipis_sent, 2u);
}

TEST_F(LocalApicTest, X2ApicIcrIsOne64BitMsr_SDM_11_12_9) {
  SoftwareEnable();
  ToX2Apic();
  const uint64_t icr = (0x00012345ull << 32) | 0x4000 | 0xA0;  // fixed, physical, assert, vector 0xA0
  EXPECT_EQ(apic_.WriteMsr(X2ApicMsr(kRegIcrLow), icr), AccessResult::kOk);
  ASSERT_EQ(sink_.ipis.size(), 1u);
  EXPECT_EQ(sink_.ipis[0].destination, 0x12345u);
  EXPECT_TRUE(sink_.ipis[0].x2apic_destination);
  EXPECT_EQ(sink_.ipis[0].vector, Vector(0xA0));
  EXPECT_EQ(apic_.ReadMsr(X2ApicMsr(kRegIcrLow)).value, icr);
}

TEST_F(LocalApicTest, IcrIllegalVectorSetsSendIllegalVectorAndIsNotSent_SDM_11_5_3) {
  SoftwareEnable();
  apic_.WriteMmio(kRegIcrLow, 0x0F);  // fixed, vector 15
  apic_.WriteMmio(kRegIcrLow, 0x02 | (1u << 8));  // lowest priority, vector 2
  EXPECT_TRUE(sink_.ipis.empty());
  EXPECT_EQ(ReadEsr(), kEsrSendIllegalVector);
  EXPECT_EQ(apic_.counters().send_illegal_vector, 2u);
  apic_.WriteMmio(kRegIcrLow, 0x02 | (4u << 8));  // NMI: the vector is ignored, so it is sent
  EXPECT_EQ(sink_.ipis.size(), 1u);
  apic_.WriteMmio(kRegIcrLow, 0x40 | (3u << 8));  // reserved delivery mode: dropped and counted
  EXPECT_EQ(sink_.ipis.size(), 1u);
  EXPECT_EQ(apic_.counters().invalid_icr, 1u);
}

TEST_F(LocalApicTest, SelfShorthandAndSelfIpiAreAcceptedLocally_SDM_11_6_1_and_11_12_11) {
  SoftwareEnable();
  apic_.WriteMmio(kRegIcrLow, 0x70 | (1u << kIcrShorthandShift));
  EXPECT_TRUE(sink_.ipis.empty());
  EXPECT_TRUE(apic_.irr().Test(0x70));
  EXPECT_EQ(apic_.WriteMmio(kRegSelfIpi, 0x71), AccessResult::kIgnored);  // xAPIC: reserved
  ToX2Apic();
  EXPECT_EQ(apic_.WriteMsr(X2ApicMsr(kRegSelfIpi), 0x71), AccessResult::kOk);
  EXPECT_TRUE(apic_.irr().Test(0x71));
  EXPECT_EQ(apic_.WriteMsr(X2ApicMsr(kRegSelfIpi), 0x08), AccessResult::kOk);
  EXPECT_FALSE(apic_.irr().Test(0x08));
  EXPECT_EQ(apic_.WriteMsr(X2ApicMsr(kRegEsr), 0), AccessResult::kOk);
  // The reserved MMIO write of SELF IPI in xAPIC mode is still logged as well.
  EXPECT_EQ(apic_.ReadMsr(X2ApicMsr(kRegEsr)).value, kEsrSendIllegalVector | kEsrIllegalRegister);
  EXPECT_TRUE(sink_.ipis.empty());
  EXPECT_EQ(apic_.counters().self_ipis, 2u);
}

// ---- Timer (11.5.4) ----

TEST_F(LocalApicTest, OneShotTimerCountsDownAndFiresOnce_SDM_11_5_4) {
  SoftwareEnable();
  apic_.WriteMmio(kRegTimerDivide, 0x3);  // divide by 16
  apic_.WriteMmio(kRegLvtTimer, 0xEC);
  apic_.WriteMmio(kRegTimerInitial, 1000);
  const uint64_t t0 = clock_.now;
  EXPECT_EQ(apic_.TimerDeadlineNs(), t0 + 16000);
  EXPECT_EQ(apic_.ReadMmio(kRegTimerCurrent), 1000u);
  clock_.now = t0 + 16 * 250;
  EXPECT_EQ(apic_.ReadMmio(kRegTimerCurrent), 750u);
  clock_.now = t0 + 16 * 250 + 1;
  EXPECT_EQ(apic_.ReadMmio(kRegTimerCurrent), 750u);  // decrements at the end of a tick
  apic_.ServiceTimer();
  EXPECT_FALSE(apic_.irr().Test(0xEC));
  clock_.now = t0 + 16000;
  apic_.ServiceTimer();
  EXPECT_TRUE(apic_.irr().Test(0xEC));
  EXPECT_EQ(apic_.ReadMmio(kRegTimerCurrent), 0u);
  EXPECT_FALSE(apic_.TimerDeadlineNs());
  clock_.now += 100000;
  apic_.ServiceTimer();
  EXPECT_EQ(apic_.counters().timer_fired, 1u);
  EXPECT_EQ(apic_.ReadMmio(kRegTimerInitial), 1000u);
}

TEST_F(LocalApicTest, PeriodicTimerReloadsAndCoalescesLateTicks_SDM_11_5_4) {
  SoftwareEnable();
  apic_.WriteMmio(kRegTimerDivide, 0xB);  // divide by 1
  apic_.WriteMmio(kRegLvtTimer, 0xD0 | (1u << kLvtTimerModeShift));
  apic_.WriteMmio(kRegTimerInitial, 100);
  const uint64_t t0 = clock_.now;
  clock_.now = t0 + 100;
  apic_.ServiceTimer();
  EXPECT_EQ(apic_.counters().timer_fired, 1u);
  EXPECT_EQ(apic_.TimerDeadlineNs(), t0 + 200);
  EXPECT_EQ(apic_.ReadMmio(kRegTimerCurrent), 100u);
  clock_.now = t0 + 130;
  EXPECT_EQ(apic_.ReadMmio(kRegTimerCurrent), 70u);
  clock_.now = t0 + 450;  // ticks at 200, 300, 400 are due: one interrupt, two coalesced
  apic_.ServiceTimer();
  EXPECT_EQ(apic_.counters().timer_fired, 2u);
  EXPECT_EQ(apic_.counters().timer_coalesced, 2u);
  EXPECT_EQ(apic_.TimerDeadlineNs(), t0 + 500);
  EXPECT_EQ(apic_.ReadMmio(kRegTimerCurrent), 50u);
  // Masked: keeps counting, no interrupt.
  apic_.WriteMmio(kRegLvtTimer, 0xD0 | (1u << kLvtTimerModeShift) | kLvtMasked);
  clock_.now = t0 + 500;
  apic_.ServiceTimer();
  EXPECT_EQ(apic_.counters().timer_masked, 1u);
  EXPECT_EQ(apic_.counters().timer_fired, 2u);
  // Initial count 0 stops it.
  apic_.WriteMmio(kRegTimerInitial, 0);
  EXPECT_FALSE(apic_.TimerDeadlineNs());
}

TEST_F(LocalApicTest, DivideConfigurationEncodings_SDM_11_5_4_Figure_11_10) {
  const std::pair<uint32_t, uint64_t> cases[] = {{0x0, 2}, {0x1, 4},  {0x2, 8},  {0x3, 16},
                                                 {0x8, 32}, {0x9, 64}, {0xA, 128}, {0xB, 1}};
  SoftwareEnable();
  for (const auto& [tdcr, div] : cases) {
    apic_.WriteMmio(kRegTimerDivide, tdcr);
    apic_.WriteMmio(kRegTimerInitial, 10);
    EXPECT_EQ(apic_.TimerDeadlineNs(), clock_.now + 10 * div) << "TDCR " << tdcr;
  }
}

TEST_F(LocalApicTest, TscDeadlineMode_SDM_11_5_4_1) {
  SoftwareEnable();
  // Outside TSC-deadline mode the MSR reads 0 and writes are ignored.
  EXPECT_EQ(apic_.WriteMsr(kMsrTscDeadline, 5'000'000'000), AccessResult::kOk);
  EXPECT_EQ(apic_.ReadMsr(kMsrTscDeadline).value, 0u);
  apic_.WriteMmio(kRegTimerInitial, 1000);
  ASSERT_TRUE(apic_.TimerDeadlineNs());
  // Switching to TSC-deadline mode disarms the count-down timer.
  apic_.WriteMmio(kRegLvtTimer, 0xE1 | (2u << kLvtTimerModeShift));
  EXPECT_FALSE(apic_.TimerDeadlineNs());
  EXPECT_EQ(apic_.ReadMmio(kRegTimerInitial), 0u);
  apic_.WriteMmio(kRegTimerInitial, 1000);  // ignored in TSC-deadline mode
  EXPECT_EQ(apic_.ReadMmio(kRegTimerInitial), 0u);
  EXPECT_FALSE(apic_.TimerDeadlineNs());
  // 1 GHz TSC (tsc_khz = 1e6): TSC == ns.
  const uint64_t deadline = clock_.now + 5000;
  EXPECT_EQ(apic_.WriteMsr(kMsrTscDeadline, deadline), AccessResult::kOk);
  EXPECT_EQ(apic_.ReadMsr(kMsrTscDeadline).value, deadline);
  EXPECT_EQ(apic_.TimerDeadlineNs(), deadline);
  EXPECT_EQ(apic_.ReadMmio(kRegTimerCurrent), 0u);
  clock_.now = deadline;
  apic_.ServiceTimer();
  EXPECT_TRUE(apic_.irr().Test(0xE1));
  EXPECT_EQ(apic_.ReadMsr(kMsrTscDeadline).value, 0u);  // disarmed after expiry
  // A deadline in the past fires at once; 0 disarms.
  ASSERT_EQ(apic_.AcknowledgeInterrupt(), Vector(0xE1));
  apic_.Eoi();
  apic_.WriteMsr(kMsrTscDeadline, 1);
  EXPECT_TRUE(apic_.irr().Test(0xE1));
  apic_.WriteMsr(kMsrTscDeadline, clock_.now + 10);
  apic_.WriteMsr(kMsrTscDeadline, 0);
  EXPECT_FALSE(apic_.TimerDeadlineNs());
  EXPECT_EQ(apic_.counters().timer_fired, 2u);
}

TEST(LocalApicConfigTest, TscDeadlineUsesTscFrequency_SDM_11_5_4_1) {
  RecordingSink sink;
  FakeClock clock;
  LocalApic::Config c;
  c.tsc_khz = 2'600'000;  // 2.6 GHz
  LocalApic apic(c, sink, clock);
  apic.WriteMmio(kRegSvr, 0x1FF);
  apic.WriteMmio(kRegLvtTimer, 0x40 | (2u << kLvtTimerModeShift));
  apic.WriteMsr(kMsrTscDeadline, 2'600'000'000ull * 2);  // 2 s of TSC
  EXPECT_EQ(apic.TimerDeadlineNs(), 2'000'000'000ull);
  // Without TSC-deadline support the mode bit is reserved and the MSR #GPs.
  c.tsc_deadline_supported = false;
  LocalApic old(c, sink, clock);
  old.WriteMmio(kRegSvr, 0x1FF);
  old.WriteMmio(kRegLvtTimer, 0x40 | (2u << kLvtTimerModeShift));
  EXPECT_EQ(old.ReadMmio(kRegLvtTimer), 0x40u);
  EXPECT_EQ(old.ReadMsr(kMsrTscDeadline).result, AccessResult::kGeneralProtection);
}

// ---- Addressing (11.6.2) ----

TEST_F(LocalApicTest, DestinationMatching_SDM_11_6_2) {
  SoftwareEnable();
  InterruptMessage m = Fixed(0x40);
  m.destination = 0x35;
  EXPECT_TRUE(apic_.MatchesDestination(m));  // physical
  m.destination = 0x36;
  EXPECT_FALSE(apic_.MatchesDestination(m));
  m.destination = 0xFF;
  EXPECT_TRUE(apic_.MatchesDestination(m));  // physical broadcast (11.6.2.1)
  // Logical flat: LDR 0x04 << 24.
  apic_.WriteMmio(kRegLdr, 0x04000000);
  m.dest_mode = DestMode::kLogical;
  m.destination = 0x0C;
  EXPECT_TRUE(apic_.MatchesDestination(m));
  m.destination = 0x03;
  EXPECT_FALSE(apic_.MatchesDestination(m));
  // Logical cluster (DFR model 0): cluster 2, member bit 1.
  apic_.WriteMmio(kRegDfr, 0x0FFFFFFF);
  apic_.WriteMmio(kRegLdr, 0x22000000);
  EXPECT_EQ(apic_.addressing().dfr_model, 0);
  m.destination = 0x23;
  EXPECT_TRUE(apic_.MatchesDestination(m));
  m.destination = 0x32;
  EXPECT_FALSE(apic_.MatchesDestination(m));
  // Shorthands (11.6.1).
  m.shorthand = Shorthand::kAllExcludingSelf;
  m.source = ApicId(0x35);
  EXPECT_FALSE(apic_.MatchesDestination(m));
  m.shorthand = Shorthand::kAllIncludingSelf;
  EXPECT_TRUE(apic_.MatchesDestination(m));
  // x2APIC logical: cluster 3, bit 5 (11.12.10.2).
  ToX2Apic();
  m.shorthand = Shorthand::kNone;
  m.x2apic_destination = true;
  m.destination = (3u << 16) | 0x20;
  EXPECT_TRUE(apic_.MatchesDestination(m));
  m.destination = (2u << 16) | 0x20;
  EXPECT_FALSE(apic_.MatchesDestination(m));
  m.dest_mode = DestMode::kPhysical;
  m.destination = 0x35;
  EXPECT_TRUE(apic_.MatchesDestination(m));
  m.destination = 0xFFFFFFFF;
  EXPECT_TRUE(apic_.MatchesDestination(m));
}

// ---- KVM state layout ----

TEST_F(LocalApicTest, KvmStateRoundTripInModel_xAPIC_and_x2APIC) {
  SoftwareEnable();
  apic_.WriteMmio(kRegTpr, 0x21);
  apic_.WriteMmio(kRegLdr, 0x08000000);
  apic_.WriteMmio(kRegDfr, 0x0FFFFFFF);
  apic_.Accept(Fixed(0x91, TriggerMode::kLevel));
  apic_.Accept(Fixed(0x42));
  ASSERT_EQ(apic_.AcknowledgeInterrupt(), Vector(0x91));
  apic_.Accept(Fixed(0x33));
  apic_.WriteMmio(kRegLvtLint0, 0x700);
  apic_.WriteMmio(kRegIcrHigh, 0x05000000);
  apic_.WriteMmio(kRegIcrLow, 0x4055);
  apic_.WriteMmio(kRegTimerDivide, 0x1);
  apic_.WriteMmio(kRegLvtTimer, 0x20 | (1u << kLvtTimerModeShift));
  apic_.WriteMmio(kRegTimerInitial, 5000);
  clock_.now += 4 * 1200;
  for (bool x2 : {false, true}) {
    if (x2) ToX2Apic();
    const kvm_lapic_state page = apic_.ExportKvmState();
    uint32_t id;
    std::memcpy(&id, page.regs + kRegId, 4);
    EXPECT_EQ(id, x2 ? 0x35u : 0x35u << 24);
    RecordingSink sink;
    LocalApic copy(MakeConfig(), sink, clock_);
    ASSERT_TRUE(copy.ImportKvmState(page, apic_.apic_base()).ok());
    const kvm_lapic_state again = copy.ExportKvmState();
    EXPECT_EQ(std::memcmp(page.regs, again.regs, sizeof page.regs), 0) << "x2apic=" << x2;
    EXPECT_EQ(copy.ppr(), apic_.ppr());
    EXPECT_EQ(copy.TimerCurrentCount(), 3800u);
    EXPECT_EQ(copy.TimerDeadlineNs(), apic_.TimerDeadlineNs());
  }
  // Without KVM_X2APIC_API_USE_32BIT_IDS the x2APIC ID sits in bits 31:24 like xAPIC's.
  const kvm_lapic_state legacy = apic_.ExportKvmState(/*x2apic_api_format=*/false);
  uint32_t id;
  std::memcpy(&id, legacy.regs + kRegId, 4);
  EXPECT_EQ(id, 0x35u << 24);
}

TEST_F(LocalApicTest, KvmStateImportRejectsIllegalApicBase) {
  const kvm_lapic_state page = apic_.ExportKvmState();
  EXPECT_EQ(apic_.ImportKvmState(page, kDefaultApicBaseAddress | kApicBaseExtd).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(apic_.ImportKvmState(page, kXApicBase | 0x1).code(), absl::StatusCode::kInvalidArgument);
}

// ---- Randomized property test (SDM 11.8.3.1, 11.8.4, 11.8.5 invariants) ----

class PropertyTest : public ::testing::TestWithParam<uint64_t> {};

TEST_P(PropertyTest, InvariantsHoldOverRandomOperations) {
  std::mt19937_64 rng(GetParam());
  RecordingSink sink;
  FakeClock clock;
  LocalApic::Config cfg;
  cfg.initial_id = ApicId(static_cast<uint32_t>(rng() % 300));
  LocalApic apic(cfg, sink, clock);
  auto r = [&](uint64_t n) { return rng() % n; };
  const uint32_t offsets[] = {kRegId,   kRegTpr,       kRegEoi,     kRegLdr,          kRegDfr,
                              kRegSvr,  kRegEsr,       kRegIcrLow,  kRegIcrHigh,      kRegLvtTimer,
                              kRegLvtError, kRegLvtLint0, kRegTimerInitial, kRegTimerDivide, kRegIrr,
                              kRegIsr,  kRegPpr,       kRegSelfIpi, 0x050};
  for (int step = 0; step < 20000; ++step) {
    const VectorBitmap isr_before = apic.isr();
    const VectorBitmap irr_before = apic.irr();
    const int highest_isr = isr_before.Highest();
    bool acknowledged = false, eoi = false, may_add_irr = false, may_clear_irr = false;
    std::optional<Vector> acked;
    switch (r(20)) {
      case 0:
      case 1:
      case 2: {  // a register write, biased towards meaningful values
        const uint32_t off = offsets[r(std::size(offsets))];
        uint32_t val = static_cast<uint32_t>(rng());
        if (off == kRegSvr && r(4) != 0) val |= kSvrEnable;
        if (off == kRegTpr && r(3) != 0) val &= 0x3F;  // mostly low priorities, so interrupts flow
        if (off == kRegTimerInitial) val %= 5000;
        AccessResult res;
        if (apic.mode() == ApicMode::kX2Apic) {
          res = apic.WriteMsr(X2ApicMsr(off), r(8) == 0 ? rng() : (off == kRegEoi ? 0 : val));
        } else {
          res = apic.WriteMmio(off, val);
        }
        eoi = off == kRegEoi && res == AccessResult::kOk;  // a #GP'd or ignored write is no EOI
        // Any write may add an IRR bit: ICR self IPIs, timer starts, or an ESR error through the LVT error entry.
        may_add_irr = true;
        break;
      }
      case 3:
      case 4:
      case 5:
      case 6:
      case 7: {  // an accepted message
        InterruptMessage m;
        m.vector = Vector(static_cast<uint8_t>(r(4) == 0 ? r(20) : r(256)));
        m.mode = static_cast<DeliveryMode>(r(8));
        m.trigger = r(2) ? TriggerMode::kLevel : TriggerMode::kEdge;
        apic.Accept(m);
        may_add_irr = true;
        break;
      }
      case 8:
      case 9:
      case 10:
      case 11:
        acked = apic.AcknowledgeInterrupt();
        acknowledged = true;
        may_clear_irr = true;
        break;
      case 12:
      case 13:
      case 14:
        apic.Eoi();
        eoi = true;
        break;
      case 15:
        clock.now += r(20000);
        apic.ServiceTimer();
        may_add_irr = true;
        break;
      case 16:
        if (apic.mode() == ApicMode::kX2Apic) {
          apic.WriteMsr(X2ApicMsr(kRegIcrLow), rng());
        } else {
          apic.WriteMmio(kRegIcrLow, static_cast<uint32_t>(rng()));
        }
        may_add_irr = true;
        break;
      case 17: {
        if (r(4) != 0) {  // rare: a global disable resets everything
          apic.WriteMmio(kRegSvr, 0x1FF);
          apic.WriteMsr(X2ApicMsr(kRegSvr), 0x1FF);
          break;
        }
        const uint64_t bases[] = {kXApicBase, kX2ApicBase, kDefaultApicBaseAddress, rng()};
        const ApicMode before = apic.mode();
        const AccessResult res = apic.SetApicBase(bases[r(4)]);
        if (res == AccessResult::kOk && apic.mode() != before &&
            (apic.mode() == ApicMode::kDisabled || before == ApicMode::kDisabled)) {
          // A global disable resets the register file (11.4.3).
          ASSERT_TRUE(apic.isr().Empty() && apic.irr().Empty());
          continue;
        }
        break;
      }
      default:
        apic.RaiseLvt(static_cast<Lvt>(r(kLvtCount)));
        may_add_irr = true;
        break;
    }
    const VectorBitmap& isr = apic.isr();
    const VectorBitmap& irr = apic.irr();
    // No vector below 16 is ever requested or in service (11.5.3).
    for (uint8_t v = 0; v < kFirstLegalVector; ++v) ASSERT_FALSE(irr.Test(v) || isr.Test(v)) << step;
    // PPR is never below the TPR (11.8.3.1), and the pending vector is always above the PPR class.
    ASSERT_GE(apic.ppr(), apic.tpr()) << step;
    ASSERT_GE(apic.ppr() & 0xF0, std::max(isr.Highest(), 0) & 0xF0) << step;
    if (auto p = apic.PendingInterrupt()) {
      ASSERT_GT(p->value() >> 4, apic.ppr() >> 4) << step;
    }
    for (int v = 0; v < 256; ++v) {
      const auto vec = static_cast<uint8_t>(v);
      if (isr.Test(vec) && !isr_before.Test(vec)) {
        // An ISR bit appears only by acknowledging a vector that was requested (an accepted vector).
        ASSERT_TRUE(acknowledged && acked && acked->value() == vec && irr_before.Test(vec)) << step << " " << v;
      }
      if (irr.Test(vec) && !irr_before.Test(vec)) {
        ASSERT_TRUE(may_add_irr) << step;
      }
      if (!irr.Test(vec) && irr_before.Test(vec)) {
        ASSERT_TRUE(may_clear_irr) << step;
      }
    }
    if (eoi) {
      // One EOI clears exactly the highest in-service vector.
      VectorBitmap expected = isr_before;
      if (highest_isr >= 0) expected.Clear(static_cast<uint8_t>(highest_isr));
      ASSERT_EQ(isr, expected) << step;
    } else if (!acknowledged) {
      ASSERT_EQ(isr, isr_before) << step;
    }
  }
  // The run exercised the interesting paths, not only rejected accesses.
  const LocalApicCounters& c = apic.counters();
  std::printf("seed %llu: accepted %llu acknowledged %llu eois %llu eoi_broadcasts %llu ipis %llu gp %llu\n",
              static_cast<unsigned long long>(GetParam()), static_cast<unsigned long long>(c.accepted),
              static_cast<unsigned long long>(c.acknowledged), static_cast<unsigned long long>(c.eois),
              static_cast<unsigned long long>(c.eoi_broadcasts), static_cast<unsigned long long>(c.ipis_sent),
              static_cast<unsigned long long>(c.gp_faults));
  EXPECT_GT(c.acknowledged, 100u);
  EXPECT_GT(c.eois, 100u);
  EXPECT_GT(c.eoi_broadcasts, 10u);
}

INSTANTIATE_TEST_SUITE_P(FixedSeeds, PropertyTest, ::testing::Values(1, 2, 3, 42, 0xA66D, 0xC0FFEE, 7777, 123456789));

}  // namespace
}  // namespace aggvm::irqchip
