#include "vcpu/user_irqchip.h"

#include <sys/ioctl.h>

#include <array>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <optional>
#include <variant>

#include "absl/strings/str_cat.h"
#include "irqchip/apic_regs.h"
#include "irqchip/destination.h"
#include "irqchip/msi.h"
#include "vcpu/errno_status.h"
#include "vcpu/vcpu.h"
#include "vcpu/vm.h"

namespace aggvm::vcpu {

namespace apic = irqchip::apic;
using Disposition = VcpuInterruptHooks::Disposition;

struct UserIrqchip::AtomicCounters {
  std::atomic<uint64_t> msis{0}, bad_msis{0}, ipis{0}, undelivered{0}, injected{0}, nmis{0}, window_requests{0},
      halts{0}, apic_msr_accesses{0}, apic_mmio_accesses{0}, bad_apic_mmio{0}, foreign_msrs_gp{0}, eoi_broadcasts{0},
      unsupported_events{0}, inits{0}, sipis{0}, sipis_ignored{0}, startups{0}, remote_ipis{0},
      remote_xapic_logical_refused{0}, remote_without_sink{0}, nmi_halt_reentries{0}, init_deasserts{0};
};

namespace {

void Bump(std::atomic<uint64_t>& c) { c.fetch_add(1, std::memory_order_relaxed); }

bool IsApicMsr(uint32_t msr) {
  return msr == apic::kMsrApicBase || msr == apic::kMsrTscDeadline ||
         (msr >= apic::kMsrX2ApicFirst && msr <= apic::kMsrX2ApicLast);
}

// Where a vCPU starts after a SIPI or (the BSP) after an INIT: real mode at CS:IP, CS.base = selector << 4.
struct StartupPoint {
  uint16_t cs_selector = 0;
  uint64_t cs_base = 0;
  uint64_t rip = 0;
};

// SDM vol. 3, 9.1.1 table 9-1 "IA-32 and Intel 64 Processor States Following Power-up, Reset, or INIT".
constexpr uint64_t kCr0AfterInit = 0x60000010;  // CD | NW | ET
constexpr uint64_t kRdxAfterInit = 0x600;       // processor signature; KVM's value (family 6)
constexpr StartupPoint kResetVector{0xF000, 0xFFFF0000, 0xFFF0};

kvm_segment RealModeSegment(uint16_t selector, uint64_t base, uint8_t type, bool system_descriptor) {
  kvm_segment seg{};
  seg.base = base;
  seg.limit = 0xFFFF;
  seg.selector = selector;
  seg.type = type;
  seg.present = 1;
  seg.s = system_descriptor ? 0 : 1;
  return seg;
}

// `current` (KVM_GET_SREGS: keeps apic_base) set to the state after INIT, CS at `at`.
kvm_sregs SregsAfterInit(kvm_sregs current, const StartupPoint& at) {
  kvm_sregs s = current;
  s.cs = RealModeSegment(at.cs_selector, at.cs_base, 0xB, false);  // execute/read, accessed
  s.ds = s.es = s.fs = s.gs = s.ss = RealModeSegment(0, 0, 0x3, false);  // read/write, accessed
  s.tr = RealModeSegment(0, 0, 0xB, true);   // busy TSS
  s.ldt = RealModeSegment(0, 0, 0x2, true);  // LDT
  s.gdt = {0, 0xFFFF, {}};
  s.idt = {0, 0xFFFF, {}};
  s.cr0 = kCr0AfterInit;
  s.cr2 = s.cr3 = s.cr4 = s.cr8 = 0;
  s.efer = 0;
  std::memset(s.interrupt_bitmap, 0, sizeof s.interrupt_bitmap);
  return s;
}

// Drops what KVM still holds from the discarded guest context: a queued KVM_INTERRUPT, an injected or pending NMI,
// a pending exception (api.rst, KVM_GET/SET_VCPU_EVENTS).
absl::Status ClearQueuedEvents(const Vcpu& vcpu) {
  kvm_vcpu_events ev{};
  if (::ioctl(vcpu.fd(), KVM_GET_VCPU_EVENTS, &ev) != 0) return ErrnoStatus(errno, "KVM_GET_VCPU_EVENTS");
  ev.exception.injected = 0;
  ev.exception.pending = 0;
  ev.exception.has_error_code = 0;
  ev.interrupt.injected = 0;
  ev.interrupt.shadow = 0;
  ev.nmi.injected = 0;
  ev.nmi.pending = 0;
  ev.nmi.masked = 0;
  ev.flags = KVM_VCPUEVENT_VALID_NMI_PENDING;
  if (::ioctl(vcpu.fd(), KVM_SET_VCPU_EVENTS, &ev) != 0) return ErrnoStatus(errno, "KVM_SET_VCPU_EVENTS");
  return absl::OkStatus();
}

}  // namespace

// One vCPU's local APIC and everything that touches it. `mu` guards the model and every field marked (mu).
struct UserIrqchip::Slot final : irqchip::ApicSink, VcpuInterruptHooks {
  // An ICR write sends at most one IPI; the outbox only has to hold the messages of one register access.
  static constexpr size_t kOutboxSize = 4;

