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
//     RFLAGS.IF = 1 at the HLT; a `cli; hlt` sleeps until the thread is kicked), an NMI, or the next timer expiry.
//     Except when KVM itself still holds an NMI we queued (see NMI below): then the thread re-enters the guest.
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
// INIT / SIPI / NMI (SDM vol. 3, 9.4 "Multiple-Processor (MP) Initialization", 11.6.1 ICR delivery modes, 11.4.7.3
// "Local APIC State After an INIT Reset"). Each vCPU has a run state: Running, or WaitForSipi.
//   - INIT (level assert) is applied when the message is accepted, under the target's APIC lock, so that a SIPI
//     that follows it is never lost: the LocalApic resets (ResetOnInit: everything but the APIC ID and
//     IA32_APIC_BASE, so x2APIC mode is kept), and an AP enters WaitForSipi: its thread stops entering the guest
//     (it is kicked out of KVM_RUN or out of its userspace HLT and then waits in BeforeRun, where Pause / Stop still
//     reach it). The BSP (IA32_APIC_BASE.BSP) restarts at the reset vector F000:FFF0 as KVM does for it. Exits
//     still in flight from the guest context that INIT discarded are dropped.
//   - SIPI to a vCPU in WaitForSipi: the thread loads the state after INIT (real mode, CR0 = 0x60000010, EFER = 0,
//     segments base 0 / limit 0xFFFF, RFLAGS = 2, RDX = 0x600) with CS.selector = vector << 8, CS.base =
//     vector << 12 and RIP = 0 (KVM_SET_SREGS + sync regs, on its own thread before KVM_RUN; an interrupt, NMI or
//     exception KVM still held queued for the discarded context is dropped with KVM_SET_VCPU_EVENTS), then runs. A
//     SIPI to a running vCPU is ignored (counted in sipis_ignored), as on hardware.
//   - HoldUntilSipi puts a vCPU in WaitForSipi before its thread starts: an AP at power-on.
//   - NMI: latched by the model, injected with KVM_NMI before the next entry; it ends a userspace HLT (also with
//     IF = 0). An NMI accepted during WaitForSipi stays latched until the SIPI starts the vCPU. An NMI queued while
//     the guest is inside its NMI handler (NMIs blocked until IRET, SDM vol. 3, 6.7.1) stays pending in KVM; if the
//     guest IRETs and HLTs before KVM re-entered it, the HLT exits with that NMI still in KVM and nothing in the
//     model. So after a KVM_NMI (a per-vCPU flag; HLTs without one cost nothing more) a HLT exit reads
//     KVM_GET_VCPU_EVENTS: an NMI being injected, or pending and not blocked, makes the thread re-enter the guest
//     instead of sleeping (KVM's own halt rule, kvm_vcpu_has_events); counted in nmi_halt_reentries.
//   - INIT level de-assert (ICR delivery mode INIT, level 0, trigger level; Linux sends one after each INIT) resets
//     nothing (SDM 11.6.1; KVM's LAPIC ignores it): an ICR send of one is counted in init_deasserts and goes nowhere,
//     not to the RemoteIpiSink either (a forwarded message that lost its level bit would be a real INIT there);
//     Deliver ignores one too.
//   - Fixed interrupts during WaitForSipi: the APIC is software-disabled after INIT (SVR = 0xFF), so they are
//     refused by the model as on hardware.
//
// Distributed VMs (issue 6): SetRemote gives the addressing of the vCPUs that run on other nodes and the
// RemoteIpiSink that forwards. Every ICR send is classified (see RemoteIpiSink for the contract):
//   - may name a remote vCPU: physical destination equal to a remote APIC ID, a broadcast destination, the
//     all-including-self / all-excluding-self shorthands, an x2APIC logical destination whose cluster/bit matches a
//     remote x2APIC ID (the x2APIC LDR follows from the ID, SDM 11.12.10.2), or any lowest-priority message: the
//     whole message goes to the sink, nothing is delivered here.
//   - an xAPIC logical destination (flat or cluster, SDM 11.6.2.2) while some remote vCPU is not declared x2APIC:
//     the remote LDR and DFR are written by the guest on the remote node at run time and are not known here, so the
//     message cannot be routed correctly: it is dropped and counted in remote_xapic_logical_refused. A guest that
//     spans nodes must use physical destinations or x2APIC mode (Linux: x2apic, or apic=physflat).
//   - otherwise it is delivered locally by Deliver().
// Messages routed elsewhere come back in through Deliver() (fixed, lowest priority already arbitrated and turned
// into fixed, NMI, INIT, SIPI; also UserIrqchipInjector::Deliver); Deliver never calls the sink and matches only
// local APICs, so a master may hand the same whole message to every node (a shorthand excludes the sender by its
// APIC ID in message.source). The remote vCPUs' x2APIC flag is what the VM declares (all vCPUs of a guest that
// uses x2APIC run it), not tracked at run time. Priority() reports a vCPU's PPR for the master's
// lowest-priority arbitration.
//
// Per-interrupt path: one mutex per LocalApic (the model is single-threaded), no allocation, no logging; the remote
// table is fixed before the threads start and read without a lock.
// Not modelled here (counted in UserIrqchipCounters::unsupported_events): SMI and ExtINT deliveries;
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
  uint64_t unsupported_events = 0;  // SMI / ExtINT latched by a model and dropped
  uint64_t inits = 0;               // INITs applied (model reset; an AP entered WaitForSipi, the BSP restarted)
  uint64_t sipis = 0;               // SIPIs that started a vCPU waiting for one
  uint64_t sipis_ignored = 0;       // SIPIs to a vCPU that was not in WaitForSipi (ignored, as on hardware)
  uint64_t startups = 0;            // vCPU state loads done on the vCPU thread after a SIPI or a BSP INIT
  uint64_t remote_ipis = 0;         // ICR sends handed whole to the RemoteIpiSink
  uint64_t remote_xapic_logical_refused = 0;  // xAPIC logical ICR sends dropped: remote LDR/DFR unknown here
  uint64_t remote_without_sink = 0; // ICR sends that name a remote vCPU while no sink is set: dropped
  uint64_t nmi_halt_reentries = 0;  // HLT exits not slept through: KVM still held a deliverable NMI (see header)
  uint64_t init_deasserts = 0;      // ICR sends of INIT level de-assert: no effect (SDM 11.6.1), not routed
};

