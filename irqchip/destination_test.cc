// Destination matching and lowest-priority arbitration, SDM vol. 3, 11.6.1, 11.6.2, 11.12.9-10.
#include "irqchip/destination.h"

#include <gtest/gtest.h>

#include <set>

namespace aggvm::irqchip {
namespace {

ApicAddressing Xapic(uint32_t id, uint8_t logical_id = 0, uint8_t dfr = kDfrFlat) {
  return ApicAddressing{ApicId(id), false, static_cast<uint32_t>(logical_id) << 24, dfr, true};
}
ApicAddressing X2apic(uint32_t id) { return ApicAddressing{ApicId(id), true, X2apicLdrFromId(ApicId(id)), 0xF, true}; }

InterruptMessage Msg(DestMode mode, uint32_t dest, bool x2apic_format = false) {
  InterruptMessage m;
  m.vector = Vector(0x40);
  m.dest_mode = mode;
  m.destination = dest;
  m.x2apic_destination = x2apic_format;
  return m;
}

TEST(Destination, Sdm_11_6_2_1_PhysicalMatchesOnlyTheId) {
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kPhysical, 3), Xapic(3)));
  EXPECT_FALSE(MatchesDestination(Msg(DestMode::kPhysical, 3), Xapic(4)));
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kPhysical, 0x1234, true), X2apic(0x1234)));
  EXPECT_FALSE(MatchesDestination(Msg(DestMode::kPhysical, 0x1234, true), X2apic(0x34)));
}

TEST(Destination, Sdm_11_6_2_1_PhysicalBroadcast) {
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kPhysical, 0xFF), Xapic(7)));
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kPhysical, 0xFFFFFFFF, true), X2apic(0x99)));
  // SDM 11.12.9: an xAPIC-format 0xFF reaches x2APIC targets as a broadcast...
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kPhysical, 0xFF, false), X2apic(0x99)));
  // ...but in an x2APIC-format message 0xFF is the x2APIC ID 255.
  EXPECT_FALSE(MatchesDestination(Msg(DestMode::kPhysical, 0xFF, true), X2apic(0x99)));
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kPhysical, 0xFF, true), X2apic(0xFF)));
}

TEST(Destination, Sdm_11_6_2_2_XapicFlatLogical) {
  // Flat model: the 8-bit logical ID is a bitmap; MDA & LDR[31:24] != 0.
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kLogical, 0x05), Xapic(0, 0x04)));
  EXPECT_FALSE(MatchesDestination(Msg(DestMode::kLogical, 0x05), Xapic(0, 0x02)));
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kLogical, 0xFF), Xapic(0, 0x80)));
}

TEST(Destination, Sdm_11_6_2_2_XapicClusterLogical) {
  // Cluster model: dest[7:4] cluster, dest[3:0] members.
  const auto a = Xapic(0, 0x21, kDfrCluster);  // cluster 2, member bit 0
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kLogical, 0x23), a));
  EXPECT_FALSE(MatchesDestination(Msg(DestMode::kLogical, 0x13), a));  // other cluster
  EXPECT_FALSE(MatchesDestination(Msg(DestMode::kLogical, 0x22), a));  // other member
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kLogical, 0xFF), a));   // broadcast to all clusters
}

TEST(Destination, Sdm_11_12_10_2_X2apicLdrDerivedFromId) {
  EXPECT_EQ(X2apicLdrFromId(ApicId(0)), 0x00000001u);
  EXPECT_EQ(X2apicLdrFromId(ApicId(0x13)), 0x00010008u);
  EXPECT_EQ(X2apicLdrFromId(ApicId(0xABCDF)), 0xABCD8000u);
}