  Slot(UserIrqchip& c, uint32_t i, const irqchip::LocalApic::Config& config)
      : chip(c), index(i), apic(config, *this, c.clock_) {}

  // ---- irqchip::ApicSink: called by `apic` with `mu` held ----
  void SendIpi(const irqchip::InterruptMessage& msg) override {
    if (outbox_count < kOutboxSize) {
      outbox[outbox_count++] = msg;
    } else {
      Bump(chip.counters_->undelivered);
    }
  }
  void EoiBroadcast(Vector vector) override { eoi_broadcast = vector; }
  void InterruptPending() override { became_pending = true; }

  // ---- VcpuInterruptHooks: vCPU thread (Wake: any thread) ----
  absl::Status BeforeRun() override {
    // Run state first (INIT / SIPI, see the header). Waiting happens before in_run is set: a router that makes a
    // waiting vCPU runnable notifies `cv` (parked) instead of kicking.
    std::optional<StartupPoint> startup;
    {
      std::unique_lock l(mu);
      TakeLatchedLocked();
      if (flush_before_startup && run_state != RunState::kRunning) {
        // One KVM_RUN with immediate_exit completes the MMIO / PIO / MSR access of the discarded context (KVM does
        // that before it looks at immediate_exit): after it nothing rewrites the registers we load next.
        flush_before_startup = false;
        l.unlock();
        vcpu->SetImmediateExit(true);
        return absl::OkStatus();
      }
      while (run_state == RunState::kWaitForSipi && !wake) {
        parked = true;
        cv.wait(l);
      }
      parked = false;
      if (run_state == RunState::kWaitForSipi) {
        // Kicked (pause, stop, ...): let the VcpuThread loop look at its command without entering the guest; the
        // immediate_exit makes this KVM_RUN a Kicked exit. A stale wake costs one such round.
        wake = false;
        l.unlock();
        vcpu->SetImmediateExit(true);
        return absl::OkStatus();
      }
      if (run_state == RunState::kStartup) {
        startup = startup_point;
        run_state = RunState::kRunning;
        discard_exits.store(false, std::memory_order_relaxed);  // read only by this thread, in OnExit
      }
    }
    if (startup.has_value()) {
      if (absl::Status s = LoadStartupState(*startup); !s.ok()) return s;
    }
    // in_run first (seq_cst), then the check under `mu`: a router that accepts after our check sees in_run and
    // kicks; one that accepted before it is seen by the check (see AcceptOn).
    in_run.store(true, std::memory_order_seq_cst);
    std::optional<Vector> inject;
    bool nmi = false;
    bool window = false;
    {
      std::lock_guard l(mu);
      wake = false;
      TakeLatchedLocked();
      if (run_state != RunState::kRunning) {
        // An INIT landed between the two locked sections: enter with immediate_exit, the next BeforeRun handles it.
        in_run.store(false, std::memory_order_relaxed);
        vcpu->SetImmediateExit(true);
        return absl::OkStatus();
      }
      apic.ServiceTimer();
      nmi = apic.TakeNmi() || std::exchange(nmi_latched, false);
      if (apic.PendingInterrupt().has_value()) {
        // The last exit's ready_for_interrupt_injection is stale once we queued a vector ourselves.
        if (vcpu->ready_for_interrupt_injection() && !queued) inject = apic.AcknowledgeInterrupt();
        window = apic.PendingInterrupt().has_value() || !inject.has_value();
      }
    }
    vcpu->RequestInterruptWindow(window);
    if (window) Bump(chip.counters_->window_requests);
    if (nmi) {
      if (absl::Status s = vcpu->Nmi(); !s.ok()) return s;
      nmi_in_kvm = true;  // OnHlt asks KVM whether it still holds it
      Bump(chip.counters_->nmis);
    }
    if (inject.has_value()) {
      if (absl::Status s = vcpu->Interrupt(*inject); !s.ok()) return s;
      queued = true;
      Bump(chip.counters_->injected);
    }
    return absl::OkStatus();
  }

