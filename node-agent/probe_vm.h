// A VM on this node running the probe guest (guest/abi.h): KVM with a split irqchip (`kernel` irqchip mode) or with
// no in-kernel irqchip and the LocalApic models of vcpu/user_irqchip.h (`user` mode), guest memory from 0, the ELF
// loaded at >= 1 MiB, long-mode tables, BootInfo, and one VcpuThread per vCPU handling the guest's ports. Both modes
// look the same from outside: injector() takes MSIs, a level-triggered EOI is reported in VcpuReport::ioapic_eois.
//
// Distributed VMs: the VM has `num_vcpus` vCPUs (BootInfo lists every APIC ID) but this node creates and runs only
// `local_vcpus` (KVM vCPU id = APIC ID = vCPU index); the others run on other nodes. Every node maps the whole guest
// RAM and loads the image itself: memory is not coherent across nodes (the probe guest keeps per-vCPU data private).
// In `user` mode the userspace router knows only the local APICs. Port / MMIO accesses in `forwarded_ports` /
// `forwarded_mmio` go to `forward_io` (the agent sends them to the master's devices and blocks for the answer).
//
// The guest is untrusted: a record at a bad address, an unknown port, MMIO outside guest memory, a triple fault or an
// ERROR record ends the VM with an error that names the vCPU, the exit and the guest RIP — never a crash or hang.
// Once every vCPU reported DONE the VM is complete (its vCPUs idle until Stop()).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
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

/// A guest access to a device that lives elsewhere (the master's UART, doorbell, IOAPIC registers).
struct ForwardedAccess {
  bool mmio = false;      // else port I/O
  bool is_write = false;
  uint8_t size = 1;       // 1, 2, 4 (ports); 1, 2, 4, 8 (MMIO)
  uint64_t address = 0;   // port or guest-physical address
  uint64_t data = 0;      // writes: the value, zero-extended
};

/// How the application processors (every vCPU but vCPU 0) start.
enum class ApStartup {
  kVmm,   // the VMM starts every vCPU directly in long mode at the ELF entry
  kSipi,  // only vCPU 0 starts; the others wait for INIT-SIPI-SIPI from the guest (ap-bringup implies it). Kernel
          // mode: KVM_MP_STATE_UNINITIALIZED (KVM's own state for a non-BSP vCPU with an in-kernel LAPIC); user mode:
          // UserIrqchip::HoldUntilSipi. The AP trampoline is copied to AGGVM_TRAMPOLINE_GPA on every node.
};

