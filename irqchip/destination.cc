#include "irqchip/destination.h"

namespace aggvm::irqchip {

bool IsBroadcastFor(const InterruptMessage& m, const ApicAddressing& target) {
  if (m.destination == kX2apicBroadcast) return true;
  // 0xFF is the xAPIC broadcast. For an x2APIC target it is a broadcast only when the message is in xAPIC format
  // (IOAPIC / 8-bit MSI); in an x2APIC-format message 0xFF is a regular ID (SDM 11.12.9, KVM kvm_apic_mda).
  return m.destination == kXapicBroadcast && (!m.x2apic_destination || !target.x2apic);
}

bool MatchesDestinationField(const InterruptMessage& m, const ApicAddressing& target) {
  if (IsBroadcastFor(m, target)) return true;
  if (m.dest_mode == DestMode::kPhysical) return m.destination == target.id.value();
  if (target.x2apic) {
    const uint32_t ldr = X2apicLdrFromId(target.id);
    return (m.destination >> 16) == (ldr >> 16) && (m.destination & ldr & 0xFFFF) != 0;
  }
  const uint32_t dest = m.destination & 0xFF;
  const uint32_t logical_id = target.ldr >> 24;
  if (target.dfr_model == kDfrFlat) return (dest & logical_id) != 0;
  if (target.dfr_model == kDfrCluster) return (dest >> 4) == (logical_id >> 4) && (dest & logical_id & 0xF) != 0;
  return false;  // undefined DFR model: the APIC takes part in no logical addressing
}

bool MatchesDestination(const InterruptMessage& m, const ApicAddressing& target) {
  switch (m.shorthand) {
    case Shorthand::kNone: return MatchesDestinationField(m, target);
    case Shorthand::kSelf: return target.id == m.source;
    case Shorthand::kAllIncludingSelf: return true;
    case Shorthand::kAllExcludingSelf: return target.id != m.source;
  }
  return false;
}

bool IsArbitrated(const InterruptMessage& m) {
  return m.mode == DeliveryMode::kLowestPriority || (m.redirection_hint && m.mode == DeliveryMode::kFixed);
}

bool AcceptedWhileDisabled(DeliveryMode mode) {
  return mode == DeliveryMode::kNmi || mode == DeliveryMode::kSmi || mode == DeliveryMode::kInit ||
         mode == DeliveryMode::kStartup;
}

}  // namespace aggvm::irqchip
