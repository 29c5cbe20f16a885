// Local APIC register map, MSR numbers and bit fields (Intel SDM vol. 3, chapter 11).
//
// xAPIC registers are 32-bit, 16-byte aligned in the 4 KiB MMIO page at IA32_APIC_BASE (SDM 11.4.1, table 11-1).
// x2APIC exposes the same registers as MSRs 0x800 + (offset >> 4) (SDM 11.12.1.2, table 11-6), except that the
// ICR becomes one 64-bit MSR, DFR/APR/RRD are gone and SELF IPI is new. KVM's `struct kvm_lapic_state` is the xAPIC
// page layout (1024 bytes, offsets 0x000..0x3FF), so the offsets below index it directly.
#pragma once

#include <cstdint>

namespace aggvm::irqchip::apic {

// ---- xAPIC MMIO offsets (SDM 11.4.1, table 11-1) ----
inline constexpr uint32_t kRegId = 0x020;       // Local APIC ID (11.4.6)
inline constexpr uint32_t kRegVersion = 0x030;  // Version (11.4.8), read-only
inline constexpr uint32_t kRegTpr = 0x080;      // Task priority (11.8.3.1)
inline constexpr uint32_t kRegApr = 0x090;      // Arbitration priority (11.6.2.4), read-only, xAPIC only
inline constexpr uint32_t kRegPpr = 0x0A0;      // Processor priority (11.8.3.1), read-only
inline constexpr uint32_t kRegEoi = 0x0B0;      // EOI (11.8.5), write-only
inline constexpr uint32_t kRegRrd = 0x0C0;      // Remote read (P6-era), read-only, xAPIC only
inline constexpr uint32_t kRegLdr = 0x0D0;      // Logical destination (11.6.2.2); read-only in x2APIC
inline constexpr uint32_t kRegDfr = 0x0E0;      // Destination format (11.6.2.2), xAPIC only
inline constexpr uint32_t kRegSvr = 0x0F0;      // Spurious-interrupt vector (11.9)
inline constexpr uint32_t kRegIsr = 0x100;      // In-service, 8 x 32 bits at 0x100..0x170 (11.8.4)
inline constexpr uint32_t kRegTmr = 0x180;      // Trigger mode, 0x180..0x1F0 (11.8.4)
inline constexpr uint32_t kRegIrr = 0x200;      // Interrupt request, 0x200..0x270 (11.8.4)
inline constexpr uint32_t kRegEsr = 0x280;      // Error status (11.5.3)
inline constexpr uint32_t kRegLvtCmci = 0x2F0;  // LVT corrected machine-check interrupt (11.5.1)
inline constexpr uint32_t kRegIcrLow = 0x300;   // Interrupt command, bits 31:0 (11.6.1)
inline constexpr uint32_t kRegIcrHigh = 0x310;  // Interrupt command, bits 63:32 (xAPIC only as a register)
inline constexpr uint32_t kRegLvtTimer = 0x320;
inline constexpr uint32_t kRegLvtThermal = 0x330;
inline constexpr uint32_t kRegLvtPmc = 0x340;
inline constexpr uint32_t kRegLvtLint0 = 0x350;
inline constexpr uint32_t kRegLvtLint1 = 0x360;
inline constexpr uint32_t kRegLvtError = 0x370;
inline constexpr uint32_t kRegTimerInitial = 0x380;  // Initial count (11.5.4)
inline constexpr uint32_t kRegTimerCurrent = 0x390;  // Current count, read-only
inline constexpr uint32_t kRegTimerDivide = 0x3E0;   // Divide configuration
inline constexpr uint32_t kRegSelfIpi = 0x3F0;       // SELF IPI (11.12.11), x2APIC only, write-only
inline constexpr uint32_t kPageSize = 0x400;         // sizeof(kvm_lapic_state::regs); offsets beyond are reserved

// ---- MSRs ----
inline constexpr uint32_t kMsrApicBase = 0x01B;     // IA32_APIC_BASE (11.4.4)
inline constexpr uint32_t kMsrTscDeadline = 0x6E0;  // IA32_TSC_DEADLINE (11.5.4.1)
inline constexpr uint32_t kMsrX2ApicFirst = 0x800;  // x2APIC register MSRs 0x800..0x8FF (11.12.1.2)
inline constexpr uint32_t kMsrX2ApicLast = 0x8FF;
/// The x2APIC MSR of an xAPIC offset (SDM 11.12.1.2: MSR = 0x800 + offset >> 4).
constexpr uint32_t X2ApicMsr(uint32_t offset) { return kMsrX2ApicFirst + (offset >> 4); }
static_assert(X2ApicMsr(kRegIcrLow) == 0x830 && X2ApicMsr(kRegSelfIpi) == 0x83F);

// ---- IA32_APIC_BASE bits (11.4.4, 11.12.1) ----
inline constexpr uint64_t kApicBaseBsp = 1ull << 8;
inline constexpr uint64_t kApicBaseExtd = 1ull << 10;  // x2APIC enable
inline constexpr uint64_t kApicBaseEnable = 1ull << 11;
inline constexpr uint64_t kApicBaseAddrMask = ~0xFFFull;
inline constexpr uint64_t kApicBaseReservedLow = 0x2FF;  // bits 7:0 and 9
inline constexpr uint64_t kDefaultApicBaseAddress = 0xFEE00000;

// ---- Version register (11.4.8) ----
inline constexpr uint32_t kVersionIntegrated = 0x14;          // integrated APIC (Pentium 4 / Xeon and later)
inline constexpr uint32_t kVersionMaxLvtShift = 16;           // bits 23:16: number of LVT entries - 1
inline constexpr uint32_t kVersionEoiSuppression = 1u << 24;  // EOI-broadcast suppression supported

// ---- SVR (11.9) ----
inline constexpr uint32_t kSvrVector = 0xFF;
inline constexpr uint32_t kSvrEnable = 1u << 8;
inline constexpr uint32_t kSvrFocusDisable = 1u << 9;
inline constexpr uint32_t kSvrSuppressEoiBroadcast = 1u << 12;

// ---- ESR bits (11.5.3, figure 11-9) ----
inline constexpr uint32_t kEsrSendChecksum = 1u << 0;
inline constexpr uint32_t kEsrReceiveChecksum = 1u << 1;
inline constexpr uint32_t kEsrSendAccept = 1u << 2;
inline constexpr uint32_t kEsrReceiveAccept = 1u << 3;
inline constexpr uint32_t kEsrRedirectableIpi = 1u << 4;
inline constexpr uint32_t kEsrSendIllegalVector = 1u << 5;
inline constexpr uint32_t kEsrReceiveIllegalVector = 1u << 6;
inline constexpr uint32_t kEsrIllegalRegister = 1u << 7;

// ---- ICR (11.6.1, figure 11-12) ----
inline constexpr uint32_t kIcrVector = 0xFF;
inline constexpr uint32_t kIcrDeliveryModeShift = 8;  // bits 10:8
inline constexpr uint32_t kIcrDestLogical = 1u << 11;
inline constexpr uint32_t kIcrDeliveryPending = 1u << 12;  // read-only delivery status
inline constexpr uint32_t kIcrLevelAssert = 1u << 14;
inline constexpr uint32_t kIcrTriggerLevel = 1u << 15;
inline constexpr uint32_t kIcrShorthandShift = 18;  // bits 19:18
inline constexpr uint32_t kIcrLowWritable = 0x000CCFFF;  // 19:18, 15:14, 11:0
inline constexpr uint32_t kIcrHighXApicDestShift = 24;  // xAPIC destination in ICR bits 63:56

// ---- LVT (11.5.1, figure 11-8) ----
inline constexpr uint32_t kLvtVector = 0xFF;
inline constexpr uint32_t kLvtDeliveryModeShift = 8;       // bits 10:8
inline constexpr uint32_t kLvtDeliveryModeMask = 0x700;
inline constexpr uint32_t kLvtDeliveryPending = 1u << 12;  // read-only
inline constexpr uint32_t kLvtPolarityLow = 1u << 13;      // LINT0/1 only
inline constexpr uint32_t kLvtRemoteIrr = 1u << 14;        // LINT0/1 only, read-only
inline constexpr uint32_t kLvtTriggerLevel = 1u << 15;     // LINT0/1 only
inline constexpr uint32_t kLvtMasked = 1u << 16;
inline constexpr uint32_t kLvtTimerModeShift = 17;  // timer only, bits 18:17
inline constexpr uint32_t kLvtTimerModeMask = 3u << 17;
/// LVT timer mode field (11.5.4, 11.5.4.1).
enum class TimerMode : uint8_t { kOneShot = 0, kPeriodic = 1, kTscDeadline = 2, kReserved = 3 };

/// Bits software may write in each LVT entry (figure 11-8). Everything else is reserved (or read-only status).
inline constexpr uint32_t kLvtWritableTimer = kLvtVector | kLvtMasked | kLvtTimerModeMask;
inline constexpr uint32_t kLvtWritableWithMode = kLvtVector | kLvtDeliveryModeMask | kLvtMasked;  // thermal, PMC, CMCI
inline constexpr uint32_t kLvtWritableLint =
    kLvtVector | kLvtDeliveryModeMask | kLvtPolarityLow | kLvtTriggerLevel | kLvtMasked;
inline constexpr uint32_t kLvtWritableError = kLvtVector | kLvtMasked;

// ---- Timer divide configuration (11.5.4, figure 11-10): bits 0, 1, 3 ----
inline constexpr uint32_t kTimerDivideWritable = 0xB;
/// Divisor encoded by the divide configuration register: 000b -> 2 ... 110b -> 128, 111b -> 1.
constexpr uint32_t TimerDivisor(uint32_t tdcr) {
  const uint32_t code = (tdcr & 3u) | ((tdcr & 8u) >> 1);
  return 1u << ((code + 1) & 7u);
}
static_assert(TimerDivisor(0x0) == 2 && TimerDivisor(0xA) == 128 && TimerDivisor(0xB) == 1);

/// The lowest legal vector of fixed and lowest-priority interrupts (SDM 11.5.3, 6.2: 0..15 are reserved).
inline constexpr uint32_t kFirstLegalVector = 16;

}  // namespace aggvm::irqchip::apic
