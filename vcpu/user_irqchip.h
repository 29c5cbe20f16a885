// `user` irqchip mode: the VM has no in-kernel interrupt controller (no KVM_CREATE_IRQCHIP, no split irqchip); each
// vCPU's local APIC is an irqchip::LocalApic model in this process, and interrupts enter the guest with
// KVM_INTERRUPT (api.rst: "Queues a hardware interrupt vector to be injected", only without an in-kernel LAPIC).
//
// What reaches the models:
//   - xAPIC registers: KVM_EXIT_MMIO inside the 4 KiB page at IA32_APIC_BASE (SDM vol. 3, 11.4.1) while the APIC is
//     in xAPIC mode. Only aligned 32-bit accesses are registers (11.4.1: "must be accessed using 128-bit aligned
//     loads and stores ... 32 bits"); other sizes read 0 / are ignored and counted.
//   - x2APIC registers and IA32_APIC_BASE / IA32_TSC_DEADLINE: KVM_EXIT_X86_RDMSR / WRMSR (KVM_CAP_X86_USER_SPACE_MSR
//     with reasons INVAL | UNKNOWN | FILTER; 0x800-0x8FF fail in KVM without an in-kernel LAPIC and exit as INVAL,
//     0x1B and 0x6E0 are handled by KVM itself unless the MSR filter denies them). A #GP answer of the model goes
//     back through kvm_run->msr.error = 1. Any other MSR that exits here gets #GP as KVM would give it.
//   - HLT exits to userspace (KVM_EXIT_HLT): the vCPU thread sleeps until its APIC has a deliverable interrupt (with
//     RFLAGS.IF = 1 at the HLT; a `cli; hlt` sleeps until the thread is kicked), or until the next timer expiry.
// Injection, before each KVM_RUN on the vCPU thread: if the APIC has a deliverable vector and the last exit said
// ready_for_interrupt_injection, AcknowledgeInterrupt() (IRR -> ISR) and KVM_INTERRUPT; while something stays
// pending, request_interrupt_window = 1 so that KVM exits (KVM_EXIT_IRQ_WINDOW_OPEN) as soon as the guest can take it.
//
// Routing: an ICR write (IPI) leaves the sender's APIC through its ApicSink; it is queued while the sender's APIC
// mutex is held and routed after it is released (two vCPUs sending to each other never hold two APIC locks). The
// router (Deliver) matches the message against every local APIC of this VM with LocalApic::MatchesDestination,
// accepts it on each match (fixed) or on the lowest-priority winner (irqchip::LowestPriorityArbiter, rotation
// tie-break, focus processor), then wakes the target: notify its halt wait, or kick it out of KVM_RUN through its
// VcpuThread (immediate_exit + signal) when it is in the guest. MSIs from the host take the same path
// (UserIrqchipInjector). A level-triggered EOI (the model's EoiBroadcast) is surfaced to the runner as an
// IoapicEoi exit, exactly where kernel mode reports KVM_EXIT_IOAPIC_EOI.
//
// Per-interrupt path: one mutex per LocalApic (the model is single-threaded), no allocation, no logging.
// Not modelled here (counted in UserIrqchipCounters::unsupported_events): SMI, INIT, SIPI and ExtINT deliveries;
// the guest's CR8 writes are KVM's (it keeps CR8 without an in-kernel LAPIC) and do not reach the model's TPR.
// TSC-deadline is not advertised; the one-shot / periodic timer fires when the vCPU next exits or halts.
#pragma once

#include <linux/kvm.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "common/types.h"
#include "irqchip/interrupt.h"
#include "irqchip/local_apic.h"
#include "vcpu/interrupt_injector.h"
#include "vcpu/msi.h"
#include "vcpu/vcpu_thread.h"

