// A message-signalled interrupt as the local APICs receive it (SDM vol. 3, 11.11.1 "Message Address Register
// Format", 11.11.2 "Message Data Register Format"), plus the x2APIC extension KVM defines for destinations above 255
// (KVM_CAP_X2APIC_API with KVM_X2APIC_API_USE_32BIT_IDS: destination bits 31:8 go to address_hi bits 31:8).
#pragma once

#include <cstdint>

#include "common/types.h"

namespace aggvm::vcpu {

struct MsiMessage {
  uint32_t address_lo = 0;
  uint32_t address_hi = 0;
  uint32_t data = 0;
};

enum class MsiTrigger : uint8_t { kEdge, kLevel };

/// Fixed-delivery, physical-destination MSI for `vector` to `dest`. A level MSI sets data bit 15 (trigger) and bit 14
/// (assert); with a split irqchip its EOI exits to userspace as KVM_EXIT_IOAPIC_EOI.
constexpr MsiMessage FixedMsi(ApicId dest, Vector vector, MsiTrigger trigger = MsiTrigger::kEdge) {
  MsiMessage m;
  m.address_lo = 0xFEE00000u | ((dest.value() & 0xFFu) << 12);  // bits 19:12 destination ID, bit 2 = 0 physical
  m.address_hi = dest.value() & 0xFFFFFF00u;                     // KVM x2APIC API: destination bits 31:8
  m.data = vector.value();                                       // bits 10:8 = 000 fixed
  if (trigger == MsiTrigger::kLevel) m.data |= (1u << 15) | (1u << 14);
  return m;
}

static_assert(FixedMsi(ApicId(3), Vector(0x40)).address_lo == 0xFEE03000u);
static_assert(FixedMsi(ApicId(3), Vector(0x40), MsiTrigger::kLevel).data == 0xC040u);

}  // namespace aggvm::vcpu