  void AfterRun() override {
    in_run.store(false, std::memory_order_seq_cst);
    // KVM reports through ready_for_interrupt_injection whether our queued vector is still waiting (0 then).
    queued = false;
  }

  Disposition OnExit(VcpuExit& exit) override {
    // The guest context an INIT discarded: its last exits are dropped (no #GP, no IPI, no I/O reaches the runner).
    if (discard_exits.load(std::memory_order_relaxed)) return Disposition::kHandled;
    if (auto* rd = std::get_if<MsrRead>(&exit)) return OnMsrRead(*rd);
    if (auto* wr = std::get_if<MsrWrite>(&exit)) return OnMsrWrite(exit, *wr);
    if (auto* mr = std::get_if<MmioRead>(&exit)) return OnMmioRead(*mr);
    if (auto* mw = std::get_if<MmioWrite>(&exit)) return OnMmioWrite(exit, *mw);
    if (std::holds_alternative<Hlt>(exit)) return OnHlt();
    if (std::holds_alternative<IrqWindowOpen>(exit)) return Disposition::kHandled;  // BeforeRun injects
    return Disposition::kPass;
  }

  void Wake() override {
    {
      std::lock_guard l(mu);
      wake = true;
    }
    cv.notify_all();
  }

  // ---- exits ----
  Disposition OnMsrRead(const MsrRead& rd) {
    if (!IsApicMsr(rd.index)) {
      Bump(chip.counters_->foreign_msrs_gp);
      rd.InjectGp();
      return Disposition::kHandled;
    }
    irqchip::MsrReadResult r;
    {
      std::lock_guard l(mu);
      r = apic.ReadMsr(rd.index);
    }
    Bump(chip.counters_->apic_msr_accesses);
    if (r.result == irqchip::AccessResult::kGeneralProtection) {
      rd.InjectGp();
    } else {
      rd.Reply(r.value);
    }
    return Disposition::kHandled;
  }

  Disposition OnMsrWrite(VcpuExit& exit, const MsrWrite& wr) {
    if (!IsApicMsr(wr.index)) {
      Bump(chip.counters_->foreign_msrs_gp);
      wr.InjectGp();
      return Disposition::kHandled;
    }
    irqchip::AccessResult r;
    {
      std::lock_guard l(mu);
      r = apic.WriteMsr(wr.index, wr.value);
      TakeEffectsLocked();
    }
    Bump(chip.counters_->apic_msr_accesses);
    if (r == irqchip::AccessResult::kGeneralProtection) {
      wr.InjectGp();
    } else if (wr.index == apic::X2ApicMsr(apic::kRegTpr)) {
      chip.TprWritten(index);
    }
    return RouteEffects(exit);
  }

  std::optional<uint32_t> ApicPageOffset(GuestAddress gpa, size_t len) {
    // Called with `mu` held. The page exists only in xAPIC mode (in x2APIC mode MMIO to it is not the APIC's,
    // SDM 11.12.1.2).
    if (apic.mode() != irqchip::ApicMode::kXApic) return std::nullopt;
    const uint64_t base = apic.apic_base() & apic::kApicBaseAddrMask;
    if (gpa.raw() < base || gpa.raw() - base >= 0x1000 || len > 0x1000 - (gpa.raw() - base)) return std::nullopt;
    return static_cast<uint32_t>(gpa.raw() - base);
  }