/// Distributed VMs (issue 6, item 2): where the user irqchip hands an IPI that may be meant for vCPUs running on
/// other nodes. Contract (implemented by UserIrqchip::SetRemote): when an ICR message can only name local APICs it
/// is delivered locally and the sink is not called; when it may name a remote vCPU (a remote physical ID, a logical
/// destination or shorthand that matches a remote vCPU, a broadcast, any lowest-priority message while remote
/// vCPUs exist) the WHOLE message goes to the sink and nothing is delivered locally — the master (or, in `direct`
/// route mode, the owner node) delivers to every destination, local ones included, so nothing arrives twice.
class RemoteIpiSink {
 public:
  virtual ~RemoteIpiSink() = default;
  /// Called on the sending vCPU's thread with no APIC lock held; `message.source` is the sender's APIC ID. Must not
  /// block or allocate.
  virtual void OnRemoteIcr(VcpuIndex source, const irqchip::InterruptMessage& message) = 0;
  /// Called on vCPU `vcpu`'s thread with no APIC lock held after the guest wrote its TPR (its priority for
  /// lowest-priority arbitration elsewhere may have changed; read it with UserIrqchip::Priority). Must not block long.
  virtual void OnTprWrite(VcpuIndex /*vcpu*/) {}
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
  /// vCPU `index` starts in WaitForSipi (an application processor at power-on, SDM 9.4): its thread does not enter
  /// the guest until a SIPI arrives (from another vCPU's ICR or through Deliver). Before its thread starts.
  void HoldUntilSipi(VcpuIndex index);
  /// True while vCPU `index` waits for a SIPI (after HoldUntilSipi or an INIT). Any thread.
  [[nodiscard]] bool WaitingForSipi(VcpuIndex index) const;

  /// Distributed VMs: `remote` is the addressing of every vCPU of the VM that runs on another node (APIC ID;
  /// x2apic = the guest runs that vCPU's APIC in x2APIC mode; ldr / dfr_model / enabled are not used, see the header
  /// comment). ICR sends that may name one of them go whole to `sink` (RemoteIpiSink contract; its `source` is the
  /// sender's index in this UserIrqchip, i.e. its position in the constructor's `ids`). Before any vCPU thread
  /// starts; `sink` must outlive the threads. An empty `remote` (the default) routes everything locally.
  void SetRemote(std::span<const irqchip::ApicAddressing> remote, RemoteIpiSink* sink);
  /// vCPU `index`'s processor priority (PPR, SDM 11.8.3.1: max(TPR, ISRV class) in 7:4), for the master's
  /// lowest-priority arbitration. Any thread (takes that APIC's lock).
  [[nodiscard]] uint8_t Priority(VcpuIndex index) const;

  /// The router: accepts `message` on the matching local APICs of this VM and wakes them. Any thread, no APIC lock
  /// held by the caller. Returns how many APICs accepted it (latched or coalesced into a pending IRR bit; a SIPI
  /// counts only where it started a vCPU). Fixed, lowest priority (arbitrated among the local APICs), NMI, INIT and
  /// SIPI messages; the destination and shorthand are matched against the local APICs only (never the sink), so a
  /// message the master routed here is delivered exactly once.
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
  /// Where an ICR send of a local vCPU goes (see the header comment).
  enum class IcrRoute : uint8_t { kLocal, kRemote, kRefusedXapicLogical };
  [[nodiscard]] IcrRoute ClassifyIcr(const irqchip::InterruptMessage& message) const;
  /// Routes one ICR send of vCPU `source` (its thread, no lock held).
  void RouteIcr(uint32_t source, const irqchip::InterruptMessage& message);
  /// vCPU `index` wrote its TPR (its thread, no lock held): tells the remote sink, if any.
  void TprWritten(uint32_t index);

  irqchip::MonotonicApicClock clock_;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::unique_ptr<AtomicCounters> counters_;
  std::atomic<uint32_t> last_lowest_priority_winner_{0};
  std::vector<irqchip::ApicAddressing> remote_;  // fixed before the threads start (SetRemote)
  bool remote_has_xapic_ = false;                // some remote vCPU is not declared x2APIC
  RemoteIpiSink* remote_sink_ = nullptr;
};

/// `user` mode's InterruptInjector: an MSI or a routed message from the host goes through the user irqchip's router.
class UserIrqchipInjector final : public InterruptInjector {
 public:
  explicit UserIrqchipInjector(UserIrqchip& chip) : chip_(chip) {}
  absl::Status InjectMsi(const MsiMessage& msi) override { return chip_.InjectMsi(msi); }
  /// Every delivery mode and shorthand, through UserIrqchip::Deliver (local APICs only).
  absl::Status Deliver(const irqchip::InterruptMessage& message) override;

 private:
  UserIrqchip& chip_;
};

}  // namespace aggvm::vcpu