struct ProbeVmConfig {
  std::string guest_elf;
  uint32_t num_vcpus = 1;
  guest::aggvm_workload workload = guest::AGGVM_WORKLOAD_HELLO;
  uint32_t iterations = 0;   // ipi-pingpong rounds, exit-loop iterations
  bool x2apic = true;        // else xAPIC (MMIO at 0xFEE00000)
  /// Where the LAPICs live: KVM's (split irqchip) or userspace models (KVM_INTERRUPT). See vcpu/interrupt_injector.h.
  vcpu::IrqchipMode irqchip = vcpu::IrqchipMode::kKernel;
  VcpuIndex ping_vcpu{0};   // ipi-pingpong, nmi: the timing side; ipi-broadcast, lowest-priority, ipi-nowhere: sender
  VcpuIndex pong_vcpu{1};
  Vector ipi_vector{0x40};  // must differ from the handshake vectors of guest/abi.h (AGGVM_VEC_*)
  /// ipi-broadcast / lowest-priority: the destination of the sender's IPI (guest/abi.h enum aggvm_dest_kind) and,
  /// for AGGVM_DEST_X2APIC_LOGICAL, the x2APIC logical ID (cluster << 16 | bitmask).
  guest::aggvm_dest_kind dest_kind = guest::AGGVM_DEST_ALL_EXCLUDING_SELF;
  uint32_t dest = 0;
  /// Answers the sender waits for per round; nullopt: computed from the destination (ExpectedRecipients).
  std::optional<uint32_t> expected_answers;
  /// ipi-nowhere: the APIC ID nobody has.
  uint32_t nowhere_apic_id = 0xF0;
  /// lowest-priority: each vCPU's TPR (missing entries 0); each class must be below ipi_vector's.
  std::vector<uint8_t> tpr;
  /// Guest-side timeout of handshakes, rounds and AP bring-up (BootInfo.timeout_ms).
  uint32_t timeout_ms = 10000;
  /// kVmm unless the workload is ap-bringup (which forces kSipi).
  ApStartup ap_startup = ApStartup::kVmm;
  /// Test hook: local vCPUs that Start() leaves stopped; StartVcpu() starts them later (a late node).
  std::vector<VcpuIndex> held_vcpus;
  uint64_t memory_bytes = 64ull << 20;  // guest RAM from GPA 0 (must stay below 3 GiB: 0xC0000000 stays unmapped)
  /// How many records / level-triggered EOIs each local vCPU's report keeps (at most kMaxReportCapacity). The store
  /// is allocated once in Create (32 B per record, pages touched only when used); what the guest sends beyond it is
  /// counted in VcpuReport::dropped_records / dropped_eois and not stored. on_record / on_ioapic_eoi see everything.
  size_t max_records_per_vcpu = 64 * 1024;
  size_t max_eois_per_vcpu = 64 * 1024;
  /// Called on the vCPU's thread for every valid record (latency measurements hook here). Keep it short.
  std::function<void(VcpuIndex, const Record&)> on_record;
  /// Called on the vCPU's thread for a level-triggered EOI (KVM_EXIT_IOAPIC_EOI, or the user irqchip's broadcast).
  std::function<void(VcpuIndex, Vector)> on_ioapic_eoi;
  /// Called once, on the failing vCPU's thread, with the error that ended the VM. May be empty.
  std::function<void(const absl::Status&)> on_error;
  /// Called on the vCPU's thread for every complete line on the paravirtual console port. May be empty.
  std::function<void(VcpuIndex, std::string_view)> on_console_line;

  /// The vCPUs this node runs (ascending, each < num_vcpus); empty = all of them (standalone).
  std::vector<VcpuIndex> local_vcpus;
  /// BootInfo flag AGGVM_BOOT_UART_CONSOLE: the guest writes its console to the 16550 at 0x3F8 (which must then be
  /// forwarded, or it ends the VM as an unknown port).
  bool uart_console = false;
  /// Port windows [first, last] and MMIO windows [first, last] handled by `forward_io` on the vCPU's thread.
  std::vector<std::pair<uint16_t, uint16_t>> forwarded_ports;
  std::vector<std::pair<uint64_t, uint64_t>> forwarded_mmio;
  std::function<absl::StatusOr<uint64_t>(VcpuIndex, const ForwardedAccess&)> forward_io;
};

/// Upper bound of ProbeVmConfig::max_records_per_vcpu / max_eois_per_vcpu (16 Mi: 512 MiB of records per vCPU).
inline constexpr size_t kMaxReportCapacity = size_t{1} << 24;

/// What one vCPU reported (a snapshot).
struct VcpuReport {
  std::vector<std::string> console_lines;
  std::vector<Record> records;      // the first max_records_per_vcpu valid records, in order
  std::vector<Vector> ioapic_eois;  // the first max_eois_per_vcpu level-triggered EOIs, in order
  std::optional<uint32_t> done_status;
  uint64_t nop_exits = 0;
  uint64_t dropped_records = 0;  // valid records that did not fit in `records`
  uint64_t dropped_eois = 0;     // EOIs that did not fit in `ioapic_eois`
};

class ProbeVm {
 public:
  /// Builds the VM (nothing runs yet). Fails with a clear message on a missing capability or a bad guest image.
  static absl::StatusOr<std::unique_ptr<ProbeVm>> Create(ProbeVmConfig config);
  ~ProbeVm();
  ProbeVm(const ProbeVm&) = delete;
  ProbeVm& operator=(const ProbeVm&) = delete;