  Disposition OnMmioRead(const MmioRead& mr) {
    std::unique_lock l(mu);
    const auto offset = ApicPageOffset(mr.gpa, mr.data.size());
    if (!offset) return Disposition::kPass;
    if (mr.data.size() != 4) {
      l.unlock();
      std::memset(mr.data.data(), 0, mr.data.size());
      Bump(chip.counters_->bad_apic_mmio);
      return Disposition::kHandled;
    }
    const uint32_t v = apic.ReadMmio(*offset);
    l.unlock();
    std::memcpy(mr.data.data(), &v, 4);
    Bump(chip.counters_->apic_mmio_accesses);
    return Disposition::kHandled;
  }

  Disposition OnMmioWrite(VcpuExit& exit, const MmioWrite& mw) {
    bool tpr = false;
    {
      std::lock_guard l(mu);
      const auto offset = ApicPageOffset(mw.gpa, mw.data.size());
      if (!offset) return Disposition::kPass;
      if (mw.data.size() != 4) {
        Bump(chip.counters_->bad_apic_mmio);
        return Disposition::kHandled;
      }
      uint32_t v;
      std::memcpy(&v, mw.data.data(), 4);
      (void)apic.WriteMmio(*offset, v);  // xAPIC never faults; the model counts what it ignored
      TakeEffectsLocked();
      tpr = *offset == apic::kRegTpr;
    }
    Bump(chip.counters_->apic_mmio_accesses);
    if (tpr) chip.TprWritten(index);
    return RouteEffects(exit);
  }

  Disposition OnHlt() {
    // An NMI we queued with KVM_NMI may still be in KVM: it arrived while the guest's NMI handler ran (NMIs blocked
    // until IRET, SDM vol. 3, 6.7.1), and the guest's IRET and then this HLT came before KVM entered the guest again
    // to inject it. KVM exits on HLT without an in-kernel LAPIC whatever it holds (x86.c, __kvm_emulate_halt), and
    // our model has nothing pending: sleeping here would lose the NMI. Re-enter instead; KVM injects it, and the
    // guest's handler returns to the instruction after the HLT, as on a halted CPU (SDM vol. 2A, HLT: an NMI resumes
    // execution whatever IF says). Only after a KVM_NMI: the common HLT costs nothing more.
    if (nmi_in_kvm && KvmHoldsDeliverableNmi()) {
      Bump(chip.counters_->nmi_halt_reentries);
      return Disposition::kHandled;
    }
    Bump(chip.counters_->halts);
    // RIP is past the HLT. Only an interrupt the guest can take ends the halt (with IF = 0 it sleeps until a
    // command kicks the thread); a kick (Wake) hands the thread back to the VcpuThread loop.
    const bool interruptible = vcpu->interrupt_flag();
    std::unique_lock l(mu);
    halted = true;
    for (;;) {
      apic.ServiceTimer();
      TakeLatchedLocked();
      if (apic.TakeNmi()) nmi_latched = true;  // an NMI ends a halt whatever IF says
      if (wake || nmi_latched || run_state != RunState::kRunning ||
          (interruptible && apic.PendingInterrupt().has_value())) {
        break;
      }
      if (const auto deadline = apic.TimerDeadlineNs()) {
        const uint64_t now = chip.clock_.NowNs();
        if (*deadline > now) cv.wait_for(l, std::chrono::nanoseconds(*deadline - now));
      } else {
        cv.wait(l);
      }
    }
    halted = false;
    return Disposition::kHandled;
  }

  // vCPU thread, after a KVM_NMI (nmi_in_kvm): true if KVM still holds an NMI the guest can take now — being
  // injected, or pending while NMIs are not blocked. The rule of KVM's own halt with an in-kernel LAPIC
  // (kvm_vcpu_has_events: nmi_pending && nmi_allowed). Pending while blocked (the guest halted inside its NMI handler)
  // stays in KVM until the guest's IRET, which only an interrupt can bring now: the halt sleeps, as on hardware.
  // Once KVM holds none, nmi_in_kvm is cleared. KVM_GET_VCPU_EVENTS first moves KVM_NMI's queue into nmi.pending
  // (process_nmi), so a just-queued NMI is seen.
  bool KvmHoldsDeliverableNmi() {
    kvm_vcpu_events ev{};
    if (::ioctl(vcpu->fd(), KVM_GET_VCPU_EVENTS, &ev) != 0) {
      // Cannot tell: re-enter once (KVM injects what it holds), then halt normally on the next HLT.
      nmi_in_kvm = false;
      return true;
    }
    if (ev.nmi.injected != 0 || (ev.nmi.pending != 0 && ev.nmi.masked == 0)) return true;
    if (ev.nmi.pending == 0) nmi_in_kvm = false;
    return false;
  }