TEST(Destination, Sdm_11_12_10_2_X2apicClusterLogical) {
  const auto a = X2apic(0x13);  // cluster 1, bit 3
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kLogical, 0x0001'0008, true), a));
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kLogical, 0x0001'FFFF, true), a));
  EXPECT_FALSE(MatchesDestination(Msg(DestMode::kLogical, 0x0002'0008, true), a));
  EXPECT_FALSE(MatchesDestination(Msg(DestMode::kLogical, 0x0001'0004, true), a));
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kLogical, 0xFFFFFFFF, true), a));
  // The LDR given by the caller is ignored in x2APIC mode: it is read-only and derived (11.12.10.2).
  auto stale = a;
  stale.ldr = 0xDEAD0000;
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kLogical, 0x0001'0008, true), stale));
}

TEST(Destination, Sdm_11_6_2_2_UndefinedDfrModelMatchesNoLogical) {
  EXPECT_FALSE(MatchesDestination(Msg(DestMode::kLogical, 0x01), Xapic(0, 0x01, 0x5)));
  EXPECT_TRUE(MatchesDestination(Msg(DestMode::kPhysical, 0x00), Xapic(0, 0x01, 0x5)));
}

TEST(Destination, Sdm_11_6_1_Shorthands) {
  InterruptMessage m = Msg(DestMode::kPhysical, 9);  // the destination field is ignored with a shorthand
  m.source = ApicId(2);
  m.shorthand = Shorthand::kSelf;
  EXPECT_TRUE(MatchesDestination(m, Xapic(2)));
  EXPECT_FALSE(MatchesDestination(m, Xapic(9)));
  m.shorthand = Shorthand::kAllIncludingSelf;
  EXPECT_TRUE(MatchesDestination(m, Xapic(2)));
  EXPECT_TRUE(MatchesDestination(m, Xapic(5)));
  m.shorthand = Shorthand::kAllExcludingSelf;
  EXPECT_FALSE(MatchesDestination(m, Xapic(2)));
  EXPECT_TRUE(MatchesDestination(m, Xapic(5)));
}

TEST(Destination, Sdm_11_6_2_4_And_11_11_1_WhichModesAreArbitrated) {
  InterruptMessage m = Msg(DestMode::kLogical, 1);
  m.mode = DeliveryMode::kLowestPriority;
  EXPECT_TRUE(IsArbitrated(m));
  m.mode = DeliveryMode::kFixed;
  EXPECT_FALSE(IsArbitrated(m));
  m.redirection_hint = true;
  EXPECT_TRUE(IsArbitrated(m));
  m.mode = DeliveryMode::kNmi;
  EXPECT_FALSE(IsArbitrated(m));
}

TEST(Destination, Sdm_11_4_7_2_DisabledApicAcceptsOnlyNmiSmiInitSipi) {
  EXPECT_TRUE(AcceptedWhileDisabled(DeliveryMode::kNmi));
  EXPECT_TRUE(AcceptedWhileDisabled(DeliveryMode::kSmi));
  EXPECT_TRUE(AcceptedWhileDisabled(DeliveryMode::kInit));
  EXPECT_TRUE(AcceptedWhileDisabled(DeliveryMode::kStartup));
  EXPECT_FALSE(AcceptedWhileDisabled(DeliveryMode::kFixed));
  EXPECT_FALSE(AcceptedWhileDisabled(DeliveryMode::kLowestPriority));
  EXPECT_FALSE(AcceptedWhileDisabled(DeliveryMode::kExtInt));
}

TEST(LowestPriorityArbiter, Sdm_11_6_2_4_LowestPriorityWins) {
  LowestPriorityArbiter a(~0u, false);
  a.Offer(0, 0x50, false);
  a.Offer(1, 0x20, false);
  a.Offer(2, 0x30, false);
  ASSERT_TRUE(a.has_winner());
  EXPECT_EQ(a.winner(), 1u);
}

TEST(LowestPriorityArbiter, Sdm_11_6_2_4_TieBreakRotatesFromLastWinner) {
  // Four tied candidates: successive arbitrations visit 0, 1, 2, 3, 0 -- not always the first set bit.
  uint32_t last = ~0u;
  std::vector<uint32_t> winners;
  for (int round = 0; round < 5; ++round) {
    LowestPriorityArbiter a(last, false);
    for (uint32_t i : {3u, 1u, 0u, 2u}) a.Offer(i, 0x10, false);  // offer order must not matter
    last = a.winner();
    winners.push_back(last);
  }
  EXPECT_EQ(winners, (std::vector<uint32_t>{0, 1, 2, 3, 0}));
  // Only tied minimum-priority candidates rotate: a higher priority one is never chosen.
  LowestPriorityArbiter b(0, false);
  b.Offer(0, 0x10, false);
  b.Offer(1, 0x20, false);
  EXPECT_EQ(b.winner(), 0u);
}

TEST(LowestPriorityArbiter, Sdm_11_6_2_4_FocusProcessorWinsOverPriority) {
  LowestPriorityArbiter a(~0u, true);
  a.Offer(0, 0x00, false);
  a.Offer(1, 0xF0, true);
  EXPECT_EQ(a.winner(), 1u);
  EXPECT_TRUE(a.won_by_focus());
  LowestPriorityArbiter off(~0u, false);  // option off: focus ignored
  off.Offer(0, 0x00, false);
  off.Offer(1, 0xF0, true);
  EXPECT_EQ(off.winner(), 0u);
  EXPECT_FALSE(off.won_by_focus());
}

TEST(LowestPriorityArbiter, NoCandidateNoWinner) {
  LowestPriorityArbiter a(~0u, true);
  EXPECT_FALSE(a.has_winner());
  EXPECT_FALSE(a.won_by_focus());
}

}  // namespace
}  // namespace aggvm::irqchip
