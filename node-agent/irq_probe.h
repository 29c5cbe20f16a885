// Measuring interrupt delivery into the probe guest's irq-sink workload: the host injects an MSI (KVM_SIGNAL_MSI or
// an irqfd write), the guest's handler records the vector and its rdtsc at entry, and the record's exit reaches the
// VMM. Two latencies per sample: host inject -> guest handler entry (TSCs compared, corrected by the measured guest
// TSC offset) and host inject -> record seen by the vCPU thread (host clock only).
//
// One interrupt is in flight at a time; each sample checks that the handler of the addressed vCPU ran with the
// injected vector.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/types.h"
#include "node-agent/probe_vm.h"
#include "vcpu/interrupt_injector.h"

namespace aggvm::agent {

/// How the host raises the MSI. kInjector: the VM's InterruptInjector (KVM_SIGNAL_MSI in kernel irqchip mode, the
/// user irqchip's router + KVM_INTERRUPT in user mode). kIrqFd: an eventfd bound to a KVM GSI route (kernel mode only).
enum class MsiPath { kInjector, kIrqFd };
/// The paths a VM in `mode` supports, and a display name ("KVM_SIGNAL_MSI", "irqfd", "user MSI (KVM_INTERRUPT)").
std::vector<MsiPath> MsiPathsFor(vcpu::IrqchipMode mode);
const char* MsiPathName(MsiPath path, vcpu::IrqchipMode mode);

struct IrqLatencySamples {
  std::vector<double> to_handler_us;  // inject -> guest handler entry
  std::vector<double> to_vmm_us;      // inject -> IRQ record seen by the VMM
};

class IrqProbe {
 public:
  /// Hooks the probe into `config` (sets on_record); `config` must use the irq-sink workload.
  void Attach(ProbeVmConfig& config);
  /// How the injecting thread waits for each sample's IRQ record: spinning (sched_yield between checks) keeps its
  /// core busy; sleeping (without a timer, on a futex the record's exit wakes) frees it right after the injection,
  /// as an event-driven data-plane thread does. The measured span (injection -> handler entry rdtsc) ends before either.
  enum class Waiter { kSpin, kSleep };
  /// Waits for `target`'s ready HELLO, then injects `samples` MSIs (vector `vector`) one at a time through `path`:
  /// back to back, or each `pace` after the previous one. `timeout` bounds the whole measurement.
  absl::StatusOr<IrqLatencySamples> Measure(ProbeVm& vm, VcpuIndex target, Vector vector, size_t samples,
                                            MsiPath path, absl::Duration timeout, Waiter waiter = Waiter::kSpin,
                                            absl::Duration pace = absl::ZeroDuration());

 private:
  void OnRecord(VcpuIndex index, const Record& r);
  std::atomic<uint32_t> irq_count_{0};  // IRQ records seen; a Waiter::kSleep Measure sleeps on it (futex word)
  std::atomic<uint64_t> seen_host_tsc_{0};
  std::atomic<uint64_t> guest_entry_tsc_{0};
  std::atomic<uint32_t> last_vcpu_{0};
  std::atomic<uint32_t> last_vector_{0};
  std::atomic<bool> sleeping_waiter_{false};  // set once a Waiter::kSleep Measure waits: OnRecord then notifies
};

/// Round trips of ipi-pingpong (PING_ROUND records of `report`), in µs.
std::vector<double> PingPongRoundTripsUs(const VcpuReport& report, uint64_t tsc_khz);
/// Exit round trips of exit-loop (EXIT_ROUND records), in µs.
std::vector<double> ExitRoundTripsUs(const VcpuReport& report, uint64_t tsc_khz);

}  // namespace aggvm::agent
