// One local APIC as pure logic (Intel SDM vol. 3, chapter 11): the xAPIC / x2APIC register file, IA32_APIC_BASE
// mode transitions, acceptance of interrupt messages, priority (TPR/PPR), interrupt acknowledge and EOI, the
// error status register, ICR sends and the APIC timer.
//
// No I/O and no real time: interrupt messages leave through an injected ApicSink, time comes from an injected
// ApicClock. The model is single-threaded: the owner (a vCPU thread, or the master's controller) serializes calls.
// Nothing on the per-interrupt path allocates, locks or logs. Guest mistakes never crash it: a bad register access
// is ignored (xAPIC) or answered with #GP (x2APIC MSRs, IA32_APIC_BASE) and counted in LocalApicCounters.
#pragma once

#include <linux/kvm.h>

#include <array>
#include <bit>
#include <cstdint>
#include <optional>

#include "absl/status/status.h"
#include "common/clock.h"
#include "common/types.h"
#include "irqchip/apic_regs.h"
#include "irqchip/interrupt.h"

namespace aggvm::irqchip {

/// A 256-bit vector bitmap (IRR, ISR, TMR: SDM 11.8.4). Bit v is vector v.
class VectorBitmap {
 public:
  void Set(uint8_t v) { w_[v >> 6] |= 1ull << (v & 63); }
  void Clear(uint8_t v) { w_[v >> 6] &= ~(1ull << (v & 63)); }
  [[nodiscard]] bool Test(uint8_t v) const { return (w_[v >> 6] >> (v & 63)) & 1; }
  /// The highest set vector, or -1 when empty.
  [[nodiscard]] int Highest() const {
    for (int i = 3; i >= 0; --i) {
      if (w_[i] != 0) return i * 64 + 63 - std::countl_zero(w_[i]);
    }
    return -1;
  }
  [[nodiscard]] bool Empty() const { return (w_[0] | w_[1] | w_[2] | w_[3]) == 0; }
  /// 32-bit word i (0..7) as laid out in the register page (word i covers vectors 32*i .. 32*i+31).
  [[nodiscard]] uint32_t Word(int i) const { return static_cast<uint32_t>(w_[i >> 1] >> ((i & 1) * 32)); }
  void SetWord(int i, uint32_t value) {
    const int shift = (i & 1) * 32;
    w_[i >> 1] = (w_[i >> 1] & ~(0xFFFFFFFFull << shift)) | (static_cast<uint64_t>(value) << shift);
  }
  void Reset() { w_ = {}; }
  friend bool operator==(const VectorBitmap&, const VectorBitmap&) = default;