  // ---- INIT / SIPI ----
  // `mu` held. Applies an INIT the model latched (SDM 9.4, 11.4.7.3).
  void ApplyInitLocked() {
    apic.ResetOnInit();
    nmi_latched = false;
    flush_before_startup = true;
    discard_exits.store(true, std::memory_order_relaxed);
    if ((apic.apic_base() & apic::kApicBaseBsp) != 0) {
      run_state = RunState::kStartup;  // the BSP restarts at the reset vector (KVM: kvm_apic_accept_events)
      startup_point = kResetVector;
    } else {
      run_state = RunState::kWaitForSipi;
    }
    Bump(chip.counters_->inits);
  }

  // `mu` held. A SIPI the model latched: starts a vCPU in WaitForSipi; ignored otherwise. True if it started one.
  bool ApplySipiLocked(Vector vector) {
    if (run_state != RunState::kWaitForSipi) {
      Bump(chip.counters_->sipis_ignored);
      return false;
    }
    run_state = RunState::kStartup;
    startup_point = {static_cast<uint16_t>(vector.value() << 8), static_cast<uint64_t>(vector.value()) << 12, 0};
    Bump(chip.counters_->sipis);
    return true;
  }

  // `mu` held: the non-vectored events the model latched that change the run state or are not modelled.
  // Returns true if the run state changed.
  bool TakeLatchedLocked() {
    bool changed = false;
    if (apic.TakeInit()) {
      ApplyInitLocked();
      changed = true;
    }
    if (const std::optional<Vector> v = apic.TakeSipi()) changed |= ApplySipiLocked(*v);
    uint64_t n = 0;
    n += apic.TakeSmi();
    n += apic.TakeExtInt();
    if (n != 0) chip.counters_->unsupported_events.fetch_add(n, std::memory_order_relaxed);
    return changed;
  }

  // vCPU thread, no lock: the register state after INIT with CS:IP at `at` (SDM 9.1.1 table 9-1).
  absl::Status LoadStartupState(const StartupPoint& at) {
    auto sregs = vcpu->GetSregs();
    if (!sregs.ok()) return sregs.status();
    if (absl::Status s = vcpu->SetSregs(SregsAfterInit(*sregs, at)); !s.ok()) return s;
    if (absl::Status s = ClearQueuedEvents(*vcpu); !s.ok()) return s;
    kvm_regs regs{};
    regs.rip = at.rip;
    regs.rflags = 0x2;
    regs.rdx = kRdxAfterInit;
    vcpu->StageRegs(regs);
    queued = false;
    nmi_in_kvm = false;  // ClearQueuedEvents dropped it
    Bump(chip.counters_->startups);
    return absl::OkStatus();
  }

  // ---- effects ----
  void TakeEffectsLocked() {  // `mu` held: move the sink's outputs out of the lock's scope
    pending_out_count = outbox_count;
    for (size_t i = 0; i < outbox_count; ++i) pending_out[i] = outbox[i];
    outbox_count = 0;
    pending_eoi = eoi_broadcast;
    eoi_broadcast.reset();
  }

  // vCPU thread, no lock held: route the IPIs of the last register access; an EOI broadcast becomes IoapicEoi.
  Disposition RouteEffects(VcpuExit& exit) {
    for (size_t i = 0; i < pending_out_count; ++i) chip.RouteIcr(index, pending_out[i]);
    pending_out_count = 0;
    if (pending_eoi.has_value()) {
      Bump(chip.counters_->eoi_broadcasts);
      exit = IoapicEoi{*pending_eoi};
      pending_eoi.reset();
      return Disposition::kPass;
    }
    return Disposition::kHandled;
  }

