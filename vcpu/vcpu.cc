#include "vcpu/vcpu.h"

#include <sys/ioctl.h>
#include <sys/mman.h>

#include <atomic>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "vcpu/errno_status.h"
#include "vcpu/kvm_abi.h"

namespace aggvm::vcpu {

Vcpu::Vcpu(Vcpu&& o) noexcept
    : fd_(std::move(o.fd_)), run_(std::exchange(o.run_, nullptr)), mmap_size_(o.mmap_size_), id_(o.id_) {}

Vcpu& Vcpu::operator=(Vcpu&& o) noexcept {
  if (this != &o) {
    Unmap();
    fd_ = std::move(o.fd_);
    run_ = std::exchange(o.run_, nullptr);
    mmap_size_ = o.mmap_size_;
    id_ = o.id_;
  }
  return *this;
}

Vcpu::~Vcpu() { Unmap(); }

void Vcpu::Unmap() {
  // kvm_run is unmapped before the fd closes (the member order closes fd_ after this destructor body).
  if (run_ != nullptr) ::munmap(run_, mmap_size_);
  run_ = nullptr;
}

absl::Status Vcpu::SetCpuid(std::span<const kvm_cpuid_entry2> entries) {
  abi::FlexBuffer<kvm_cpuid_entry2> buf(entries.size());
  std::copy(entries.begin(), entries.end(), buf.entries());
  if (::ioctl(fd_.get(), abi::kSetCpuid2, buf.arg()) != 0) {
    return ErrnoStatus(errno, absl::StrCat("KVM_SET_CPUID2 on vCPU ", id_.value()));
  }
  return absl::OkStatus();
}

absl::StatusOr<kvm_sregs> Vcpu::GetSregs() const {
  kvm_sregs s{};
  if (::ioctl(fd_.get(), KVM_GET_SREGS, &s) != 0) return ErrnoStatus(errno, "KVM_GET_SREGS");
  return s;
}

absl::Status Vcpu::SetSregs(const kvm_sregs& sregs) {
  if (::ioctl(fd_.get(), KVM_SET_SREGS, &sregs) != 0) {
    return ErrnoStatus(errno, absl::StrCat("KVM_SET_SREGS on vCPU ", id_.value()),
                       "check CR0/CR4/EFER against what the host supports (e.g. no CR4.PCIDE under PVM)");
  }
  return absl::OkStatus();
}

absl::Status Vcpu::SetMpState(uint32_t mp_state) {
  kvm_mp_state s{mp_state};
  if (::ioctl(fd_.get(), KVM_SET_MP_STATE, &s) != 0) {
    return ErrnoStatus(errno, absl::StrCat("KVM_SET_MP_STATE(", mp_state, ") on vCPU ", id_.value()));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> Vcpu::TscKhz() const {
  const int r = ::ioctl(fd_.get(), KVM_GET_TSC_KHZ, 0);
  if (r <= 0) return ErrnoStatus(errno, "KVM_GET_TSC_KHZ");
  return static_cast<uint64_t>(r);
}

absl::StatusOr<uint64_t> Vcpu::GetMsr(uint32_t index) const {
  abi::FlexBuffer<kvm_msr_entry> buf(1);
  buf.entries()[0].index = index;
  if (::ioctl(fd_.get(), abi::kGetMsrs, buf.arg()) != 1) {
    return ErrnoStatus(errno, absl::StrCat("KVM_GET_MSRS(", absl::Hex(index), ")"));
  }
  return buf.entries()[0].data;
}

void Vcpu::EnableSyncRegs() { run_->kvm_valid_regs = KVM_SYNC_X86_REGS; }

void Vcpu::StageRegs(const kvm_regs& regs) {
  run_->s.regs.regs = regs;
  run_->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
}

absl::Status Vcpu::Interrupt(Vector vector) {
  kvm_interrupt irq{};
  irq.irq = vector.value();
  if (::ioctl(fd_.get(), KVM_INTERRUPT, &irq) != 0) {
    return ErrnoStatus(errno, absl::StrCat("KVM_INTERRUPT(vector ", vector.value(), ") on vCPU ", id_.value()),
                       "only without an in-kernel irqchip, and only when ready_for_interrupt_injection");
  }
  return absl::OkStatus();
}

absl::Status Vcpu::Nmi() {
  if (::ioctl(fd_.get(), KVM_NMI, 0) != 0) return ErrnoStatus(errno, absl::StrCat("KVM_NMI on vCPU ", id_.value()));
  return absl::OkStatus();
}

absl::StatusOr<VcpuExit> Vcpu::Run() {
  if (::ioctl(fd_.get(), KVM_RUN, 0) != 0) {
    if (errno == EINTR || errno == EAGAIN) return VcpuExit{Kicked{}};
    return ErrnoStatus(errno, absl::StrCat("KVM_RUN on vCPU ", id_.value()));
  }
  return DecodeExit(*run_, mmap_size_);
}

void Vcpu::SetImmediateExit(bool on) {
  // Read by KVM on entry to KVM_RUN; written by the kicking thread. seq_cst orders it against the kicker's command
  // store (see VcpuThread::Kick).
  std::atomic_ref<uint8_t>(run_->immediate_exit).store(on ? 1 : 0, std::memory_order_seq_cst);
}

}  // namespace aggvm::vcpu
