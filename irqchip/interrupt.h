// The interrupt message: what travels on the (virtual) system bus from an ICR write, an MSI or an IOAPIC
// redirection entry to the local APICs (SDM vol. 3, 11.6.1 ICR fields; 11.11.1-2 MSI address/data).
// Shared by LocalApic (produces it from ICR writes, accepts it), the IOAPIC and MSI decoders, and the Router.
#pragma once

#include <cstdint>

#include "common/types.h"

namespace aggvm::irqchip {

/// ICR / MSI data bits 10:8 (SDM vol. 3, 11.6.1). 3 is reserved.
enum class DeliveryMode : uint8_t {
  kFixed = 0,
  kLowestPriority = 1,
  kSmi = 2,
  kNmi = 4,
  kInit = 5,
  kStartup = 6,
  kExtInt = 7,
};
/// ICR bit 11 / MSI address bit 2.
enum class DestMode : uint8_t { kPhysical = 0, kLogical = 1 };
/// ICR bit 15 / MSI data bit 15.
enum class TriggerMode : uint8_t { kEdge = 0, kLevel = 1 };
/// ICR bits 19:18.
enum class Shorthand : uint8_t { kNone = 0, kSelf = 1, kAllIncludingSelf = 2, kAllExcludingSelf = 3 };

struct InterruptMessage {
  Vector vector{};
  DeliveryMode mode = DeliveryMode::kFixed;
  DestMode dest_mode = DestMode::kPhysical;
  TriggerMode trigger = TriggerMode::kEdge;
  bool level = true;              // ICR bit 14 (assert); only INIT level de-assert uses 0
  Shorthand shorthand = Shorthand::kNone;
  uint32_t destination = 0;       // x2APIC: 32 bits; xAPIC: 8 bits (0xFF broadcast)
  bool x2apic_destination = false;  // destination is an x2APIC (32-bit) destination; broadcast is 0xFFFFFFFF
  bool redirection_hint = false;  // MSI address bit 3
  ApicId source{};                // the sender, for shorthands (self / all excluding self)
};

/// How one local APIC is addressed: everything destination matching needs (SDM vol. 3, 11.6.2). The Router keeps
/// one per vCPU of the VM; LocalApic derives its own from its registers.
struct ApicAddressing {
  ApicId id{};
  bool x2apic = false;
  uint32_t ldr = 0;               // xAPIC: bits 31:24 logical ID; x2APIC: cluster in 31:16, bit in 15:0
  uint8_t dfr_model = 0xF;        // xAPIC DFR bits 31:28: 0xF flat, 0x0 cluster
  bool enabled = true;            // software-enabled (SVR bit 8) and globally enabled
};

}  // namespace aggvm::irqchip