 private:
  std::array<uint64_t, 4> w_{};
};

/// Where the APIC's side effects go. Called synchronously from inside LocalApic methods; must not call back into
/// the same LocalApic.
class ApicSink {
 public:
  virtual ~ApicSink() = default;
  /// An IPI from an ICR write (SDM 11.6.1), to be routed to its destinations. Messages with shorthand kSelf never
  /// come here (they are accepted locally); for kAllIncludingSelf the router delivers to the sender as well.
  virtual void SendIpi(const InterruptMessage& msg) = 0;
  /// EOI of a level-triggered vector (TMR bit set), to be broadcast to the IOAPICs (SDM 11.8.5), unless the
  /// guest suppressed it with SVR bit 12.
  virtual void EoiBroadcast(Vector vector) = 0;
  /// Something became pending (a deliverable fixed interrupt, NMI, SMI, INIT, SIPI or ExtINT): kick the vCPU.
  virtual void InterruptPending() = 0;
};

/// Time for the APIC timer. Injected so tests and the model run without real time.
class ApicClock {
 public:
  virtual ~ApicClock() = default;
  virtual uint64_t NowNs() const = 0;
};

/// The host's CLOCK_MONOTONIC, for a LocalApic that runs against real time (the vCPU layer).
class MonotonicApicClock : public ApicClock {
 public:
  uint64_t NowNs() const override { return MonotonicNanos(); }
};

/// What a register access did. x2APIC MSR and IA32_APIC_BASE violations are #GP (SDM 11.12.1.2, 11.12.5);
/// xAPIC MMIO never faults, bad accesses are just ignored.
enum class AccessResult : uint8_t { kOk, kIgnored, kGeneralProtection };

struct MsrReadResult {
  AccessResult result = AccessResult::kOk;
  uint64_t value = 0;
};

/// The APIC mode selected by IA32_APIC_BASE bits 11:10 (SDM 11.12.5).
enum class ApicMode : uint8_t { kDisabled, kXApic, kX2Apic };

/// Result of LocalApic::Accept.
enum class AcceptResult : uint8_t {
  kAccepted,       // latched (IRR bit, or a pending NMI/SMI/INIT/SIPI/ExtINT)
  kCoalesced,      // edge fixed interrupt whose IRR bit was already set
  kIllegalVector,  // fixed / lowest priority with vector < 16: ESR receive-illegal-vector set (11.5.3)
  kDisabled,       // APIC globally disabled, or fixed interrupt to a software-disabled APIC (11.4.7.2)
  kIgnored,        // reserved delivery mode, or INIT level de-assert (11.6.1)
};

/// Counts of everything the guest or a peer got wrong, plus activity. Plain integers: single-threaded model.
struct LocalApicCounters {
  uint64_t readonly_writes = 0;        // writes to read-only registers (ignored / #GP)
  uint64_t writeonly_reads = 0;        // reads of EOI or SELF IPI (0 / #GP)
  uint64_t reserved_accesses = 0;      // reserved offsets/MSRs, or registers absent in the current mode
  uint64_t reserved_bits_ignored = 0;  // writes with reserved bits set; the bits were dropped
  uint64_t gp_faults = 0;              // accesses answered with kGeneralProtection
  uint64_t illegal_apic_base = 0;      // rejected IA32_APIC_BASE writes (reserved bits or illegal transition)
  uint64_t send_illegal_vector = 0;    // ICR / SELF IPI sends refused for a vector < 16
  uint64_t receive_illegal_vector = 0; // accepted messages / local interrupts refused for a vector < 16
  uint64_t invalid_icr = 0;            // ICR writes with a reserved delivery mode
  uint64_t ipis_sent = 0;
  uint64_t self_ipis = 0;
  uint64_t accepted = 0;
  uint64_t coalesced = 0;
  uint64_t dropped_disabled = 0;
  uint64_t acknowledged = 0;
  uint64_t eois = 0;
  uint64_t eoi_without_isr = 0;  // EOI with an empty ISR: no effect
  uint64_t eoi_broadcasts = 0;
  uint64_t eoi_broadcasts_suppressed = 0;
  uint64_t timer_fired = 0;     // expirations delivered (or latched) through the LVT timer
  uint64_t timer_masked = 0;    // expirations while the LVT timer was masked
  uint64_t timer_coalesced = 0; // periodic expirations missed because ServiceTimer was called late
  uint64_t imported_illegal_vectors = 0;  // ImportKvmState pages with IRR/ISR bits below 16 (dropped)
};

/// The seven LVT entries (SDM 11.5.1), in KVM's order of the register page where relevant.
enum class Lvt : uint8_t { kTimer, kThermal, kPmc, kLint0, kLint1, kError, kCmci };
inline constexpr int kLvtCount = 7;

class LocalApic {
 public:
  struct Config {
    ApicId initial_id{};                  // initial (x2)APIC ID; xAPIC mode uses its low 8 bits (11.4.6)
    bool bsp = false;                     // IA32_APIC_BASE.BSP
    bool x2apic_supported = true;         // CPUID.1:ECX.x2APIC; without it IA32_APIC_BASE.EXTD is reserved
    bool eoi_suppression_supported = true;  // version bit 24; enables SVR bit 12 (11.8.5)
    bool tsc_deadline_supported = true;   // CPUID.1:ECX.TSC_Deadline; enables LVT timer mode 10b
    uint32_t phys_addr_bits = 46;         // MAXPHYADDR: IA32_APIC_BASE bits above it are reserved
    uint32_t bus_cycle_ns = 1;            // one APIC timer tick before division (KVM uses 1 ns)
    uint64_t tsc_khz = 1'000'000;         // TSC frequency, for IA32_TSC_DEADLINE (TSC = ns * khz / 1e6)
  };

  /// Starts in xAPIC mode at the default base 0xFEE00000, power-up register state (SDM 11.4.7.1).
  LocalApic(const Config& config, ApicSink& sink, const ApicClock& clock);