  UserIrqchip& chip;
  const uint32_t index;
  Vcpu* vcpu = nullptr;
  VcpuThread* thread = nullptr;
  mutable std::mutex mu;
  std::condition_variable cv;
  irqchip::LocalApic apic;                                 // (mu)
  bool halted = false;                                     // (mu) sleeping in OnHlt
  bool parked = false;                                     // (mu) waiting for a SIPI in BeforeRun
  enum class RunState : uint8_t { kRunning, kWaitForSipi, kStartup };
  RunState run_state = RunState::kRunning;                 // (mu) kStartup: load startup_point, then run
  StartupPoint startup_point;                              // (mu)
  bool flush_before_startup = false;                       // (mu) INIT seen; flush the old context's exit first
  bool nmi_latched = false;                                // (mu) NMI taken from the model by OnHlt, to inject
  std::atomic<bool> discard_exits{false};                  // INIT discarded the running context (see OnExit)
  bool wake = false;                                       // (mu) Wake() since the last BeforeRun
  bool became_pending = false;                             // (mu) set by InterruptPending
  std::array<irqchip::InterruptMessage, kOutboxSize> outbox{};  // (mu)
  size_t outbox_count = 0;                                 // (mu)
  std::optional<Vector> eoi_broadcast;                     // (mu)
  std::atomic<bool> in_run{false};                         // between BeforeRun and AfterRun
  // vCPU thread only:
  bool queued = false;  // KVM_INTERRUPT done since the last exit
  bool nmi_in_kvm = false;  // KVM_NMI done, not yet seen delivered (KvmHoldsDeliverableNmi)
  std::array<irqchip::InterruptMessage, kOutboxSize> pending_out{};
  size_t pending_out_count = 0;
  std::optional<Vector> pending_eoi;
};

absl::Status UserIrqchip::ConfigureVm(Vm& vm) {
  if (absl::Status s = vm.EnableUserSpaceMsr(kUserSpaceMsrReasons); !s.ok()) return s;
  return vm.DenyMsrs(kFilteredMsrs);
}

UserIrqchip::UserIrqchip(std::span<const ApicId> ids, const Options& options)
    : counters_(std::make_unique<AtomicCounters>()) {
  slots_.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    irqchip::LocalApic::Config c;
    c.initial_id = ids[i];
    c.bsp = ids[i].value() == 0;  // APIC ID 0 is the BSP (a node may run only some vCPUs of the VM)
    c.x2apic_supported = true;
    c.tsc_deadline_supported = false;  // not advertised in CPUID in this mode (see the header)
    if (options.tsc_khz != 0) c.tsc_khz = options.tsc_khz;
    slots_.push_back(std::make_unique<Slot>(*this, static_cast<uint32_t>(i), c));
  }
}

UserIrqchip::~UserIrqchip() = default;

void UserIrqchip::Attach(VcpuIndex index, Vcpu& vcpu, VcpuThread& thread) {
  Slot& s = *slots_.at(index.value());
  s.vcpu = &vcpu;
  s.thread = &thread;
}

VcpuInterruptHooks& UserIrqchip::hooks(VcpuIndex index) { return *slots_.at(index.value()); }

void UserIrqchip::HoldUntilSipi(VcpuIndex index) {
  Slot& s = *slots_.at(index.value());
  std::lock_guard l(s.mu);
  s.run_state = Slot::RunState::kWaitForSipi;
  s.flush_before_startup = false;  // never ran: no exit to complete
}

bool UserIrqchip::WaitingForSipi(VcpuIndex index) const {
  const Slot& s = *slots_.at(index.value());
  std::lock_guard l(s.mu);
  return s.run_state == Slot::RunState::kWaitForSipi;
}

void UserIrqchip::SetRemote(std::span<const irqchip::ApicAddressing> remote, RemoteIpiSink* sink) {
  remote_.assign(remote.begin(), remote.end());
  remote_has_xapic_ = false;
  for (const auto& r : remote_) remote_has_xapic_ |= !r.x2apic;
  remote_sink_ = sink;
}

void UserIrqchip::TprWritten(uint32_t index) {
  if (remote_sink_ != nullptr) remote_sink_->OnTprWrite(VcpuIndex(index));
}

uint8_t UserIrqchip::Priority(VcpuIndex index) const {
  const Slot& s = *slots_.at(index.value());
  std::lock_guard l(s.mu);
  return s.apic.ppr();
}

