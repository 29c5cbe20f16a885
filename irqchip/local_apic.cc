#include "irqchip/local_apic.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_format.h"
#include "irqchip/destination.h"

namespace aggvm::irqchip {

using namespace apic;  // NOLINT: register names are the vocabulary of this file

static_assert(sizeof(kvm_lapic_state::regs) == kPageSize, "kvm_lapic_state is the 1 KiB xAPIC register page");

namespace {

constexpr uint32_t kLvtPowerUp = kLvtMasked;  // SDM 11.4.7.1: LVT entries reset to masked, all else 0
constexpr uint64_t kIcrLowMask = 0xFFFFFFFFull;

// Register page word i (0..7) of a 256-bit bitmap register at `base` (ISR/TMR/IRR: 8 words, 16 bytes apart).
bool InBitmapRange(uint32_t offset, uint32_t base) { return offset >= base && offset < base + 0x80; }

uint32_t GetPage(const kvm_lapic_state& s, uint32_t off) {
  uint32_t v;
  std::memcpy(&v, s.regs + off, sizeof v);
  return v;
}
void PutPage(kvm_lapic_state& s, uint32_t off, uint32_t v) { std::memcpy(s.regs + off, &v, sizeof v); }

constexpr uint32_t LvtOffset(Lvt which) {
  switch (which) {
    case Lvt::kTimer: return kRegLvtTimer;
    case Lvt::kThermal: return kRegLvtThermal;
    case Lvt::kPmc: return kRegLvtPmc;
    case Lvt::kLint0: return kRegLvtLint0;
    case Lvt::kLint1: return kRegLvtLint1;
    case Lvt::kError: return kRegLvtError;
    case Lvt::kCmci: return kRegLvtCmci;
  }
  return kRegLvtTimer;
}

std::optional<Lvt> LvtAt(uint32_t offset) {
  for (int i = 0; i < kLvtCount; ++i) {
    if (LvtOffset(static_cast<Lvt>(i)) == offset) return static_cast<Lvt>(i);
  }
  return std::nullopt;
}

constexpr uint32_t LvtWritableCommon(Lvt which) {
  switch (which) {
    case Lvt::kTimer: return kLvtWritableTimer;
    case Lvt::kLint0:
    case Lvt::kLint1: return kLvtWritableLint;
    case Lvt::kError: return kLvtWritableError;
    default: return kLvtWritableWithMode;
  }
}

// Read-only status bits a guest writes back when it does read-modify-write; dropping them is not worth counting.
constexpr uint32_t kLvtStatusBits = kLvtDeliveryPending | kLvtRemoteIrr;

}  // namespace

LocalApic::LocalApic(const Config& config, ApicSink& sink, const ApicClock& clock)
    : config_(config), sink_(sink), clock_(clock) {
  config_.bus_cycle_ns = std::max<uint32_t>(config_.bus_cycle_ns, 1);
  config_.tsc_khz = std::max<uint64_t>(config_.tsc_khz, 1);
  config_.phys_addr_bits = std::clamp<uint32_t>(config_.phys_addr_bits, 32, 52);
  apic_base_ = kDefaultApicBaseAddress | kApicBaseEnable | (config_.bsp ? kApicBaseBsp : 0);
  PowerUpReset(/*keep_id=*/false);
}

ApicMode LocalApic::mode() const {
  if (!hw_enabled()) return ApicMode::kDisabled;
  return (apic_base_ & kApicBaseExtd) ? ApicMode::kX2Apic : ApicMode::kXApic;
}

void LocalApic::PowerUpReset(bool keep_id) {
  // SDM 11.4.7.1: IRR, ISR, TMR, ICR, LDR, TPR, timer registers zero; DFR all ones; LVTs masked; SVR 0xFF.
  if (!keep_id) {
    const uint32_t initial = config_.initial_id.value();
    id_ = ApicId(x2apic() ? initial : (initial & 0xFF));
  }
  tpr_ = 0;
  ldr_ = 0;
  dfr_ = 0xFFFFFFFF;
  svr_ = 0xFF;
  esr_ = esr_pending_ = 0;
  icr_ = 0;
  lvt_.fill(kLvtPowerUp);
  irr_.Reset();
  isr_.Reset();
  tmr_.Reset();
  timer_initial_ = 0;
  timer_divide_ = 0;
  tsc_deadline_ = 0;
  StopTimer();
  nmi_pending_ = smi_pending_ = init_pending_ = extint_pending_ = false;
  sipi_vector_.reset();
}

void LocalApic::ResetOnInit() { PowerUpReset(/*keep_id=*/true); }

uint32_t LocalApic::Version() const {
  return kVersionIntegrated | ((kLvtCount - 1u) << kVersionMaxLvtShift) |
         (config_.eoi_suppression_supported ? kVersionEoiSuppression : 0);
}

// ---------------------------------------------------------------------------------------------------------------
// Priorities (SDM 11.8.3.1, 11.6.2.4)

uint8_t LocalApic::ppr() const {
  const int isrv = isr_.Highest();
  const uint32_t isr_class = isrv < 0 ? 0 : (static_cast<uint32_t>(isrv) & 0xF0);
  if ((tpr_ & 0xF0) >= isr_class) return static_cast<uint8_t>(tpr_);
  return static_cast<uint8_t>(isr_class);
}

uint8_t LocalApic::apr() const {
  const int isrv = std::max(isr_.Highest(), 0);
  const int irrv = std::max(irr_.Highest(), 0);
  const uint32_t tpr_class = tpr_ >> 4;
  if (tpr_class >= static_cast<uint32_t>(irrv >> 4) && tpr_class > static_cast<uint32_t>(isrv >> 4)) {
    return static_cast<uint8_t>(tpr_);
  }
  return static_cast<uint8_t>(std::max({tpr_ & 0xF0, static_cast<uint32_t>(isrv) & 0xF0,
                                        static_cast<uint32_t>(irrv) & 0xF0}));
}

uint32_t LocalApic::ldr() const {
  if (x2apic()) {
    // SDM 11.12.10.2: logical x2APIC ID = cluster (ID[19:4]) << 16 | 1 << ID[3:0].
    const uint32_t id = id_.value();
    return ((id >> 4) << 16) | (1u << (id & 0xF));
  }
  return ldr_ & 0xFF000000;
}

// ---------------------------------------------------------------------------------------------------------------
// Register file

std::optional<uint32_t> LocalApic::ReadReg(uint32_t offset, bool x2, bool* write_only) {
  *write_only = false;
  if (InBitmapRange(offset, kRegIsr)) return isr_.Word(static_cast<int>((offset - kRegIsr) >> 4));
  if (InBitmapRange(offset, kRegTmr)) return tmr_.Word(static_cast<int>((offset - kRegTmr) >> 4));
  if (InBitmapRange(offset, kRegIrr)) return irr_.Word(static_cast<int>((offset - kRegIrr) >> 4));
  if (auto lvt = LvtAt(offset)) return lvt_[static_cast<int>(*lvt)];
  switch (offset) {
    case kRegId: return x2 ? id_.value() : (id_.value() << 24);
    case kRegVersion: return Version();
    case kRegTpr: return tpr_;
    case kRegApr:
      if (x2) return std::nullopt;
      return apr();
    case kRegPpr: return ppr();
    case kRegEoi: *write_only = true; return 0;
    case kRegRrd:
      if (x2) return std::nullopt;
      return 0;
    case kRegLdr: return ldr();
    case kRegDfr:
      if (x2) return std::nullopt;
      return dfr_ | 0x0FFFFFFF;
    case kRegSvr: return svr_;
    case kRegEsr: return esr_;
    case kRegIcrLow: return static_cast<uint32_t>(icr_);
    case kRegIcrHigh:
      if (x2) return std::nullopt;
      return static_cast<uint32_t>(icr_ >> 32);
    case kRegTimerInitial: return timer_initial_;
    case kRegTimerCurrent: return TimerCurrentCount();
    case kRegTimerDivide: return timer_divide_;
    case kRegSelfIpi:
      if (!x2) return std::nullopt;
      *write_only = true;
      return 0;
    default: return std::nullopt;
  }
}

LocalApic::WriteOutcome LocalApic::WriteReg(uint32_t offset, uint32_t value, bool x2) {
  if (InBitmapRange(offset, kRegIsr) || InBitmapRange(offset, kRegTmr) || InBitmapRange(offset, kRegIrr)) {
    return WriteOutcome::kReadOnly;
  }
  if (auto lvt = LvtAt(offset)) {
    uint32_t writable = LvtWritableCommon(*lvt);
    if (*lvt == Lvt::kTimer && !config_.tsc_deadline_supported) writable &= ~(2u << kLvtTimerModeShift);
    WriteLvt(*lvt, value, writable);
    return WriteOutcome::kOk;
  }
  switch (offset) {
    case kRegId:
      if (x2) return WriteOutcome::kReadOnly;  // SDM 11.12.5.1: the x2APIC ID is read-only
      if (value & 0x00FFFFFF) ++counters_.reserved_bits_ignored;
      id_ = ApicId(value >> 24);
      return WriteOutcome::kOk;
    case kRegVersion:
    case kRegPpr:
    case kRegTimerCurrent:
      return WriteOutcome::kReadOnly;
    case kRegApr:
    case kRegRrd:
      return x2 ? WriteOutcome::kReserved : WriteOutcome::kReadOnly;
    case kRegTpr:
      if (value & ~0xFFu) ++counters_.reserved_bits_ignored;
      tpr_ = value & 0xFF;
      NotifyIfDeliverable();
      return WriteOutcome::kOk;
    case kRegEoi:
      if (x2 && value != 0) return WriteOutcome::kBadValue;  // SDM 11.12.1.2: non-zero EOI write is #GP
      Eoi();
      return WriteOutcome::kOk;
    case kRegLdr:
      if (x2) return WriteOutcome::kReadOnly;  // SDM 11.12.10.2: derived from the x2APIC ID
      if (value & 0x00FFFFFF) ++counters_.reserved_bits_ignored;
      ldr_ = value & 0xFF000000;
      return WriteOutcome::kOk;
    case kRegDfr:
      if (x2) return WriteOutcome::kReserved;  // SDM 11.12.1.2: no DFR in x2APIC mode
      if ((value & 0x0FFFFFFF) != 0x0FFFFFFF) ++counters_.reserved_bits_ignored;
      dfr_ = value | 0x0FFFFFFF;  // bits 27:0 are reserved and read as ones
      return WriteOutcome::kOk;
    case kRegSvr:
      WriteSvr(value);
      return WriteOutcome::kOk;
    case kRegEsr:
      if (x2 && value != 0) return WriteOutcome::kBadValue;  // SDM 11.12.1.2: only 0 may be written
      // SDM 11.5.3: the write latches the errors detected since the last write and clears them.
      esr_ = esr_pending_;
      esr_pending_ = 0;
      return WriteOutcome::kOk;
    case kRegIcrLow:
      // x2APIC's 64-bit ICR MSR is handled in WriteMsr; this is the xAPIC register that triggers the send.
      if (value & ~kIcrLowWritable & ~kIcrDeliveryPending) ++counters_.reserved_bits_ignored;
      icr_ = (icr_ & ~kIcrLowMask) | (value & kIcrLowWritable);
      SendIcr(value & kIcrLowWritable, static_cast<uint32_t>(icr_ >> (32 + kIcrHighXApicDestShift)), false);
      return WriteOutcome::kOk;
    case kRegIcrHigh:
      if (x2) return WriteOutcome::kReserved;
      if (value & 0x00FFFFFF) ++counters_.reserved_bits_ignored;
      icr_ = (icr_ & kIcrLowMask) | (static_cast<uint64_t>(value & 0xFF000000) << 32);
      return WriteOutcome::kOk;
    case kRegTimerInitial: {
      // SDM 11.5.4.1: in TSC-deadline mode writes to the initial-count register are ignored.
      if (timer_mode() == TimerMode::kTscDeadline) return WriteOutcome::kOk;
      timer_initial_ = value;
      if (value == 0) {
        StopTimer();
      } else {
        StartCountdown(clock_.NowNs(), value);
      }
      return WriteOutcome::kOk;
    }
    case kRegTimerDivide: {
      if (value & ~kTimerDivideWritable) ++counters_.reserved_bits_ignored;
      const uint32_t remaining = TimerCurrentCount();
      timer_divide_ = value & kTimerDivideWritable;
      // The count in progress continues at the new rate.
      if (timer_armed_ && timer_mode() != TimerMode::kTscDeadline && remaining != 0) {
        StartCountdown(clock_.NowNs(), remaining);
      }
      return WriteOutcome::kOk;
    }
    case kRegSelfIpi: {
      if (!x2) return WriteOutcome::kReserved;
      if (value & ~kIcrVector) ++counters_.reserved_bits_ignored;
      // SDM 11.12.11: equivalent to an ICR write with shorthand self, fixed, edge.
      SendIcr((value & kIcrVector) | (static_cast<uint32_t>(Shorthand::kSelf) << kIcrShorthandShift), 0, true);
      // SendIcr counted it as a self IPI or an illegal vector.
      return WriteOutcome::kOk;
    }
    default:
      return WriteOutcome::kReserved;
  }
}

void LocalApic::WriteLvt(Lvt which, uint32_t value, uint32_t writable) {
  if (value & ~writable & ~kLvtStatusBits) ++counters_.reserved_bits_ignored;
  uint32_t v = value & writable;
  // SDM 11.4.7.2: while software-disabled, the mask bits are set and cannot be cleared.
  if (!software_enabled()) v |= kLvtMasked;
  const int idx = static_cast<int>(which);
  if (which == Lvt::kTimer) {
    const bool was_deadline = timer_mode() == TimerMode::kTscDeadline;
    const bool is_deadline = ((v & kLvtTimerModeMask) >> kLvtTimerModeShift) == 2;
    if (was_deadline != is_deadline) {
      // SDM 11.5.4.1: a transition between TSC-deadline and the other modes disarms the timer.
      StopTimer();
      timer_initial_ = 0;
      tsc_deadline_ = 0;
    }
  }
  lvt_[idx] = v;
}

void LocalApic::WriteSvr(uint32_t value) {
  uint32_t writable = kSvrVector | kSvrEnable | kSvrFocusDisable;
  if (config_.eoi_suppression_supported) writable |= kSvrSuppressEoiBroadcast;
  if (value & ~writable) ++counters_.reserved_bits_ignored;
  svr_ = value & writable;
  if (!software_enabled()) {
    for (auto& e : lvt_) e |= kLvtMasked;  // SDM 11.4.7.2
  }
  NotifyIfDeliverable();
}

uint32_t LocalApic::ReadMmio(uint32_t offset) {
  if (mode() != ApicMode::kXApic) {
    // SDM 11.12.1.2: the MMIO interface is not available in x2APIC mode; disabled APIC has no page.
    ++counters_.reserved_accesses;
    return 0;
  }
  bool write_only = false;
  std::optional<uint32_t> v;
  if (offset < kPageSize && (offset & 0xF) == 0) v = ReadReg(offset, false, &write_only);
  if (!v) {
    ++counters_.reserved_accesses;
    ReportError(kEsrIllegalRegister);  // SDM 11.5.3: access to a reserved register
    return 0;
  }
  if (write_only) ++counters_.writeonly_reads;
  return *v;
}

AccessResult LocalApic::WriteMmio(uint32_t offset, uint32_t value) {
  if (mode() != ApicMode::kXApic) {
    ++counters_.reserved_accesses;
    return AccessResult::kIgnored;
  }
  if (offset >= kPageSize || (offset & 0xF) != 0) {
    ++counters_.reserved_accesses;
    ReportError(kEsrIllegalRegister);
    return AccessResult::kIgnored;
  }
  switch (WriteReg(offset, value, false)) {
    case WriteOutcome::kOk: return AccessResult::kOk;
    case WriteOutcome::kReadOnly: ++counters_.readonly_writes; return AccessResult::kIgnored;
    case WriteOutcome::kBadValue: ++counters_.reserved_bits_ignored; return AccessResult::kIgnored;
    case WriteOutcome::kReserved:
      ++counters_.reserved_accesses;
      ReportError(kEsrIllegalRegister);
      return AccessResult::kIgnored;
  }
  return AccessResult::kIgnored;
}

MsrReadResult LocalApic::ReadMsr(uint32_t msr) {
  const auto gp = [this] {
    ++counters_.gp_faults;
    return MsrReadResult{AccessResult::kGeneralProtection, 0};
  };
  if (msr == kMsrApicBase) return {AccessResult::kOk, apic_base_};
  if (msr == kMsrTscDeadline) {
    if (!config_.tsc_deadline_supported) return gp();
    // SDM 11.5.4.1: reads return 0 outside TSC-deadline mode.
    return {AccessResult::kOk, timer_mode() == TimerMode::kTscDeadline ? tsc_deadline_ : 0};
  }
  if (msr < kMsrX2ApicFirst || msr > kMsrX2ApicLast) return gp();
  if (!x2apic()) {  // SDM 11.12.1.2: x2APIC MSRs #GP outside x2APIC mode
    ++counters_.reserved_accesses;
    return gp();
  }
  const uint32_t offset = (msr - kMsrX2ApicFirst) << 4;
  if (offset == kRegIcrLow) return {AccessResult::kOk, icr_};
  bool write_only = false;
  const std::optional<uint32_t> v = ReadReg(offset, true, &write_only);
  if (!v) {
    ++counters_.reserved_accesses;
    return gp();
  }
  if (write_only) {
    ++counters_.writeonly_reads;
    return gp();
  }
  return {AccessResult::kOk, *v};
}

AccessResult LocalApic::WriteMsr(uint32_t msr, uint64_t value) {
  const auto gp = [this] {
    ++counters_.gp_faults;
    return AccessResult::kGeneralProtection;
  };
  if (msr == kMsrApicBase) return SetApicBase(value);
  if (msr == kMsrTscDeadline) {
    if (!config_.tsc_deadline_supported) return gp();
    // SDM 11.5.4.1: writes are ignored outside TSC-deadline mode.
    if (hw_enabled() && timer_mode() == TimerMode::kTscDeadline) ArmTscDeadline(value);
    return AccessResult::kOk;
  }
  if (msr < kMsrX2ApicFirst || msr > kMsrX2ApicLast) return gp();
  if (!x2apic()) {
    ++counters_.reserved_accesses;
    return gp();
  }
  const uint32_t offset = (msr - kMsrX2ApicFirst) << 4;
  if (offset == kRegIcrLow) {
    // SDM 11.12.9: one 64-bit ICR, destination in bits 63:32; the write sends.
    const auto low = static_cast<uint32_t>(value);
    if (low & ~kIcrLowWritable & ~kIcrDeliveryPending) ++counters_.reserved_bits_ignored;
    icr_ = (value & ~kIcrLowMask) | (low & kIcrLowWritable);
    SendIcr(low & kIcrLowWritable, static_cast<uint32_t>(value >> 32), true);
    return AccessResult::kOk;
  }
  if (value >> 32) {  // only the ICR is 64 bits wide; the upper halves of the others are reserved
    ++counters_.reserved_bits_ignored;
    return gp();
  }
  switch (WriteReg(offset, static_cast<uint32_t>(value), true)) {
    case WriteOutcome::kOk: return AccessResult::kOk;
    case WriteOutcome::kReadOnly: ++counters_.readonly_writes; return gp();
    case WriteOutcome::kReserved: ++counters_.reserved_accesses; return gp();
    case WriteOutcome::kBadValue: ++counters_.reserved_bits_ignored; return gp();
  }
  return gp();
}

AccessResult LocalApic::SetApicBase(uint64_t value) {
  const uint64_t reserved = kApicBaseReservedLow | (~0ull << config_.phys_addr_bits) |
                            (config_.x2apic_supported ? 0 : kApicBaseExtd);
  const bool en = value & kApicBaseEnable;
  const bool extd = value & kApicBaseExtd;
  const ApicMode old_mode = mode();
  bool legal = (value & reserved) == 0 && !(extd && !en);  // EN=0, EXTD=1 is the invalid state (11.12.5)
  if (legal) {
    // SDM 11.12.5, figure 11-27: x2APIC -> xAPIC and disabled -> x2APIC are illegal.
    if (old_mode == ApicMode::kX2Apic && en && !extd) legal = false;
    if (old_mode == ApicMode::kDisabled && en && extd) legal = false;
  }
  if (!legal) {
    ++counters_.illegal_apic_base;
    ++counters_.gp_faults;
    return AccessResult::kGeneralProtection;
  }
  apic_base_ = (value & ~kApicBaseBsp) | (apic_base_ & kApicBaseBsp);  // BSP is set by the platform
  const ApicMode new_mode = mode();
  if (new_mode == old_mode) return AccessResult::kOk;  // base relocation only
  if (new_mode == ApicMode::kDisabled || old_mode == ApicMode::kDisabled) {
    // SDM 11.4.3: clearing the global enable loses all register state; re-enabling starts from power-up state.
    PowerUpReset(/*keep_id=*/false);
  } else {
    // xAPIC -> x2APIC (11.12.5.1): the ID becomes the full initial x2APIC ID, the LDR is derived from it.
    id_ = config_.initial_id;
  }
  return AccessResult::kOk;
}

// ---------------------------------------------------------------------------------------------------------------
// Interrupt flow

void LocalApic::ReportError(uint32_t esr_bit) {
  if (esr_bit == kEsrSendIllegalVector) ++counters_.send_illegal_vector;
  if (esr_bit == kEsrReceiveIllegalVector) ++counters_.receive_illegal_vector;
  const bool is_new = (esr_pending_ & esr_bit) == 0;
  esr_pending_ |= esr_bit;
  // SDM 11.5.3: a detected error raises the LVT error interrupt. Once per new error bit, never recursively
  // (an illegal vector in the LVT error entry itself would otherwise loop).
  if (is_new && !in_error_delivery_) {
    in_error_delivery_ = true;
    RaiseLvt(Lvt::kError);
    in_error_delivery_ = false;
  }
}

void LocalApic::AcceptFixed(uint8_t vector, bool level_triggered) {
  // SDM 11.8.4: TMR is set for a level-triggered interrupt and cleared for an edge one when it is accepted.
  if (level_triggered) {
    tmr_.Set(vector);
  } else {
    tmr_.Clear(vector);
  }
  if (irr_.Test(vector)) {
    ++counters_.coalesced;
    return;
  }
  irr_.Set(vector);
  ++counters_.accepted;
  NotifyIfDeliverable();
}

void LocalApic::NotifyIfDeliverable() {
  if (PendingInterrupt()) sink_.InterruptPending();
}

AcceptResult LocalApic::Accept(const InterruptMessage& msg) {
  if (!hw_enabled()) {
    ++counters_.dropped_disabled;
    return AcceptResult::kDisabled;
  }
  const uint8_t v = msg.vector.value();
  switch (msg.mode) {
    case DeliveryMode::kFixed:
    case DeliveryMode::kLowestPriority: {
      // SDM 11.4.7.2: a software-disabled APIC does not accept fixed interrupts (it still takes NMI/SMI/INIT/SIPI).
      if (!software_enabled()) {
        ++counters_.dropped_disabled;
        return AcceptResult::kDisabled;
      }
      if (v < kFirstLegalVector) {
        ReportError(kEsrReceiveIllegalVector);  // SDM 11.5.3
        return AcceptResult::kIllegalVector;
      }
      const bool was_set = irr_.Test(v);
      AcceptFixed(v, msg.trigger == TriggerMode::kLevel);
      return was_set ? AcceptResult::kCoalesced : AcceptResult::kAccepted;
    }
    case DeliveryMode::kNmi: nmi_pending_ = true; break;
    case DeliveryMode::kSmi: smi_pending_ = true; break;
    case DeliveryMode::kInit:
      // SDM 11.6.1: INIT level de-assert (level 0, trigger level) only synchronizes arbitration IDs.
      if (msg.trigger == TriggerMode::kLevel && !msg.level) return AcceptResult::kIgnored;
      init_pending_ = true;
      break;
    case DeliveryMode::kStartup: sipi_vector_ = v; break;
    case DeliveryMode::kExtInt: extint_pending_ = true; break;
    default: return AcceptResult::kIgnored;
  }
  ++counters_.accepted;
  sink_.InterruptPending();
  return AcceptResult::kAccepted;
}

void LocalApic::RaiseLvt(Lvt which) {
  if (!hw_enabled()) {
    ++counters_.dropped_disabled;
    return;
  }
  const uint32_t e = lvt_[static_cast<int>(which)];
  if (e & kLvtMasked) return;
  // Timer and error entries have no delivery-mode field: always fixed (figure 11-8).
  const uint32_t mode_bits =
      (which == Lvt::kTimer || which == Lvt::kError) ? 0 : (e & kLvtDeliveryModeMask) >> kLvtDeliveryModeShift;
  switch (static_cast<DeliveryMode>(mode_bits)) {
    case DeliveryMode::kFixed: {
      const auto vector = static_cast<uint8_t>(e & kLvtVector);
      if (vector < kFirstLegalVector) {
        ReportError(kEsrReceiveIllegalVector);  // SDM 11.5.3: applies to LVT interrupts too
        return;
      }
      // Local interrupts are taken as edge-triggered here: no remote IRR for level LINT pins.
      AcceptFixed(vector, false);
      return;
    }
    case DeliveryMode::kNmi: nmi_pending_ = true; break;
    case DeliveryMode::kSmi: smi_pending_ = true; break;
    case DeliveryMode::kInit: init_pending_ = true; break;
    case DeliveryMode::kExtInt: extint_pending_ = true; break;
    default: return;  // reserved delivery mode in the LVT entry: nothing is delivered
  }
  ++counters_.accepted;
  sink_.InterruptPending();
}

std::optional<Vector> LocalApic::PendingInterrupt() const {
  if (!hw_enabled()) return std::nullopt;
  const int irrv = irr_.Highest();
  // SDM 11.8.3.1: deliverable only if its priority class is above PPR[7:4].
  if (irrv < 0 || static_cast<uint32_t>(irrv >> 4) <= static_cast<uint32_t>(ppr() >> 4)) return std::nullopt;
  return Vector(static_cast<uint8_t>(irrv));
}

std::optional<Vector> LocalApic::AcknowledgeInterrupt() {
  const std::optional<Vector> v = PendingInterrupt();
  if (!v) return std::nullopt;
  irr_.Clear(v->value());
  isr_.Set(v->value());
  ++counters_.acknowledged;
  return v;
}

void LocalApic::Eoi() {
  const int v = isr_.Highest();
  if (v < 0) {
    ++counters_.eoi_without_isr;
    return;
  }
  const auto vec = static_cast<uint8_t>(v);
  isr_.Clear(vec);
  ++counters_.eois;
  if (tmr_.Test(vec)) {
    // SDM 11.8.5: a level-triggered EOI is broadcast to the IOAPICs unless SVR bit 12 suppresses it.
    if (svr_ & kSvrSuppressEoiBroadcast) {
      ++counters_.eoi_broadcasts_suppressed;
    } else {
      ++counters_.eoi_broadcasts;
      sink_.EoiBroadcast(Vector(vec));
    }
  }
  NotifyIfDeliverable();
}

bool LocalApic::TakeNmi() { return std::exchange(nmi_pending_, false); }
bool LocalApic::TakeSmi() { return std::exchange(smi_pending_, false); }
bool LocalApic::TakeInit() { return std::exchange(init_pending_, false); }
bool LocalApic::TakeExtInt() { return std::exchange(extint_pending_, false); }
std::optional<Vector> LocalApic::TakeSipi() {
  std::optional<Vector> v;
  if (sipi_vector_) v = Vector(*sipi_vector_);
  sipi_vector_.reset();
  return v;
}

void LocalApic::SendIcr(uint32_t low, uint32_t dest, bool x2_dest) {
  const uint32_t mode_bits = (low >> kIcrDeliveryModeShift) & 7;
  if (mode_bits == 3) {  // reserved delivery mode (11.6.1)
    ++counters_.invalid_icr;
    return;
  }
  InterruptMessage msg;
  msg.vector = Vector(static_cast<uint8_t>(low & kIcrVector));
  msg.mode = static_cast<DeliveryMode>(mode_bits);
  msg.dest_mode = (low & kIcrDestLogical) ? DestMode::kLogical : DestMode::kPhysical;
  msg.trigger = (low & kIcrTriggerLevel) ? TriggerMode::kLevel : TriggerMode::kEdge;
  msg.level = (low & kIcrLevelAssert) != 0;
  msg.shorthand = static_cast<Shorthand>((low >> kIcrShorthandShift) & 3);
  msg.destination = dest;
  msg.x2apic_destination = x2_dest;
  msg.source = id_;
  if ((msg.mode == DeliveryMode::kFixed || msg.mode == DeliveryMode::kLowestPriority) &&
      msg.vector.value() < kFirstLegalVector) {
    ReportError(kEsrSendIllegalVector);  // SDM 11.5.3: the message is not sent
    return;
  }
  if (msg.shorthand == Shorthand::kSelf) {
    ++counters_.self_ipis;
    Accept(msg);
    return;
  }
  ++counters_.ipis_sent;
  sink_.SendIpi(msg);
}

// ---------------------------------------------------------------------------------------------------------------
// Timer (SDM 11.5.4)

TimerMode LocalApic::timer_mode() const {
  return static_cast<TimerMode>((lvt_[static_cast<int>(Lvt::kTimer)] & kLvtTimerModeMask) >> kLvtTimerModeShift);
}

uint64_t LocalApic::TickNs() const {
  return static_cast<uint64_t>(config_.bus_cycle_ns) * TimerDivisor(timer_divide_);
}

void LocalApic::StartCountdown(uint64_t now, uint32_t count) {
  timer_next_ns_ = now + static_cast<uint64_t>(count) * TickNs();
  timer_armed_ = true;
}

void LocalApic::StopTimer() {
  timer_armed_ = false;
  timer_next_ns_ = 0;
}

uint64_t LocalApic::TscToNs(uint64_t tsc) const {
  // ceil(tsc * 1e6 / khz) without 128-bit arithmetic; saturates far beyond any real deadline.
  const uint64_t khz = config_.tsc_khz;
  const uint64_t whole = tsc / khz;
  if (whole > (UINT64_MAX - 1'000'000) / 1'000'000) return UINT64_MAX;
  return whole * 1'000'000 + ((tsc % khz) * 1'000'000 + khz - 1) / khz;
}

void LocalApic::ArmTscDeadline(uint64_t deadline) {
  tsc_deadline_ = deadline;
  if (deadline == 0) {  // writing 0 disarms (11.5.4.1)
    StopTimer();
    return;
  }
  timer_next_ns_ = TscToNs(deadline);
  timer_armed_ = true;
  ServiceTimer();  // a deadline in the past fires at once
}

uint32_t LocalApic::TimerCurrentCount() const {
  if (!timer_armed_ || timer_initial_ == 0 || timer_mode() == TimerMode::kTscDeadline) return 0;
  const uint64_t now = clock_.NowNs();
  const uint64_t tick = TickNs();
  uint64_t remaining;
  if (now < timer_next_ns_) {
    remaining = timer_next_ns_ - now;
  } else if (timer_mode() == TimerMode::kPeriodic) {
    const uint64_t period = static_cast<uint64_t>(timer_initial_) * tick;
    remaining = period - (now - timer_next_ns_) % period;
  } else {
    return 0;
  }
  // The count decrements at the end of each tick: round up.
  return static_cast<uint32_t>(std::min<uint64_t>(timer_initial_, (remaining + tick - 1) / tick));
}

std::optional<uint64_t> LocalApic::TimerDeadlineNs() const {
  if (!timer_armed_) return std::nullopt;
  return timer_next_ns_;
}

void LocalApic::ServiceTimer() {
  if (!timer_armed_) return;
  const uint64_t now = clock_.NowNs();
  if (now < timer_next_ns_) return;
  const TimerMode m = timer_mode();
  if (m == TimerMode::kPeriodic && timer_initial_ != 0) {
    const uint64_t period = static_cast<uint64_t>(timer_initial_) * TickNs();
    const uint64_t missed = (now - timer_next_ns_) / period;
    counters_.timer_coalesced += missed;
    timer_next_ns_ += (missed + 1) * period;
  } else {
    StopTimer();
    if (m == TimerMode::kTscDeadline) tsc_deadline_ = 0;  // the deadline MSR reads 0 after expiry
  }
  if (lvt_[static_cast<int>(Lvt::kTimer)] & kLvtMasked) {
    ++counters_.timer_masked;
    return;
  }
  ++counters_.timer_fired;
  RaiseLvt(Lvt::kTimer);
}

// ---------------------------------------------------------------------------------------------------------------
// Addressing (SDM 11.6.2)

ApicAddressing LocalApic::addressing() const {
  ApicAddressing a;
  a.id = id_;
  a.x2apic = x2apic();
  a.ldr = ldr();
  a.dfr_model = static_cast<uint8_t>(dfr_ >> 28);
  a.enabled = hw_enabled() && software_enabled();
  return a;
}

bool LocalApic::MatchesDestination(const InterruptMessage& msg) const {
  // The SDM 11.6.2 rules live in one place (irqchip/destination.h), shared with the Router.
  return hw_enabled() && irqchip::MatchesDestination(msg, addressing());
}

// ---------------------------------------------------------------------------------------------------------------
// KVM state

kvm_lapic_state LocalApic::ExportKvmState(bool x2apic_api_format) const {
  kvm_lapic_state s{};
  const bool x2 = x2apic();
  PutPage(s, kRegId, (x2 && x2apic_api_format) ? id_.value() : (id_.value() << 24));
  PutPage(s, kRegVersion, Version());
  PutPage(s, kRegTpr, tpr_);
  PutPage(s, kRegApr, x2 ? 0 : apr());
  PutPage(s, kRegPpr, ppr());
  PutPage(s, kRegLdr, ldr());
  PutPage(s, kRegDfr, dfr_ | 0x0FFFFFFF);
  PutPage(s, kRegSvr, svr_);
  for (int i = 0; i < 8; ++i) {
    const auto off = static_cast<uint32_t>(i) << 4;
    PutPage(s, kRegIsr + off, isr_.Word(i));
    PutPage(s, kRegTmr + off, tmr_.Word(i));
    PutPage(s, kRegIrr + off, irr_.Word(i));
  }
  PutPage(s, kRegEsr, esr_);
  PutPage(s, kRegIcrLow, static_cast<uint32_t>(icr_));
  PutPage(s, kRegIcrHigh, static_cast<uint32_t>(icr_ >> 32));
  for (int i = 0; i < kLvtCount; ++i) PutPage(s, LvtOffset(static_cast<Lvt>(i)), lvt_[i]);
  PutPage(s, kRegTimerInitial, timer_initial_);
  PutPage(s, kRegTimerCurrent, TimerCurrentCount());
  PutPage(s, kRegTimerDivide, timer_divide_);
  return s;
}

absl::Status LocalApic::ImportKvmState(const kvm_lapic_state& s, uint64_t apic_base, bool x2apic_api_format) {
  const uint64_t reserved = kApicBaseReservedLow | (~0ull << config_.phys_addr_bits) |
                            (config_.x2apic_supported ? 0 : kApicBaseExtd);
  if ((apic_base & reserved) != 0 || ((apic_base & kApicBaseExtd) && !(apic_base & kApicBaseEnable))) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "IA32_APIC_BASE %#x is not a legal value (reserved bits %#x, or x2APIC without global enable); pass the "
        "value read from the vCPU with KVM_GET_MSRS",
        apic_base, apic_base & reserved));
  }
  apic_base_ = apic_base;
  const bool x2 = x2apic();
  const uint32_t raw_id = GetPage(s, kRegId);
  id_ = ApicId((x2 && x2apic_api_format) ? raw_id : (raw_id >> 24));
  ldr_ = x2 ? 0 : (GetPage(s, kRegLdr) & 0xFF000000);
  dfr_ = GetPage(s, kRegDfr) | 0x0FFFFFFF;
  tpr_ = GetPage(s, kRegTpr) & 0xFF;
  uint32_t svr_writable = kSvrVector | kSvrEnable | kSvrFocusDisable;
  if (config_.eoi_suppression_supported) svr_writable |= kSvrSuppressEoiBroadcast;
  svr_ = GetPage(s, kRegSvr) & svr_writable;
  for (int i = 0; i < 8; ++i) {
    const auto off = static_cast<uint32_t>(i) << 4;
    // Vectors 0..15 can never be requested or in service (SDM 11.5.3): drop them from a foreign page, counted.
    const uint32_t legal = i == 0 ? 0xFFFF0000u : 0xFFFFFFFFu;
    const uint32_t isr = GetPage(s, kRegIsr + off);
    const uint32_t irr = GetPage(s, kRegIrr + off);
    if ((isr | irr) & ~legal) ++counters_.imported_illegal_vectors;
    isr_.SetWord(i, isr & legal);
    tmr_.SetWord(i, GetPage(s, kRegTmr + off) & legal);
    irr_.SetWord(i, irr & legal);
  }
  esr_ = GetPage(s, kRegEsr) & 0xFF;
  esr_pending_ = 0;
  const uint32_t icr_high = GetPage(s, kRegIcrHigh);
  icr_ = (static_cast<uint64_t>(x2 ? icr_high : (icr_high & 0xFF000000)) << 32) |
         (GetPage(s, kRegIcrLow) & kIcrLowWritable);
  for (int i = 0; i < kLvtCount; ++i) {
    const auto which = static_cast<Lvt>(i);
    uint32_t writable = LvtWritableCommon(which);
    if (which == Lvt::kTimer && !config_.tsc_deadline_supported) writable &= ~(2u << kLvtTimerModeShift);
    uint32_t v = GetPage(s, LvtOffset(which)) & writable;
    if (!software_enabled()) v |= kLvtMasked;
    lvt_[i] = v;
  }
  timer_divide_ = GetPage(s, kRegTimerDivide) & kTimerDivideWritable;
  timer_initial_ = GetPage(s, kRegTimerInitial);
  tsc_deadline_ = 0;
  StopTimer();
  const TimerMode tm = timer_mode();
  if (timer_initial_ != 0 && tm != TimerMode::kTscDeadline) {
    // Restart from the saved current count, as KVM_SET_LAPIC does; an expired one-shot stays expired.
    uint32_t count = GetPage(s, kRegTimerCurrent);
    if (count > timer_initial_) count = timer_initial_;
    if (count == 0 && tm == TimerMode::kPeriodic) count = timer_initial_;
    if (count != 0) StartCountdown(clock_.NowNs(), count);
  } else if (tm == TimerMode::kTscDeadline) {
    timer_initial_ = 0;
  }
  nmi_pending_ = smi_pending_ = init_pending_ = extint_pending_ = false;
  sipi_vector_.reset();
  return absl::OkStatus();
}

}  // namespace aggvm::irqchip