  // ---- Register access ----
  /// xAPIC MMIO read of the 32-bit register at `offset` (0..0xFFF) in the APIC page. Unaligned or reserved
  /// offsets read 0, set ESR "illegal register address" and are counted. Ignored unless in xAPIC mode.
  uint32_t ReadMmio(uint32_t offset);
  AccessResult WriteMmio(uint32_t offset, uint32_t value);
  /// RDMSR / WRMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE and the x2APIC MSRs 0x800..0x8FF. kGeneralProtection
  /// tells the caller to inject #GP. Other MSRs are not the APIC's: kGeneralProtection too.
  MsrReadResult ReadMsr(uint32_t msr);
  AccessResult WriteMsr(uint32_t msr, uint64_t value);
  /// IA32_APIC_BASE with the legal transitions of SDM 11.12.5 (disabled <-> xAPIC -> x2APIC -> disabled).
  /// An illegal transition or a reserved bit is kGeneralProtection and changes nothing.
  AccessResult SetApicBase(uint64_t value);
  [[nodiscard]] uint64_t apic_base() const { return apic_base_; }
  [[nodiscard]] ApicMode mode() const;

  // ---- Interrupt flow ----
  /// Accepts a message the router decided targets this APIC (SDM 11.6.1 delivery modes). Destination matching
  /// is not re-checked here; use MatchesDestination for that.
  AcceptResult Accept(const InterruptMessage& msg);
  /// Raises the local interrupt of an LVT entry (LINT0/1 pin edge, thermal, PMC, CMCI; the timer and error
  /// entries are raised internally). Respects the mask and the entry's delivery mode (11.5.1).
  void RaiseLvt(Lvt which);
  /// The highest IRR vector whose priority class is above PPR[7:4] (SDM 11.8.3.1), i.e. what the CPU would
  /// take next when interrupts are enabled.
  [[nodiscard]] std::optional<Vector> PendingInterrupt() const;
  /// INTA: moves PendingInterrupt() from IRR to ISR and returns it (11.8.4). nullopt when nothing is deliverable.
  std::optional<Vector> AcknowledgeInterrupt();
  /// An EOI write (11.8.5): clears the highest ISR bit; a level-triggered vector is broadcast through the sink.
  void Eoi();
  /// Pending non-vectored events, consumed by the vCPU layer (each returns and clears its latch).
  bool TakeNmi();
  bool TakeSmi();
  bool TakeInit();
  bool TakeExtInt();
  std::optional<Vector> TakeSipi();
  /// The register reset caused by an INIT (SDM 11.4.7.3): power-up state except the ID and IA32_APIC_BASE.
  void ResetOnInit();

  // ---- Timer (SDM 11.5.4) ----
  /// Delivers a due timer expiration (one-shot, periodic, TSC-deadline) at the clock's current time.
  void ServiceTimer();
  /// When the next expiration is due (clock nanoseconds), or nullopt when the timer is not armed.
  [[nodiscard]] std::optional<uint64_t> TimerDeadlineNs() const;

  // ---- Addressing (SDM 11.6.2) ----
  [[nodiscard]] ApicAddressing addressing() const;
  /// Whether this APIC is a destination of `msg` (physical / logical flat / cluster / x2APIC cluster, broadcast,
  /// shorthands). Lowest-priority arbitration is the router's business: every candidate matches here.
  [[nodiscard]] bool MatchesDestination(const InterruptMessage& msg) const;

  // ---- Inspection ----
  [[nodiscard]] ApicId id() const { return id_; }
  [[nodiscard]] uint8_t tpr() const { return static_cast<uint8_t>(tpr_); }
  [[nodiscard]] uint8_t ppr() const;
  [[nodiscard]] uint8_t apr() const;
  [[nodiscard]] uint32_t ldr() const;
  [[nodiscard]] uint32_t svr() const { return svr_; }
  [[nodiscard]] uint32_t esr() const { return esr_; }
  [[nodiscard]] uint32_t lvt(Lvt which) const { return lvt_[static_cast<int>(which)]; }
  [[nodiscard]] uint64_t icr() const { return icr_; }
  [[nodiscard]] uint64_t tsc_deadline() const { return tsc_deadline_; }
  [[nodiscard]] uint32_t TimerCurrentCount() const;
  [[nodiscard]] const VectorBitmap& irr() const { return irr_; }
  [[nodiscard]] const VectorBitmap& isr() const { return isr_; }
  [[nodiscard]] const VectorBitmap& tmr() const { return tmr_; }
  [[nodiscard]] bool software_enabled() const { return (svr_ & apic::kSvrEnable) != 0; }
  [[nodiscard]] const LocalApicCounters& counters() const { return counters_; }

