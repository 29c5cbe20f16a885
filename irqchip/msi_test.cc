// MSI decoding, SDM vol. 3, 11.11 "Message Signalled Interrupts" (Figures 11-24 address, 11-25 data).
#include "irqchip/msi.h"

#include <gtest/gtest.h>

namespace aggvm::irqchip {
namespace {

TEST(MsiDecode, Sdm_11_11_1_AddressFieldsAndSdm_11_11_2_DataFields) {
  // Destination 0x12, RH=1, DM=logical; vector 0x41, lowest priority, level trigger, assert.
  const uint64_t address = 0xFEE00000u | (0x12u << 12) | (1u << 3) | (1u << 2);
  const uint32_t data = 0x41u | (1u << 8) | (1u << 14) | (1u << 15);
  auto m = DecodeMsi(address, data);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->destination, 0x12u);
  EXPECT_TRUE(m->redirection_hint);
  EXPECT_EQ(m->dest_mode, DestMode::kLogical);
  EXPECT_EQ(m->vector, Vector(0x41));
  EXPECT_EQ(m->mode, DeliveryMode::kLowestPriority);
  EXPECT_EQ(m->trigger, TriggerMode::kLevel);
  EXPECT_TRUE(m->level);
  EXPECT_EQ(m->shorthand, Shorthand::kNone);
  EXPECT_FALSE(m->x2apic_destination);
}

TEST(MsiDecode, Sdm_11_11_2_EdgeDeassertAndPhysical) {
  auto m = DecodeMsi(0xFEE03000u, 0x0000'0030u);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->destination, 3u);
  EXPECT_EQ(m->dest_mode, DestMode::kPhysical);
  EXPECT_FALSE(m->redirection_hint);
  EXPECT_EQ(m->trigger, TriggerMode::kEdge);
  EXPECT_FALSE(m->level);
  EXPECT_EQ(m->mode, DeliveryMode::kFixed);
}

TEST(MsiDecode, Sdm_11_11_2_EveryNonReservedDeliveryMode) {
  for (uint32_t dm : {0u, 1u, 2u, 4u, 5u, 7u}) {
    auto m = DecodeMsi(0xFEE00000u, 0x30u | (dm << 8));
    ASSERT_TRUE(m.ok()) << dm;
    EXPECT_EQ(static_cast<uint32_t>(m->mode), dm);
  }
}

TEST(MsiDecode, Sdm_11_11_2_ReservedDeliveryModesAreErrors) {
  for (uint32_t dm : {3u, 6u}) {
    auto r = DecodeMsiRaw(0xFEE00000u, 0x30u | (dm << 8));
    EXPECT_EQ(r.error, MsiError::kReservedDeliveryMode) << dm;
    auto s = DecodeMsi(0xFEE00000u, 0x30u | (dm << 8));
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.status().message().find("delivery mode"), std::string::npos);
  }
}

TEST(MsiDecode, Sdm_11_11_1_AddressMustBeFee) {
  EXPECT_EQ(DecodeMsiRaw(0xFED00000u, 0x30).error, MsiError::kNotApicAddress);
  EXPECT_EQ(DecodeMsiRaw(0x00000000u, 0x30).error, MsiError::kNotApicAddress);
  EXPECT_EQ(DecodeMsiRaw(0xFFE00000u, 0x30).error, MsiError::kNotApicAddress);
  // A high dword without the 32-bit-ID option is another address, not the APIC window.
  EXPECT_EQ(DecodeMsiRaw(0x1'FEE00000ull, 0x30).error, MsiError::kNotApicAddress);
}

TEST(MsiDecode, Sdm_11_11_1_RemappableFormatBit4Refused) {
  EXPECT_EQ(DecodeMsiRaw(0xFEE00010u, 0x30).error, MsiError::kRemappableFormat);
}

TEST(MsiDecode, KvmExtendedDestIdBits11To5) {
  // dest = bits 19:12 | bits 11:5 << 8  (KVM_FEATURE_MSI_EXT_DEST_ID)
  const uint64_t address = 0xFEE00000u | (0x34u << 12) | (0x5Au << 5);
  auto m = DecodeMsi(address, 0x30);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->destination, 0x34u | (0x5Au << 8));
  EXPECT_TRUE(m->x2apic_destination);
  // Without the option the bits are reserved and ignored (hardware behaviour).
  auto plain = DecodeMsi(address, 0x30, MsiDecodeOptions{.extended_dest_id = false});
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->destination, 0x34u);
  EXPECT_FALSE(plain->x2apic_destination);
}

TEST(MsiDecode, Sdm_11_12_9_XapicBroadcastStaysXapicFormat) {
  auto m = DecodeMsi(0xFEEFF000u, 0x30);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->destination, 0xFFu);
  EXPECT_FALSE(m->x2apic_destination);  // so an x2APIC target still sees a broadcast
}

TEST(MsiDecode, KvmX2apic32BitIdsInHighDword) {
  MsiDecodeOptions o{.extended_dest_id = true, .x2apic_32bit_ids = true};
  auto m = DecodeMsi((0x123456ull << 32) | 0xFEE78000u, 0x30, o);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->destination, 0x12345678u);
  EXPECT_TRUE(m->x2apic_destination);
  // Both encodings at once are ambiguous.
  EXPECT_EQ(DecodeMsiRaw((1ull << 32) | 0xFEE00020u, 0x30, o).error, MsiError::kAmbiguousDestination);
  // Destination bits above 31 cannot exist.
  EXPECT_EQ(DecodeMsiRaw((0x1000000ull << 32) | 0xFEE00000u, 0x30, o).error, MsiError::kNotApicAddress);
}

TEST(MsiEncode, RoundTripsEveryField) {
  InterruptMessage m;
  m.vector = Vector(0xEC);
  m.mode = DeliveryMode::kNmi;
  m.dest_mode = DestMode::kLogical;
  m.trigger = TriggerMode::kLevel;
  m.level = true;
  m.destination = 0x1234;
  m.x2apic_destination = true;
  m.redirection_hint = true;
  auto enc = EncodeMsi(m);
  ASSERT_TRUE(enc.ok()) << enc.status();
  auto dec = DecodeMsi(enc->address, enc->data);
  ASSERT_TRUE(dec.ok());
  EXPECT_EQ(dec->vector, m.vector);
  EXPECT_EQ(dec->mode, m.mode);
  EXPECT_EQ(dec->dest_mode, m.dest_mode);
  EXPECT_EQ(dec->trigger, m.trigger);
  EXPECT_EQ(dec->level, m.level);
  EXPECT_EQ(dec->destination, m.destination);
  EXPECT_EQ(dec->redirection_hint, m.redirection_hint);
}

TEST(MsiEncode, RefusesWhatAnMsiCannotCarry) {
  InterruptMessage m;
  m.vector = Vector(0x30);
  m.mode = DeliveryMode::kStartup;
  EXPECT_FALSE(EncodeMsi(m).ok());
  m.mode = DeliveryMode::kFixed;
  m.shorthand = Shorthand::kSelf;
  EXPECT_FALSE(EncodeMsi(m).ok());
  m.shorthand = Shorthand::kNone;
  m.destination = 0x8000;  // 16 bits: beyond the 15-bit extended destination
  EXPECT_FALSE(EncodeMsi(m).ok());
  EXPECT_TRUE(EncodeMsi(m, MsiDecodeOptions{.x2apic_32bit_ids = true}).ok());
}

}  // namespace
}  // namespace aggvm::irqchip