  /// Starts every local vCPU thread not yet started, except config.held_vcpus.
  absl::Status Start();
  /// Starts one local vCPU's thread (a held one). FailedPrecondition if it already runs.
  absl::Status StartVcpu(VcpuIndex index);
  /// KVM_GET_MP_STATE of a local vCPU (KVM_MP_STATE_*), for tests of AP start-up. KVM takes the vCPU's mutex, which
  /// KVM_RUN holds: call it before the vCPU starts or while its thread is paused, or it blocks until the guest exits
  /// (forever for a guest that spins without exits).
  absl::StatusOr<uint32_t> MpState(VcpuIndex index) const;
  /// Places the thread of every started local vCPU on `cpus` (nothing if empty; a held vCPU not yet started is
  /// skipped). The first refusal is returned.
  absl::Status PinVcpus(const std::vector<int>& cpus);
  /// Pauses / resumes every local vCPU (they keep their state). Pause waits (bounded) until each thread is paused.
  absl::Status Pause(absl::Duration timeout = absl::Seconds(5));
  void Resume();
  /// OK once every local vCPU reported DONE; the error that ended the VM; or DeadlineExceeded.
  absl::Status WaitDone(absl::Duration timeout);
  /// OK once vCPU `index` has sent at least `count` records of `type`; the VM's error; or DeadlineExceeded.
  absl::Status WaitForRecords(VcpuIndex index, guest::aggvm_record_type type, size_t count, absl::Duration timeout);
  /// Stops and joins-in-effect every vCPU thread (bounded wait). Idempotent.
  void Stop();
  /// The error that ended the VM, OK if none.
  absl::Status error() const;

  [[nodiscard]] VcpuReport report(VcpuIndex index) const;
  /// The VM's vCPU count (all nodes).
  [[nodiscard]] uint32_t num_vcpus() const { return config_.num_vcpus; }
  /// The vCPUs this node runs, ascending.
  [[nodiscard]] const std::vector<VcpuIndex>& local_vcpus() const { return local_; }
  [[nodiscard]] bool is_local(VcpuIndex index) const {
    return index.value() < slot_of_.size() && slot_of_[index.value()] >= 0;
  }
  [[nodiscard]] ApicId apic_id(VcpuIndex index) const { return ApicId(index.value()); }
  [[nodiscard]] uint64_t tsc_khz() const { return tsc_khz_; }
  /// Guest TSC minus host TSC as measured before start (0 on these hosts; see ../shared/FACTS.md).
  [[nodiscard]] int64_t tsc_offset() const { return tsc_offset_; }
  /// The spin workload's heartbeat counter of `index` (AGGVM_STATUS_GPA + 8 * index).
  [[nodiscard]] uint64_t Heartbeat(VcpuIndex index);

  [[nodiscard]] vcpu::IrqchipMode irqchip_mode() const { return config_.irqchip; }
  /// The userspace LAPICs (user mode only; nullptr in kernel mode).
  vcpu::UserIrqchip* user_irqchip() { return user_irqchip_.get(); }
  vcpu::Kvm& kvm() { return kvm_; }
  vcpu::Vm& vm() { return vm_; }
  vcpu::InterruptInjector& injector() { return *injector_; }
  /// A local vCPU's thread (std::out_of_range for a vCPU another node runs).
  vcpu::VcpuThread& thread(VcpuIndex index) { return *threads_.at(Slot(index.value())); }
  /// Exits handled by the local vCPU threads, summed.
  [[nodiscard]] uint64_t exits() const;
  /// Accesses sent to forward_io, and of those failed.
  [[nodiscard]] uint64_t forwarded_accesses() const { return forwarded_.load(std::memory_order_relaxed); }
  /// Records / EOIs not stored because a vCPU's report was full (VcpuReport::dropped_*), summed over local vCPUs.
  [[nodiscard]] uint64_t dropped_records() const;
  [[nodiscard]] uint64_t dropped_eois() const;