  // ---- KVM state (struct kvm_lapic_state: the 1 KiB xAPIC register page) ----
  /// The register page as KVM_SET_LAPIC expects it. In x2APIC mode the ID register holds the full 32-bit ID when
  /// `x2apic_api_format` (KVM_CAP_X86_X2APIC_API with KVM_X2APIC_API_USE_32BIT_IDS), else ID << 24; the 64-bit
  /// ICR is split into 0x300 / 0x310 as KVM's ABI does. IA32_APIC_BASE and IA32_TSC_DEADLINE are MSRs, not part
  /// of the page: save them separately.
  [[nodiscard]] kvm_lapic_state ExportKvmState(bool x2apic_api_format = true) const;
  /// Loads a page from KVM_GET_LAPIC. `apic_base` (KVM_GET_MSRS / sregs.apic_base) selects the mode first and must
  /// be a legal value. The timer restarts from the page's current count, as KVM does. Pending NMI/SMI/INIT/SIPI
  /// latches and unreported ESR errors are cleared (KVM keeps them elsewhere). Reserved bits are dropped, as are
  /// IRR/ISR/TMR bits of the illegal vectors 0..15 (counted). PPR, APR and the version are recomputed.
  absl::Status ImportKvmState(const kvm_lapic_state& state, uint64_t apic_base, bool x2apic_api_format = true);

 private:
  bool x2apic() const { return mode() == ApicMode::kX2Apic; }
  bool hw_enabled() const { return (apic_base_ & apic::kApicBaseEnable) != 0; }
  void PowerUpReset(bool keep_id);
  uint32_t Version() const;
  /// Register read by xAPIC offset; `x2` selects the x2APIC view. nullopt: no such register in this mode.
  std::optional<uint32_t> ReadReg(uint32_t offset, bool x2, bool* write_only);
  enum class WriteOutcome : uint8_t { kOk, kReadOnly, kReserved, kBadValue };
  WriteOutcome WriteReg(uint32_t offset, uint32_t value, bool x2);
  void WriteLvt(Lvt which, uint32_t value, uint32_t writable);
  void WriteSvr(uint32_t value);
  void SendIcr(uint32_t low, uint32_t dest, bool x2_dest);
  void ReportError(uint32_t esr_bit);
  void AcceptFixed(uint8_t vector, bool level_triggered);
  void NotifyIfDeliverable();
  // Timer helpers.
  apic::TimerMode timer_mode() const;
  uint64_t TickNs() const;
  void StartCountdown(uint64_t now, uint32_t count);
  void StopTimer();
  uint64_t TscToNs(uint64_t tsc) const;
  void ArmTscDeadline(uint64_t deadline);

  Config config_;
  ApicSink& sink_;
  const ApicClock& clock_;
  uint64_t apic_base_ = 0;
  ApicId id_{};
  uint32_t tpr_ = 0;
  uint32_t ldr_ = 0;  // xAPIC logical ID (bits 31:24); in x2APIC mode derived, see ldr()
  uint32_t dfr_ = 0xFFFFFFFF;
  uint32_t svr_ = 0xFF;
  uint32_t esr_ = 0;          // the visible ESR, updated by a write (11.5.3)
  uint32_t esr_pending_ = 0;  // errors detected since the last ESR write
  uint64_t icr_ = 0;          // low 32 bits: ICR low; xAPIC: bits 63:56 destination; x2APIC: 63:32 destination
  std::array<uint32_t, kLvtCount> lvt_{};
  VectorBitmap irr_, isr_, tmr_;
  uint32_t timer_initial_ = 0;
  uint32_t timer_divide_ = 0;
  uint64_t tsc_deadline_ = 0;
  // The next expiration (countdown or TSC deadline) in clock nanoseconds, valid while timer_armed_.
  uint64_t timer_next_ns_ = 0;
  bool timer_armed_ = false;
  bool nmi_pending_ = false, smi_pending_ = false, init_pending_ = false, extint_pending_ = false;
  std::optional<uint8_t> sipi_vector_;
  bool in_error_delivery_ = false;
  LocalApicCounters counters_;
};

}  // namespace aggvm::irqchip
