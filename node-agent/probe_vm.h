// A VM on this node running the probe guest (guest/abi.h): KVM with a split irqchip (`kernel` irqchip mode) or with
// no in-kernel irqchip and the LocalApic models of vcpu/user_irqchip.h (`user` mode), guest memory from 0, the ELF
// loaded at >= 1 MiB, long-mode tables, BootInfo, and one VcpuThread per vCPU handling the guest's ports. Both modes
// look the same from outside: injector() takes MSIs, a level-triggered EOI is reported in VcpuReport::ioapic_eois.
//
// The guest is untrusted: a record at a bad address, an unknown port, MMIO outside guest memory, a triple fault or an
// ERROR record ends the VM with an error that names the vCPU, the exit and the guest RIP — never a crash or hang.
// Once every vCPU reported DONE the VM is complete (its vCPUs idle until Stop()).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/types.h"
#include "guest/abi.h"
#include "vcpu/guest_memory.h"
#include "vcpu/interrupt_injector.h"
#include "vcpu/kvm.h"
#include "vcpu/vcpu.h"
#include "vcpu/user_irqchip.h"
#include "vcpu/vcpu_thread.h"
#include "vcpu/vm.h"

namespace aggvm::agent {

using Record = guest::aggvm_record;

struct ProbeVmConfig {
  std::string guest_elf;
  uint32_t num_vcpus = 1;
  guest::aggvm_workload workload = guest::AGGVM_WORKLOAD_HELLO;
  uint32_t iterations = 0;   // ipi-pingpong rounds, exit-loop iterations
  bool x2apic = true;        // else xAPIC (MMIO at 0xFEE00000)
  /// Where the LAPICs live: KVM's (split irqchip) or userspace models (KVM_INTERRUPT). See vcpu/interrupt_injector.h.
  vcpu::IrqchipMode irqchip = vcpu::IrqchipMode::kKernel;
  VcpuIndex ping_vcpu{0};
  VcpuIndex pong_vcpu{1};
  Vector ipi_vector{0x40};
  uint64_t memory_bytes = 64ull << 20;  // guest RAM from GPA 0 (must stay below 3 GiB: 0xC0000000 stays unmapped)
  /// Called on the vCPU's thread for every valid record (latency measurements hook here). Keep it short.
  std::function<void(VcpuIndex, const Record&)> on_record;
  /// Called on the vCPU's thread for a level-triggered EOI (KVM_EXIT_IOAPIC_EOI, or the user irqchip's broadcast).
  std::function<void(VcpuIndex, Vector)> on_ioapic_eoi;
};

/// What one vCPU reported.
struct VcpuReport {
  std::vector<std::string> console_lines;
  std::vector<Record> records;
  std::vector<Vector> ioapic_eois;
  std::optional<uint32_t> done_status;
  uint64_t nop_exits = 0;
};

class ProbeVm {
 public:
  /// Builds the VM (nothing runs yet). Fails with a clear message on a missing capability or a bad guest image.
  static absl::StatusOr<std::unique_ptr<ProbeVm>> Create(ProbeVmConfig config);
  ~ProbeVm();
  ProbeVm(const ProbeVm&) = delete;
  ProbeVm& operator=(const ProbeVm&) = delete;

  /// Starts every vCPU thread.
  absl::Status Start();
  /// OK once every vCPU reported DONE; the error that ended the VM; or DeadlineExceeded.
  absl::Status WaitDone(absl::Duration timeout);
  /// OK once vCPU `index` has sent at least `count` records of `type`; the VM's error; or DeadlineExceeded.
  absl::Status WaitForRecords(VcpuIndex index, guest::aggvm_record_type type, size_t count, absl::Duration timeout);
  /// Stops and joins-in-effect every vCPU thread (bounded wait). Idempotent.
  void Stop();
  /// The error that ended the VM, OK if none.
  absl::Status error() const;

  [[nodiscard]] VcpuReport report(VcpuIndex index) const;
  [[nodiscard]] uint32_t num_vcpus() const { return config_.num_vcpus; }
  [[nodiscard]] ApicId apic_id(VcpuIndex index) const { return ApicId(index.value()); }
  [[nodiscard]] uint64_t tsc_khz() const { return tsc_khz_; }
  /// Guest TSC minus host TSC as measured before start (0 on these hosts; see ../shared/FACTS.md).
  [[nodiscard]] int64_t tsc_offset() const { return tsc_offset_; }
  /// The spin workload's heartbeat counter of `index` (AGGVM_STATUS_GPA + 8 * index).
  [[nodiscard]] uint64_t Heartbeat(VcpuIndex index);

  [[nodiscard]] vcpu::IrqchipMode irqchip_mode() const { return config_.irqchip; }
  /// The userspace LAPICs (user mode only; nullptr in kernel mode).
  vcpu::UserIrqchip* user_irqchip() { return user_irqchip_.get(); }
  vcpu::Vm& vm() { return vm_; }
  vcpu::InterruptInjector& injector() { return *injector_; }
  vcpu::VcpuThread& thread(VcpuIndex index) { return *threads_.at(index.value()); }

 private:
  ProbeVm(ProbeVmConfig config, vcpu::Kvm kvm, vcpu::Vm vm, vcpu::GuestMemory mem);
  absl::Status SetUpVcpus();
  vcpu::VcpuThread::ExitAction HandleExit(uint32_t index, vcpu::VcpuExit& exit);
  vcpu::VcpuThread::ExitAction HandleRecord(uint32_t index, uint32_t gpa);
  vcpu::VcpuThread::ExitAction Fail(uint32_t index, absl::Status status);

  ProbeVmConfig config_;
  // Declaration order is teardown order in reverse: threads stop before vCPUs close, memory and VM go last.
  vcpu::Kvm kvm_;
  vcpu::Vm vm_;
  vcpu::GuestMemory mem_;
  std::unique_ptr<vcpu::UserIrqchip> user_irqchip_;  // user mode; the threads below use it
  std::unique_ptr<vcpu::InterruptInjector> injector_;
  std::vector<vcpu::Vcpu> vcpus_;
  std::vector<std::unique_ptr<vcpu::VcpuThread>> threads_;
  uint64_t tsc_khz_ = 0;
  int64_t tsc_offset_ = 0;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<VcpuReport> reports_;  // guarded by mu_
  std::vector<std::string> partial_lines_;  // per vCPU, touched only by that vCPU's thread
  absl::Status error_;               // guarded by mu_
  uint32_t done_count_ = 0;          // guarded by mu_
};

/// Parses a workload name (hello, ipi-pingpong, irq-sink, spin, exit-loop, bad-port, unmapped, triple-fault).
absl::StatusOr<guest::aggvm_workload> ParseWorkload(std::string_view name);

}  // namespace aggvm::agent