 private:
  struct VcpuLog;  // a local vCPU's bounded record / EOI store and counters (probe_vm.cc)

  ProbeVm(ProbeVmConfig config, vcpu::Kvm kvm, vcpu::Vm vm, vcpu::GuestMemory mem);
  absl::Status SetUpVcpus();
  vcpu::VcpuThread::ExitAction HandleExit(uint32_t index, vcpu::VcpuExit& exit);
  vcpu::VcpuThread::ExitAction HandleRecord(uint32_t index, uint32_t gpa);
  vcpu::VcpuThread::ExitAction Fail(uint32_t index, absl::Status status);
  /// The exit is an access to a forwarded window: handled (Continue / Fail). nullopt: not forwarded.
  std::optional<vcpu::VcpuThread::ExitAction> MaybeForward(uint32_t index, vcpu::VcpuExit& exit);
  /// Index into vcpus_ / threads_ of local vCPU `index` (std::out_of_range otherwise).
  size_t Slot(uint32_t index) const {
    const int s = index < slot_of_.size() ? slot_of_[index] : -1;
    if (s < 0) throw std::out_of_range("vCPU is not local");
    return static_cast<size_t>(s);
  }

  ProbeVmConfig config_;
  // Declaration order is teardown order in reverse: threads stop before vCPUs close, memory and VM go last.
  vcpu::Kvm kvm_;
  vcpu::Vm vm_;
  vcpu::GuestMemory mem_;
  std::unique_ptr<vcpu::UserIrqchip> user_irqchip_;  // user mode; the threads below use it
  std::unique_ptr<vcpu::InterruptInjector> injector_;
  std::vector<VcpuIndex> local_;                    // the local vCPUs, ascending
  std::vector<int> slot_of_;                        // per VM vCPU index: its index in vcpus_ / threads_, -1 if remote
  std::vector<vcpu::Vcpu> vcpus_;                   // local vCPUs only
  std::vector<std::unique_ptr<vcpu::VcpuThread>> threads_;
  std::atomic<uint64_t> forwarded_{0};
  uint64_t tsc_khz_ = 0;
  int64_t tsc_offset_ = 0;

  // Per VM vCPU index; nullptr for a remote vCPU. Written only by that vCPU's thread, without a lock; read by any.
  std::vector<std::unique_ptr<VcpuLog>> logs_;
  // WaitForRecords callers inside cv_.wait: a record notifies cv_ (taking mu_) only when this is non-zero.
  std::atomic<uint32_t> record_waiters_{0};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::vector<std::string>> console_lines_;  // per vCPU, guarded by mu_
  std::vector<std::optional<uint32_t>> done_status_;     // per vCPU, guarded by mu_
  std::vector<std::string> partial_lines_;  // per vCPU, touched only by that vCPU's thread
  absl::Status error_;               // guarded by mu_
  uint32_t done_count_ = 0;          // guarded by mu_
};

/// Parses a workload name (hello, ipi-pingpong, irq-sink, spin, exit-loop, ipi-broadcast, nmi, ipi-nowhere,
/// lowest-priority, ap-bringup, bad-port, unmapped, triple-fault).
absl::StatusOr<guest::aggvm_workload> ParseWorkload(std::string_view name);
/// Parses a destination kind name (all-excluding-self, all-including-self, physical-broadcast, x2apic-logical).
absl::StatusOr<guest::aggvm_dest_kind> ParseDestKind(std::string_view name);

/// The vCPUs addressed by the ipi-broadcast IPI of `config` (APIC ID = vCPU index; SDM Vol. 3A 11.6.2 and
/// 11.12.10.2: an x2APIC logical ID is cluster = ID >> 4, bit = 1 << (ID & 0xF)). For lowest-priority this is the
/// set the one winner comes from.
std::vector<VcpuIndex> ExpectedRecipients(const ProbeVmConfig& config);

}  // namespace aggvm::agent
