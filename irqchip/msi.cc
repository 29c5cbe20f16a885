#include "irqchip/msi.h"

#include "absl/status/status.h"
#include "fmt/format.h"

namespace aggvm::irqchip {
namespace {

constexpr uint32_t kAddrDestShift = 12;          // bits 19:12
constexpr uint32_t kAddrExtDestShift = 5;        // bits 11:5
constexpr uint32_t kAddrExtDestMask = 0x7F;
constexpr uint32_t kAddrRemappable = 1u << 4;
constexpr uint32_t kAddrRedirectionHint = 1u << 3;
constexpr uint32_t kAddrDestLogical = 1u << 2;
constexpr uint32_t kDataDeliveryShift = 8;       // bits 10:8
constexpr uint32_t kDataLevel = 1u << 14;
constexpr uint32_t kDataTriggerLevel = 1u << 15;

bool IsReservedMsiDeliveryMode(uint32_t dm) { return dm == 3 || dm == 6; }

}  // namespace

const char* MsiErrorName(MsiError e) {
  switch (e) {
    case MsiError::kNone: return "none";
    case MsiError::kNotApicAddress: return "not an APIC address";
    case MsiError::kRemappableFormat: return "remappable format";
    case MsiError::kReservedDeliveryMode: return "reserved delivery mode";
    case MsiError::kAmbiguousDestination: return "ambiguous destination";
  }
  return "unknown";
}

MsiDecodeResult DecodeMsiRaw(uint64_t address, uint32_t data, const MsiDecodeOptions& options) {
  MsiDecodeResult r;
  const auto lo = static_cast<uint32_t>(address);
  const auto hi = static_cast<uint32_t>(address >> 32);
  if ((lo & kMsiAddressBaseMask) != kMsiAddressBase || (hi != 0 && !options.x2apic_32bit_ids) ||
      (hi >> 24) != 0) {
    r.error = MsiError::kNotApicAddress;
    return r;
  }
  if (lo & kAddrRemappable) {
    r.error = MsiError::kRemappableFormat;
    return r;
  }
  const uint32_t dm = (data >> kDataDeliveryShift) & 7;
  if (IsReservedMsiDeliveryMode(dm)) {
    r.error = MsiError::kReservedDeliveryMode;
    return r;
  }
  uint32_t dest = (lo >> kAddrDestShift) & 0xFF;
  const uint32_t ext = options.extended_dest_id ? (lo >> kAddrExtDestShift) & kAddrExtDestMask : 0;
  if (ext != 0 && hi != 0) {
    r.error = MsiError::kAmbiguousDestination;
    return r;
  }
  dest |= ext << 8;
  dest |= hi << 8;

  InterruptMessage& m = r.message;
  m.vector = Vector(static_cast<uint8_t>(data & 0xFF));
  m.mode = static_cast<DeliveryMode>(dm);
  m.dest_mode = (lo & kAddrDestLogical) ? DestMode::kLogical : DestMode::kPhysical;
  m.trigger = (data & kDataTriggerLevel) ? TriggerMode::kLevel : TriggerMode::kEdge;
  m.level = (data & kDataLevel) != 0;
  m.shorthand = Shorthand::kNone;
  m.destination = dest;
  m.x2apic_destination = (ext | hi) != 0;
  m.redirection_hint = (lo & kAddrRedirectionHint) != 0;
  return r;
}

absl::StatusOr<InterruptMessage> DecodeMsi(uint64_t address, uint32_t data, const MsiDecodeOptions& options) {
  MsiDecodeResult r = DecodeMsiRaw(address, data, options);
  if (r.ok()) return r.message;
  return absl::InvalidArgumentError(fmt::format(
      "MSI address {:#x} data {:#x} refused: {} (SDM vol. 3, 11.11: address must be 0xFEExxxxx with bit 4 clear, "
      "delivery mode not 3 or 6; a high address dword needs the x2APIC 32-bit-ID option)",
      address, data, MsiErrorName(r.error)));
}

absl::StatusOr<MsiMessage> EncodeMsi(const InterruptMessage& m, const MsiDecodeOptions& options) {
  const auto dm = static_cast<uint32_t>(m.mode);
  if (dm > 7 || IsReservedMsiDeliveryMode(dm)) {
    return absl::InvalidArgumentError(fmt::format("delivery mode {} cannot be sent as an MSI", dm));
  }
  if (m.shorthand != Shorthand::kNone) {
    return absl::InvalidArgumentError("an MSI has no destination shorthand");
  }
  const uint32_t dest = m.destination;
  MsiMessage out;
  uint32_t lo = kMsiAddressBase | ((dest & 0xFF) << kAddrDestShift);
  uint32_t hi = 0;
  if (dest > 0xFF) {
    if (options.x2apic_32bit_ids) {
      hi = dest >> 8;
    } else if (options.extended_dest_id && dest <= 0x7FFF) {
      lo |= (dest >> 8) << kAddrExtDestShift;
    } else {
      return absl::InvalidArgumentError(fmt::format(
          "destination {:#x} does not fit an MSI address (8 bits, 15 with the extended destination ID)", dest));
    }
  }
  if (m.redirection_hint) lo |= kAddrRedirectionHint;
  if (m.dest_mode == DestMode::kLogical) lo |= kAddrDestLogical;
  out.address = (static_cast<uint64_t>(hi) << 32) | lo;
  out.data = m.vector.value() | (dm << kDataDeliveryShift) | (m.level ? kDataLevel : 0) |
             (m.trigger == TriggerMode::kLevel ? kDataTriggerLevel : 0);
  return out;
}

}  // namespace aggvm::irqchip