UserIrqchip::IcrRoute UserIrqchip::ClassifyIcr(const irqchip::InterruptMessage& m) const {
  if (remote_.empty()) return IcrRoute::kLocal;
  switch (m.shorthand) {
    case irqchip::Shorthand::kSelf: return IcrRoute::kLocal;
    case irqchip::Shorthand::kAllIncludingSelf:
    case irqchip::Shorthand::kAllExcludingSelf: return IcrRoute::kRemote;  // remote vCPUs exist: they are named
    case irqchip::Shorthand::kNone: break;
  }
  // A broadcast destination names every vCPU, whatever its logical ID.
  for (const auto& r : remote_) {
    if (irqchip::IsBroadcastFor(m, r)) return IcrRoute::kRemote;
  }
  // xAPIC logical: a remote vCPU's LDR / DFR are guest writes on its own node, unknown here.
  if (m.dest_mode == irqchip::DestMode::kLogical && remote_has_xapic_) return IcrRoute::kRefusedXapicLogical;
  // Lowest priority: the master arbitrates with every vCPU's priority, local ones included.
  if (irqchip::IsArbitrated(m)) return IcrRoute::kRemote;
  // Physical ID, or x2APIC logical (cluster / bit derived from the ID, SDM 11.12.10.2).
  for (const auto& r : remote_) {
    if (irqchip::MatchesDestinationField(m, r)) return IcrRoute::kRemote;
  }
  return IcrRoute::kLocal;
}

void UserIrqchip::RouteIcr(uint32_t source, const irqchip::InterruptMessage& message) {
  Bump(counters_->ipis);
  if (IsInitLevelDeassert(message)) {
    // Changes no APIC anywhere (SDM 11.6.1). Not forwarded: the master's delivery carries no level bit, so the
    // receiving node would apply it as an INIT and reset a vCPU.
    Bump(counters_->init_deasserts);
    return;
  }
  switch (ClassifyIcr(message)) {
    case IcrRoute::kLocal:
      if (Deliver(message) == 0) Bump(counters_->undelivered);
      return;
    case IcrRoute::kRemote:
      if (remote_sink_ == nullptr) {
        Bump(counters_->remote_without_sink);
        return;
      }
      Bump(counters_->remote_ipis);
      remote_sink_->OnRemoteIcr(VcpuIndex(source), message);
      return;
    case IcrRoute::kRefusedXapicLogical: Bump(counters_->remote_xapic_logical_refused); return;
  }
}

bool UserIrqchip::AcceptOn(Slot& slot, const irqchip::InterruptMessage& message, bool check_destination) {
  bool accepted = false;
  bool notify = false;
  bool kick = false;
  {
    std::lock_guard l(slot.mu);
    if (check_destination && !slot.apic.MatchesDestination(message)) return false;
    slot.became_pending = false;
    const irqchip::AcceptResult r = slot.apic.Accept(message);
    accepted = r == irqchip::AcceptResult::kAccepted || r == irqchip::AcceptResult::kCoalesced;
    // INIT and SIPI take effect here, in message order: a SIPI right behind an INIT finds the vCPU waiting for it.
    const bool run_state_changed = slot.TakeLatchedLocked();
    if (message.mode == irqchip::DeliveryMode::kStartup) accepted = run_state_changed;
    if (slot.became_pending || run_state_changed) {
      // Read under the lock: a vCPU thread that stored in_run before taking this lock is seen here (BeforeRun).
      notify = slot.halted || slot.parked;
      kick = !notify && slot.in_run.load(std::memory_order_seq_cst);
    }
  }
  if (notify) slot.cv.notify_all();
  if (kick && slot.thread != nullptr) slot.thread->Kick();
  return accepted;
}

uint32_t UserIrqchip::Deliver(const irqchip::InterruptMessage& message) {
  if (irqchip::IsArbitrated(message)) {
    // Lowest priority (SDM 11.6.2.4) / redirectable MSI: one winner among the matching, enabled APICs.
    irqchip::LowestPriorityArbiter arbiter(last_lowest_priority_winner_.load(std::memory_order_relaxed),
                                           /*use_focus=*/true);
    for (uint32_t i = 0; i < slots_.size(); ++i) {
      Slot& s = *slots_[i];
      std::lock_guard l(s.mu);
      if (!s.apic.MatchesDestination(message) || !s.apic.software_enabled()) continue;
      const uint8_t v = message.vector.value();
      arbiter.Offer(i, s.apic.ppr(), s.apic.irr().Test(v) || s.apic.isr().Test(v));
    }
    if (!arbiter.has_winner()) return 0;
    last_lowest_priority_winner_.store(arbiter.winner(), std::memory_order_relaxed);
    irqchip::InterruptMessage fixed = message;
    fixed.mode = irqchip::DeliveryMode::kFixed;
    return AcceptOn(*slots_[arbiter.winner()], fixed, /*check_destination=*/false) ? 1 : 0;
  }
  uint32_t accepted = 0;
  for (auto& s : slots_) accepted += AcceptOn(*s, message, /*check_destination=*/true) ? 1 : 0;
  return accepted;
}

