// A KVM vCPU (api.rst §4, "vCPU ioctls"): owns its fd and its mmapped `struct kvm_run`.
//
// Registers travel through KVM_CAP_SYNC_REGS (api.rst, "kvm_run: kvm_valid_regs / kvm_dirty_regs"): after
// EnableSyncRegs() every exit carries the general registers in kvm_run, and StageRegs() hands new ones to the next
// KVM_RUN — no KVM_GET_REGS / KVM_SET_REGS per exit (each vCPU ioctl costs ~5 µs on these hosts).
//
// Threading: Run(), StageRegs() and the setup calls belong to the thread that runs the vCPU. SetImmediateExit() may
// be called from any thread (it is how a vCPU is kicked, together with a signal; see vcpu_thread.h).
#pragma once

#include <linux/kvm.h>

#include <cstddef>
#include <cstdint>
#include <span>

#include "absl/status/statusor.h"
#include "common/types.h"
#include "vcpu/unique_fd.h"
#include "vcpu/vcpu_exit.h"

namespace aggvm::vcpu {

class Vcpu {
 public:
  Vcpu(Vcpu&& o) noexcept;
  Vcpu& operator=(Vcpu&& o) noexcept;
  Vcpu(const Vcpu&) = delete;
  Vcpu& operator=(const Vcpu&) = delete;
  ~Vcpu();

  [[nodiscard]] ApicId id() const { return id_; }
  [[nodiscard]] int fd() const { return fd_.get(); }

  /// KVM_SET_CPUID2. Before the first KVM_RUN.
  absl::Status SetCpuid(std::span<const kvm_cpuid_entry2> entries);
  absl::StatusOr<kvm_sregs> GetSregs() const;
  absl::Status SetSregs(const kvm_sregs& sregs);
  /// KVM_SET_MP_STATE (KVM_MP_STATE_RUNNABLE starts an application processor without INIT/SIPI).
  absl::Status SetMpState(uint32_t mp_state);
  /// KVM_GET_TSC_KHZ: the guest TSC frequency.
  absl::StatusOr<uint64_t> TscKhz() const;
  /// KVM_GET_MSRS for one MSR.
  absl::StatusOr<uint64_t> GetMsr(uint32_t index) const;

  /// Asks KVM to copy the general registers into kvm_run on every exit (KVM_SYNC_X86_REGS).
  void EnableSyncRegs();
  /// Registers to load on the next KVM_RUN (through kvm_run's sync area; needs EnableSyncRegs()).
  void StageRegs(const kvm_regs& regs);
  /// The registers as of the last exit (valid after EnableSyncRegs()).
  [[nodiscard]] const kvm_regs& regs() const { return run_->s.regs.regs; }

  // ---- Interrupt injection without an in-kernel LAPIC (user irqchip mode; api.rst "KVM_INTERRUPT", kvm_run
  // "request_interrupt_window", "ready_for_interrupt_injection", "if_flag"). vCPU thread only. ----
  /// KVM_INTERRUPT: queues external interrupt `vector` for the next KVM_RUN. Only when
  /// ready_for_interrupt_injection() said so since the last exit; AlreadyExists (EEXIST) if one is still queued.
  absl::Status Interrupt(Vector vector);
  /// KVM_NMI: queues an NMI.
  absl::Status Nmi();
  /// As of the last exit: the guest can take an external interrupt now (IF = 1, no interrupt shadow, none queued).
  [[nodiscard]] bool ready_for_interrupt_injection() const { return run_->ready_for_interrupt_injection != 0; }
  /// As of the last exit: RFLAGS.IF.
  [[nodiscard]] bool interrupt_flag() const { return run_->if_flag != 0; }
  /// While set, KVM_RUN returns KVM_EXIT_IRQ_WINDOW_OPEN as soon as the guest can take an interrupt.
  void RequestInterruptWindow(bool on) { run_->request_interrupt_window = on ? 1 : 0; }

  /// KVM_RUN, then decodes the exit. EINTR (a kick) is the Kicked exit, not an error.
  absl::StatusOr<VcpuExit> Run();
  /// kvm_run->immediate_exit: while set, KVM_RUN returns EINTR at once. Any thread.
  void SetImmediateExit(bool on);

 private:
  friend class Vm;
  Vcpu(UniqueFd fd, kvm_run* run, size_t mmap_size, ApicId id)
      : fd_(std::move(fd)), run_(run), mmap_size_(mmap_size), id_(id) {}
  void Unmap();

  UniqueFd fd_;
  kvm_run* run_ = nullptr;
  size_t mmap_size_ = 0;
  ApicId id_;
};

}  // namespace aggvm::vcpu
