// The IOAPIC model against the Intel 82093AA datasheet (sections 3.0-3.2) and SDM vol. 3, 11.8.5.
#include "irqchip/ioapic.h"

#include <gtest/gtest.h>

#include <vector>

namespace aggvm::irqchip {
namespace {

struct Sent {
  InterruptMessage message;
  std::optional<Gsi> gsi;
};

class RecordingSink : public InterruptSink {
 public:
  void SendMessage(const InterruptMessage& m, std::optional<Gsi> gsi) override { sent.push_back({m, gsi}); }
  void Deliver(VcpuIndex, NodeId, const InterruptMessage&) override { ++unexpected; }
  void BroadcastEoi(Vector) override { ++unexpected; }
  void Forward(NodeId, const InterruptMessage&) override { ++unexpected; }
  std::vector<Sent> sent;
  int unexpected = 0;
};

class IoApicTest : public ::testing::Test {
 protected:
  IoApic Make(IoApicConfig c = {}) {
    auto io = IoApic::Create(c, &sink);
    EXPECT_TRUE(io.ok()) << io.status();
    return std::move(*io);
  }
  static void Select(IoApic& io, uint8_t reg) { io.MmioWrite(IoApic::kIoRegSel, 4, reg); }
  static void WriteReg(IoApic& io, uint8_t reg, uint32_t v) {
    Select(io, reg);
    io.MmioWrite(IoApic::kIoWin, 4, v);
  }
  static uint32_t ReadReg(IoApic& io, uint8_t reg) {
    Select(io, reg);
    return io.MmioRead(IoApic::kIoWin, 4);
  }
  static void WriteRte(IoApic& io, uint32_t pin, uint64_t v) {
    WriteReg(io, static_cast<uint8_t>(0x10 + 2 * pin + 1), static_cast<uint32_t>(v >> 32));
    WriteReg(io, static_cast<uint8_t>(0x10 + 2 * pin), static_cast<uint32_t>(v));
  }
  static constexpr uint64_t Rte(uint8_t vector, bool level, bool masked = false, uint8_t dest = 0,
                                uint32_t dm = 0, bool logical = false) {
    return vector | (static_cast<uint64_t>(dm) << 8) | (logical ? IoApic::kRteDestLogical : 0) |
           (level ? IoApic::kRteLevel : 0) | (masked ? IoApic::kRteMask : 0) |
           (static_cast<uint64_t>(dest) << 56);
  }
  RecordingSink sink;
};

TEST_F(IoApicTest, Datasheet_3_2_2_VersionRegisterReportsMaxRedirectionEntry) {
  auto io = Make();
  EXPECT_EQ(ReadReg(io, 0x01), 0x11u | (23u << 16));
  auto io8 = Make(IoApicConfig{.pins = 8});
  EXPECT_EQ(ReadReg(io8, 0x01) >> 16 & 0xFF, 7u);
  EXPECT_EQ(io8.pins(), 8u);
}

TEST_F(IoApicTest, Datasheet_3_2_1_IdRegisterAndArbitrationLoadedFromIt) {
  auto io = Make(IoApicConfig{.id = 2});
  EXPECT_EQ(ReadReg(io, 0x00), 2u << 24);
  EXPECT_EQ(ReadReg(io, 0x02), 2u << 24);
  WriteReg(io, 0x00, 0x0A00'0000);
  EXPECT_EQ(ReadReg(io, 0x00), 0x0Au << 24);
  EXPECT_EQ(ReadReg(io, 0x02), 0x0Au << 24);  // 3.2.3: IOAPICARB loaded on ID write
  EXPECT_EQ(io.counters().reserved_bit_writes, 0u);
  WriteReg(io, 0x00, 0xF500'00FF);  // bits outside 27:24 are reserved
  EXPECT_EQ(ReadReg(io, 0x00), 0x05u << 24);
  EXPECT_EQ(io.counters().reserved_bit_writes, 1u);
}

TEST_F(IoApicTest, Datasheet_3_2_ReadOnlyRegistersIgnoreWritesAndCount) {
  auto io = Make();
  const uint32_t ver = ReadReg(io, 0x01);
  WriteReg(io, 0x01, 0);
  WriteReg(io, 0x02, 0x0F00'0000);
  EXPECT_EQ(ReadReg(io, 0x01), ver);
  EXPECT_EQ(ReadReg(io, 0x02), 0u);
  EXPECT_EQ(io.counters().read_only_writes, 2u);
}

TEST_F(IoApicTest, Datasheet_3_1_IoregselHoldsTheIndexAndReservedBitsCount) {
  auto io = Make();
  io.MmioWrite(IoApic::kIoRegSel, 4, 0x12);
  EXPECT_EQ(io.MmioRead(IoApic::kIoRegSel, 4), 0x12u);
  io.MmioWrite(IoApic::kIoRegSel, 4, 0xAB00'0013);
  EXPECT_EQ(io.ioregsel(), 0x13);
  EXPECT_EQ(io.counters().reserved_bit_writes, 1u);
  io.MmioWrite(IoApic::kIoRegSel, 1, 0x10);  // byte access is fine
  EXPECT_EQ(io.ioregsel(), 0x10);
}

TEST_F(IoApicTest, Datasheet_3_1_BadOffsetsSizesAndRegistersAreCounted) {
  auto io = Make();
  io.MmioWrite(0x20, 4, 1);
  io.MmioWrite(IoApic::kIoWin, 2, 1);  // IOWIN is dword only
  EXPECT_EQ(io.MmioRead(0x08, 4), 0u);
  io.MmioWrite(IoApic::kEoiRegister, 4, 0x30);  // no EOI register in version 0x11
  EXPECT_EQ(io.counters().bad_mmio_accesses, 4u);
  EXPECT_EQ(ReadReg(io, 0x05), 0u);                 // no register 0x05
  EXPECT_EQ(ReadReg(io, 0x10 + 2 * 24), 0u);        // entry 24 of a 24-pin IOAPIC
  WriteReg(io, 0x10 + 2 * 24, 0x30);
  EXPECT_EQ(io.counters().bad_register_accesses, 3u);
}

TEST_F(IoApicTest, Datasheet_3_2_4_RedirectionEntryReadBackAndReservedBits) {
  auto io = Make();
  // Reset state: masked.
  EXPECT_EQ(ReadReg(io, 0x10), static_cast<uint32_t>(IoApic::kRteMask));
  const uint64_t v = Rte(0x31, true, false, 0x0A, 1, true) | IoApic::kRtePolarityLow;
  WriteRte(io, 3, v);
  EXPECT_EQ(io.redirection_entry(3), v);
  EXPECT_EQ(ReadReg(io, 0x10 + 6), static_cast<uint32_t>(v));
  EXPECT_EQ(ReadReg(io, 0x10 + 7), static_cast<uint32_t>(v >> 32));
  EXPECT_EQ(io.counters().reserved_bit_writes, 0u);
  WriteReg(io, 0x10 + 7, 0x0A00'00FF);  // bits 55:32 reserved
  WriteReg(io, 0x10 + 6, static_cast<uint32_t>(v) | 0x8000'0000u);  // bit 31 reserved
  EXPECT_EQ(io.redirection_entry(3), v);
  EXPECT_EQ(io.counters().reserved_bit_writes, 2u);
}

TEST_F(IoApicTest, Datasheet_3_2_4_DeliveryStatusAndRemoteIrrAreReadOnly) {
  auto io = Make();
  WriteRte(io, 0, Rte(0x30, true) | IoApic::kRteRemoteIrr | IoApic::kRteDeliveryStatus);
  EXPECT_FALSE(io.remote_irr(0));
  EXPECT_EQ(io.redirection_entry(0) & IoApic::kRteDeliveryStatus, 0u);
  EXPECT_EQ(io.counters().read_only_writes, 1u);
  // A read-modify-write that writes back the current value is not counted.
  io.SetPinLevel(0, true);
  ASSERT_TRUE(io.remote_irr(0));
  WriteReg(io, 0x10, static_cast<uint32_t>(io.redirection_entry(0)));
  EXPECT_EQ(io.counters().read_only_writes, 1u);
  EXPECT_TRUE(io.remote_irr(0));
}

TEST_F(IoApicTest, Datasheet_3_2_4_EdgeDeliversOnRisingEdgeOnly) {
  auto io = Make(IoApicConfig{.gsi_base = Gsi(24)});
  WriteRte(io, 5, Rte(0x41, false, false, 3));
  io.SetPinLevel(5, true);
  ASSERT_EQ(sink.sent.size(), 1u);
  const auto& m = sink.sent[0].message;
  EXPECT_EQ(m.vector, Vector(0x41));
  EXPECT_EQ(m.destination, 3u);
  EXPECT_EQ(m.trigger, TriggerMode::kEdge);
  EXPECT_EQ(m.dest_mode, DestMode::kPhysical);
  EXPECT_EQ(m.mode, DeliveryMode::kFixed);
  EXPECT_EQ(sink.sent[0].gsi, Gsi(29));
  io.SetPinLevel(5, true);  // still high: no edge
  EXPECT_EQ(sink.sent.size(), 1u);
  io.SetPinLevel(5, false);
  io.SetPinLevel(5, true);
  EXPECT_EQ(sink.sent.size(), 2u);
  EXPECT_FALSE(io.remote_irr(5));  // edge pins never set remote IRR
  EXPECT_EQ(sink.unexpected, 0);
}

TEST_F(IoApicTest, Datasheet_3_2_4_MaskedEdgeIsLostAndCounted) {
  auto io = Make();
  WriteRte(io, 1, Rte(0x42, false, true));
  io.SetPinLevel(1, true);
  EXPECT_TRUE(sink.sent.empty());
  EXPECT_EQ(io.counters().masked_edges_lost, 1u);
  WriteRte(io, 1, Rte(0x42, false, false));  // unmasking does not replay the lost edge
  EXPECT_TRUE(sink.sent.empty());
}

TEST_F(IoApicTest, Sdm_11_8_5_LevelSetsRemoteIrrAndEoiClearsIt) {
  auto io = Make();
  WriteRte(io, 2, Rte(0x50, true, false, 1, 0, true));
  io.SetPinLevel(2, true);
  ASSERT_EQ(sink.sent.size(), 1u);
  EXPECT_EQ(sink.sent[0].message.trigger, TriggerMode::kLevel);
  EXPECT_EQ(sink.sent[0].message.dest_mode, DestMode::kLogical);
  EXPECT_TRUE(io.remote_irr(2));
  io.SetPinLevel(2, true);  // remote IRR blocks a second message
  EXPECT_EQ(sink.sent.size(), 1u);
  io.SetPinLevel(2, false);
  io.Eoi(Vector(0x51));  // another vector: no effect
  EXPECT_TRUE(io.remote_irr(2));
  io.Eoi(Vector(0x50));
  EXPECT_FALSE(io.remote_irr(2));
  EXPECT_EQ(sink.sent.size(), 1u);  // deasserted: nothing more
  EXPECT_EQ(io.counters().remote_irr_cleared, 1u);
}

TEST_F(IoApicTest, Sdm_11_8_5_LevelStillAssertedRedeliversAfterEoi) {
  auto io = Make();
  WriteRte(io, 4, Rte(0x60, true));
  io.SetPinLevel(4, true);
  ASSERT_EQ(sink.sent.size(), 1u);
  io.Eoi(Vector(0x60));
  EXPECT_EQ(sink.sent.size(), 2u);
  EXPECT_TRUE(io.remote_irr(4));
  EXPECT_EQ(io.counters().level_redelivered, 1u);
}

TEST_F(IoApicTest, Sdm_11_8_5_EoiClearsEveryPinOfTheVector) {
  auto io = Make();
  WriteRte(io, 6, Rte(0x70, true));
  WriteRte(io, 7, Rte(0x70, true));
  io.SetPinLevel(6, true);
  io.SetPinLevel(7, true);
  io.SetPinLevel(6, false);
  io.SetPinLevel(7, false);
  ASSERT_TRUE(io.remote_irr(6) && io.remote_irr(7));
  io.Eoi(Vector(0x70));
  EXPECT_FALSE(io.remote_irr(6));
  EXPECT_FALSE(io.remote_irr(7));
}

TEST_F(IoApicTest, Datasheet_3_2_4_MaskedLevelIgnoredThenFiresOnUnmaskWhileAsserted) {
  auto io = Make();
  WriteRte(io, 8, Rte(0x80, true, true));
  io.SetPinLevel(8, true);
  EXPECT_TRUE(sink.sent.empty());
  EXPECT_FALSE(io.remote_irr(8));
  WriteRte(io, 8, Rte(0x80, true, false));
  ASSERT_EQ(sink.sent.size(), 1u);
  EXPECT_TRUE(io.remote_irr(8));
  // Masked and deasserted before unmask: nothing.
  WriteRte(io, 9, Rte(0x81, true, true));
  io.SetPinLevel(9, true);
  io.SetPinLevel(9, false);
  WriteRte(io, 9, Rte(0x81, true, false));
  EXPECT_EQ(sink.sent.size(), 1u);
}

TEST_F(IoApicTest, SwitchingToEdgeClearsRemoteIrr) {
  auto io = Make();
  WriteRte(io, 10, Rte(0x90, true));
  io.SetPinLevel(10, true);
  ASSERT_TRUE(io.remote_irr(10));
  WriteRte(io, 10, Rte(0x90, false));
  EXPECT_FALSE(io.remote_irr(10));
}

TEST_F(IoApicTest, Datasheet_3_2_4_ReservedDeliveryModeSendsNothing) {
  auto io = Make();
  WriteRte(io, 11, Rte(0xA0, false, false, 0, 3));
  io.SetPinLevel(11, true);
  WriteRte(io, 12, Rte(0xA1, true, false, 0, 6));
  io.SetPinLevel(12, true);
  EXPECT_TRUE(sink.sent.empty());
  EXPECT_FALSE(io.remote_irr(12));
  EXPECT_EQ(io.counters().reserved_delivery_mode, 2u);
}

TEST_F(IoApicTest, Datasheet_3_2_4_DeliveryModesPassThrough) {
  auto io = Make();
  const std::pair<uint32_t, DeliveryMode> modes[] = {{1, DeliveryMode::kLowestPriority}, {2, DeliveryMode::kSmi},
                                                     {4, DeliveryMode::kNmi},            {5, DeliveryMode::kInit},
                                                     {7, DeliveryMode::kExtInt}};
  for (const auto& [dm, mode] : modes) {
    sink.sent.clear();
    WriteRte(io, 13, Rte(0xB0, false, false, 0, dm));
    io.SetPinLevel(13, true);
    io.SetPinLevel(13, false);
    ASSERT_EQ(sink.sent.size(), 1u) << dm;
    EXPECT_EQ(sink.sent[0].message.mode, mode);
  }
}

TEST_F(IoApicTest, EoiRegisterOnVersion0x20) {
  auto io = Make(IoApicConfig{.version = 0x20});
  WriteRte(io, 0, Rte(0x33, true));
  io.SetPinLevel(0, true);
  io.SetPinLevel(0, false);
  ASSERT_TRUE(io.remote_irr(0));
  io.MmioWrite(IoApic::kEoiRegister, 4, 0x33);
  EXPECT_FALSE(io.remote_irr(0));
  EXPECT_EQ(io.counters().bad_mmio_accesses, 0u);
}

TEST_F(IoApicTest, BadPinsAndBadConfigs) {
  auto io = Make();
  io.SetPinLevel(24, true);
  io.SetPinLevel(0xFFFFFFFF, true);
  EXPECT_EQ(io.counters().bad_pins, 2u);
  EXPECT_FALSE(IoApic::Create(IoApicConfig{.pins = 0}, &sink).ok());
  EXPECT_FALSE(IoApic::Create(IoApicConfig{.pins = 121}, &sink).ok());
  EXPECT_TRUE(IoApic::Create(IoApicConfig{.pins = 120}, &sink).ok());
  EXPECT_FALSE(IoApic::Create(IoApicConfig{.id = 16}, &sink).ok());
  EXPECT_FALSE(IoApic::Create(IoApicConfig{}, nullptr).ok());
  auto s = IoApic::Create(IoApicConfig{.pins = 200}, &sink).status();
  EXPECT_NE(s.message().find("200"), std::string::npos);
}

}  // namespace
}  // namespace aggvm::irqchip