absl::Status UserIrqchip::InjectMsi(const MsiMessage& msi) {
  irqchip::MsiDecodeOptions options;
  options.x2apic_32bit_ids = true;  // the KVM_X2APIC_API_USE_32BIT_IDS convention of vcpu/msi.h
  // KVM's convention (vcpu/msi.h): address_hi bits 31:8 ARE destination bits 31:8; irqchip's decoder takes them
  // shifted down into the high dword's low bits.
  const uint64_t address = (static_cast<uint64_t>(msi.address_hi >> 8) << 32) | msi.address_lo;
  const irqchip::MsiDecodeResult d = irqchip::DecodeMsiRaw(address, msi.data, options);
  if (!d.ok()) {
    Bump(counters_->bad_msis);
    return absl::InvalidArgumentError(absl::StrCat("MSI (address ", absl::Hex(address), ", data ", absl::Hex(msi.data),
                                                   ") does not decode: ", irqchip::MsiErrorName(d.error)));
  }
  Bump(counters_->msis);
  if (Deliver(d.message) == 0) {
    Bump(counters_->undelivered);
    return absl::UnavailableError(absl::StrCat("MSI (address ", absl::Hex(msi.address_lo), ", data ",
                                               absl::Hex(msi.data),
                                               ") was not accepted: no vCPU with that APIC ID, or its LAPIC is "
                                               "disabled (has the guest enabled it yet?)"));
  }
  return absl::OkStatus();
}

absl::Status UserIrqchipInjector::Deliver(const irqchip::InterruptMessage& message) {
  if (chip_.Deliver(message) != 0) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "interrupt message (mode ", static_cast<int>(message.mode), ", vector ", message.vector.value(),
      ", destination ", message.destination, ") was not accepted here: no local vCPU with that destination, its "
      "LAPIC is disabled, or a SIPI to a vCPU not waiting for one"));
}

UserIrqchipCounters UserIrqchip::counters() const {
  const AtomicCounters& c = *counters_;
  auto g = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  UserIrqchipCounters out;
  out.msis = g(c.msis);
  out.bad_msis = g(c.bad_msis);
  out.ipis = g(c.ipis);
  out.undelivered = g(c.undelivered);
  out.injected = g(c.injected);
  out.nmis = g(c.nmis);
  out.window_requests = g(c.window_requests);
  out.halts = g(c.halts);
  out.apic_msr_accesses = g(c.apic_msr_accesses);
  out.apic_mmio_accesses = g(c.apic_mmio_accesses);
  out.bad_apic_mmio = g(c.bad_apic_mmio);
  out.foreign_msrs_gp = g(c.foreign_msrs_gp);
  out.eoi_broadcasts = g(c.eoi_broadcasts);
  out.unsupported_events = g(c.unsupported_events);
  out.inits = g(c.inits);
  out.sipis = g(c.sipis);
  out.sipis_ignored = g(c.sipis_ignored);
  out.startups = g(c.startups);
  out.remote_ipis = g(c.remote_ipis);
  out.remote_xapic_logical_refused = g(c.remote_xapic_logical_refused);
  out.remote_without_sink = g(c.remote_without_sink);
  out.nmi_halt_reentries = g(c.nmi_halt_reentries);
  out.init_deasserts = g(c.init_deasserts);
  return out;
}

irqchip::LocalApicCounters UserIrqchip::apic_counters(VcpuIndex index) const {
  const Slot& s = *slots_.at(index.value());
  std::lock_guard l(s.mu);
  return s.apic.counters();
}

}  // namespace aggvm::vcpu