namespace aggvm::vcpu {

class Vm;

/// Everything the user irqchip dropped, refused or did, summed over the VM's vCPUs.
struct UserIrqchipCounters {
  uint64_t msis = 0;                // InjectMsi calls that decoded
  uint64_t bad_msis = 0;            // MSIs that did not decode (not an APIC address, reserved mode, ...)
  uint64_t ipis = 0;                // ICR sends routed
  uint64_t undelivered = 0;         // messages (IPI or MSI) that no local APIC accepted
  uint64_t injected = 0;            // KVM_INTERRUPT calls
  uint64_t nmis = 0;                // KVM_NMI calls
  uint64_t window_requests = 0;     // entries with request_interrupt_window = 1
  uint64_t halts = 0;               // HLT exits slept through in userspace
  uint64_t apic_msr_accesses = 0;   // RDMSR/WRMSR handled by a LocalApic
  uint64_t apic_mmio_accesses = 0;  // xAPIC page accesses handled by a LocalApic
  uint64_t bad_apic_mmio = 0;       // xAPIC page accesses that are not aligned 32-bit (read 0 / ignored)
  uint64_t foreign_msrs_gp = 0;     // MSR exits for MSRs that are not the APIC's: #GP injected
  uint64_t eoi_broadcasts = 0;      // level-triggered EOIs surfaced as IoapicEoi
  uint64_t unsupported_events = 0;  // SMI / INIT / SIPI / ExtINT latched by a model and dropped
};

class UserIrqchip {
 public:
  struct Options {
    uint64_t tsc_khz = 0;  // guest TSC frequency (0: the model's default), for the model's TSC arithmetic
  };
  /// MSRs that must be denied by the VM's MSR filter so that they exit to the LocalApic (KVM handles them itself
  /// otherwise): IA32_APIC_BASE and IA32_TSC_DEADLINE.
  static constexpr uint32_t kFilteredMsrs[] = {0x1B, 0x6E0};
  /// The KVM_CAP_X86_USER_SPACE_MSR reasons this mode needs.
  static constexpr uint32_t kUserSpaceMsrReasons =
      KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_FILTER;

  /// Prepares `vm` (no vCPU created yet): user-space MSR exits and the MSR filter above.
  static absl::Status ConfigureVm(Vm& vm);

  /// One LocalApic per vCPU: vCPU i has APIC ID ids[i]; the one with APIC ID 0 (if any) is the BSP. A node that runs
  /// only some of the VM's vCPUs lists only those: the router here knows only local APICs.
  UserIrqchip(std::span<const ApicId> ids, const Options& options);
  ~UserIrqchip();
  UserIrqchip(const UserIrqchip&) = delete;
  UserIrqchip& operator=(const UserIrqchip&) = delete;

  /// Connects vCPU `index` to its KVM vCPU and its thread (kicks go through the thread). Before the thread starts;
  /// both must outlive this object's use by that thread.
  void Attach(VcpuIndex index, Vcpu& vcpu, VcpuThread& thread);
  /// The hooks to give vCPU `index`'s VcpuThread.
  VcpuInterruptHooks& hooks(VcpuIndex index);

  /// The router: accepts `message` on the matching local APICs of this VM and wakes them. Any thread, no APIC lock
  /// held by the caller. Returns how many APICs accepted it (latched or coalesced into a pending IRR bit).
  uint32_t Deliver(const irqchip::InterruptMessage& message);
  /// Decodes an MSI (SDM 11.11; KVM's x2APIC convention: destination bits 31:8 in address_hi) and delivers it.
  /// Unavailable when no APIC accepted it; InvalidArgument when it does not decode.
  absl::Status InjectMsi(const MsiMessage& msi);

  [[nodiscard]] size_t num_vcpus() const { return slots_.size(); }
  [[nodiscard]] UserIrqchipCounters counters() const;
  /// A copy of vCPU `index`'s model counters (taken under its lock).
  [[nodiscard]] irqchip::LocalApicCounters apic_counters(VcpuIndex index) const;

  struct Slot;  // one vCPU's LocalApic, its lock, its halt wait and its hooks (user_irqchip.cc)

 private:
  friend struct Slot;
  struct AtomicCounters;
  /// Accepts `message` on `slot` (if it is a destination, when `check_destination`) and wakes the vCPU if that
  /// made something pending. True if accepted.
  bool AcceptOn(Slot& slot, const irqchip::InterruptMessage& message, bool check_destination);

  irqchip::MonotonicApicClock clock_;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::unique_ptr<AtomicCounters> counters_;
  std::atomic<uint32_t> last_lowest_priority_winner_{0};
};

/// `user` mode's InterruptInjector: an MSI from the host goes through the user irqchip's router.
class UserIrqchipInjector final : public InterruptInjector {
 public:
  explicit UserIrqchipInjector(UserIrqchip& chip) : chip_(chip) {}
  absl::Status InjectMsi(const MsiMessage& msi) override { return chip_.InjectMsi(msi); }

 private:
  UserIrqchip& chip_;
};

}  // namespace aggvm::vcpu
