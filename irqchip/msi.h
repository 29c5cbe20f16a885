// MSI address/data decoding into an InterruptMessage (SDM vol. 3, 11.11 "Message Signalled Interrupts").
//
// Address (low dword, SDM 11.11.1, Figure 11-24):
//   31:20  0xFEE            the only valid value: the local APIC window
//   19:12  destination ID   bits 7:0 of the destination
//   11:5   extended dest    bits 14:8 of the destination when the 15-bit extended destination ID is enabled (the
//                           KVM_FEATURE_MSI_EXT_DEST_ID convention; reserved 0 on hardware without it)
//    4     interrupt format 1 = VT-d remappable format: refused (this platform has no interrupt remapping)
//    3     RH               redirection hint: 1 = the message may be redirected (lowest-priority-like, 11.11.1)
//    2     DM               destination mode: 0 physical, 1 logical
//    1:0   ignored
// Address high dword (bits 63:32): must be 0, or -- with KVM's KVM_X2APIC_API_USE_32BIT_IDS convention -- bits 31:8
// of a 32-bit x2APIC destination.
// Data (SDM 11.11.2, Figure 11-25):
//   7:0 vector, 10:8 delivery mode (3 and 6 reserved), 14 level (1 assert), 15 trigger (1 level), others ignored.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "irqchip/interrupt.h"

namespace aggvm::irqchip {

inline constexpr uint32_t kMsiAddressBase = 0xFEE00000;   // address bits 31:20
inline constexpr uint32_t kMsiAddressBaseMask = 0xFFF00000;

struct MsiDecodeOptions {
  /// Address bits 11:5 carry destination bits 14:8 (15-bit extended destination ID). When false, these bits are
  /// reserved and ignored, as on hardware.
  bool extended_dest_id = true;
  /// Address bits 63:32 carry destination bits 31:8 (KVM_X2APIC_API_USE_32BIT_IDS). When false, a non-zero high
  /// dword is not an APIC address and the MSI is refused.
  bool x2apic_32bit_ids = false;
};

/// Why an MSI was refused.
enum class MsiError : uint8_t {
  kNone = 0,
  kNotApicAddress,        // address bits 31:20 != 0xFEE, or a high dword without x2apic_32bit_ids
  kRemappableFormat,      // address bit 4 set: VT-d remappable format
  kReservedDeliveryMode,  // data bits 10:8 == 3 or 6
  kAmbiguousDestination,  // both extended destination bits 11:5 and a high dword set
};
const char* MsiErrorName(MsiError e);

/// The raw result of decoding: no allocation, for the per-interrupt path. `message` is meaningful only when
/// error == kNone.
struct MsiDecodeResult {
  InterruptMessage message{};
  MsiError error = MsiError::kNone;
  [[nodiscard]] bool ok() const { return error == MsiError::kNone; }
};

/// Decodes an MSI (no allocation). The message has shorthand none, level from data bit 14, x2apic_destination set
/// when any destination bit above 7 came from the extended fields.
MsiDecodeResult DecodeMsiRaw(uint64_t address, uint32_t data, const MsiDecodeOptions& options = {});

/// Same as DecodeMsiRaw, with an InvalidArgument status naming the bad field on error.
absl::StatusOr<InterruptMessage> DecodeMsi(uint64_t address, uint32_t data, const MsiDecodeOptions& options = {});

struct MsiMessage {
  uint64_t address = 0;
  uint32_t data = 0;
};
/// The inverse of DecodeMsi for messages an MSI can express (no shorthand, delivery mode not SIPI, destination
/// below 2^15 with extended_dest_id or below 2^8 without, or any 32-bit destination with x2apic_32bit_ids).
absl::StatusOr<MsiMessage> EncodeMsi(const InterruptMessage& message, const MsiDecodeOptions& options = {});

}  // namespace aggvm::irqchip
