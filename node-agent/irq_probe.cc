#include "node-agent/irq_probe.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <stop_token>
#include <thread>

#include <immintrin.h>
#include <sched.h>

#include <fmt/format.h>

#include "common/clock.h"
#include "common/futex.h"
#include "vcpu/event_fd.h"
#include "vcpu/msi.h"

namespace aggvm::agent {
namespace {

double TscToUs(int64_t ticks, uint64_t khz) { return static_cast<double>(ticks) * 1000.0 / static_cast<double>(khz); }

std::vector<double> RecordSpansUs(const VcpuReport& report, guest::aggvm_record_type type, uint64_t khz) {
  std::vector<double> out;
  if (khz == 0) return out;
  for (const auto& r : report.records) {
    if (r.type == type && r.c >= r.b) out.push_back(TscToUs(static_cast<int64_t>(r.c - r.b), khz));
  }
  return out;
}

}  // namespace

std::vector<MsiPath> MsiPathsFor(vcpu::IrqchipMode mode) {
  if (mode == vcpu::IrqchipMode::kUser) return {MsiPath::kInjector};
  return {MsiPath::kInjector, MsiPath::kIrqFd};
}

const char* MsiPathName(MsiPath path, vcpu::IrqchipMode mode) {
  if (path == MsiPath::kIrqFd) return "irqfd";
  return mode == vcpu::IrqchipMode::kUser ? "user MSI (KVM_INTERRUPT)" : "KVM_SIGNAL_MSI";
}

void IrqProbe::Attach(ProbeVmConfig& config) {
  config.on_record = [this](VcpuIndex index, const Record& r) { OnRecord(index, r); };
}

void IrqProbe::OnRecord(VcpuIndex index, const Record& r) {
  if (r.type != guest::AGGVM_REC_IRQ) return;
  // Fields first, count last (release): Measure reads the count (acquire) and then the fields.
  seen_host_tsc_.store(ReadTsc(), std::memory_order_relaxed);
  guest_entry_tsc_.store(r.b, std::memory_order_relaxed);
  last_vcpu_.store(index.value(), std::memory_order_relaxed);
  last_vector_.store(static_cast<uint32_t>(r.a), std::memory_order_relaxed);
  irq_count_.fetch_add(1, std::memory_order_seq_cst);  // seq_cst: ordered with the sleeping_waiter_ load below
  // Only a Waiter::kSleep Measure pays for the wake. It stores the flag before it reads the count for the last time,
  // so either it sees this record's count or this load sees its flag.
  if (sleeping_waiter_.load(std::memory_order_seq_cst)) FutexWake(irq_count_);
}

absl::StatusOr<IrqLatencySamples> IrqProbe::Measure(ProbeVm& vm, VcpuIndex target, Vector vector, size_t samples,
                                                    MsiPath path, absl::Duration timeout, Waiter waiter,
                                                    absl::Duration pace) {
  if (vm.tsc_khz() == 0) return absl::FailedPreconditionError("KVM_GET_TSC_KHZ gave no TSC frequency");
  if (vector.value() < 32 || vector.value() == 0xFF) {
    return absl::InvalidArgumentError(fmt::format("vector {} (need 32..254)", vector));
  }
  if (auto s = vm.WaitForRecords(target, guest::AGGVM_REC_HELLO, 1, timeout); !s.ok()) return s;

  const vcpu::MsiMessage msi = vcpu::FixedMsi(vm.apic_id(target), vector);
  std::optional<vcpu::EventFd> event;
  std::optional<vcpu::IrqFd> irqfd;
  if (path == MsiPath::kIrqFd) {
    if (vm.irqchip_mode() != vcpu::IrqchipMode::kKernel) {
      return absl::FailedPreconditionError("irqfd needs the in-kernel irqchip; this VM runs the user irqchip");
    }
    const Gsi gsi(0);
    const vcpu::GsiRoute route{gsi, msi};
    if (auto s = vm.vm().SetGsiRouting({&route, 1}); !s.ok()) return s;
    auto e = vcpu::EventFd::Create();
    if (!e.ok()) return e.status();
    event.emplace(*std::move(e));
    auto f = vcpu::IrqFd::Attach(vm.vm(), *event, gsi);
    if (!f.ok()) return f.status();
    irqfd.emplace(*std::move(f));
  }

  IrqLatencySamples out;
  out.to_handler_us.reserve(samples);
  out.to_vmm_us.reserve(samples);
  const uint64_t deadline = MonotonicNanos() + static_cast<uint64_t>(absl::ToInt64Nanoseconds(timeout));
  // A sleeping waiter sleeps without a timer, as the cluster's data-plane threads do (a timed sleep arms and cancels
  // a timer around every sample). This thread ends such a sleep once the budget is spent: started once per Measure
  // (pace the samples with `pace`, not with one Measure per sample), it arms one timer for the whole measurement and
  // then wakes the waiter until the measurement ends.
  std::jthread budget;
  if (waiter == Waiter::kSleep) {
    budget = std::jthread([this, until = std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(timeout)](
                              std::stop_token stop) {
      std::mutex mu;
      std::condition_variable_any cv;
      std::unique_lock l(mu);
      cv.wait_until(l, stop, until, [] { return false; });
      while (!stop.stop_requested()) {
        FutexWake(irq_count_);
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    });
  }
  const uint64_t pace_ns = static_cast<uint64_t>(std::max<int64_t>(0, absl::ToInt64Nanoseconds(pace)));
  uint64_t next_ns = 0;
  for (size_t i = 0; i < samples; ++i) {
    if (pace_ns > 0) {  // `pace` after the previous injection: the vCPU has left halt-polling and sleeps
      if (const uint64_t now = MonotonicNanos(); next_ns > now) {
        std::this_thread::sleep_for(std::chrono::nanoseconds(next_ns - now));
      }
      next_ns = MonotonicNanos() + pace_ns;
    }
    const uint32_t before = irq_count_.load(std::memory_order_acquire);
    const uint64_t t0 = ReadTsc();
    absl::Status s = path == MsiPath::kInjector ? vm.injector().InjectMsi(msi) : event->Signal();
    if (!s.ok()) return s;
    // Busy-wait: a sleeping waiter would add its own wake-up (~25 µs here) to every sample. Yield while spinning so
    // that on a host with few cores the woken vCPU thread is not left waiting for a scheduler tick behind us.
    while (irq_count_.load(std::memory_order_acquire) == before) {
      if (waiter == Waiter::kSleep) {
        sleeping_waiter_.store(true, std::memory_order_seq_cst);  // before the count is read for the last time
        if (irq_count_.load(std::memory_order_seq_cst) == before) FutexWait(irq_count_, before);
      } else {
        _mm_pause();
        sched_yield();
      }
      if (MonotonicNanos() > deadline) {
        absl::Status err = vm.error();
        if (!err.ok()) return err;
        return absl::DeadlineExceededError(fmt::format(
            "MSI {} of {} (vector {} to vCPU {}) reached no guest handler within the {} budget", i + 1, samples,
            vector, target, absl::FormatDuration(timeout)));
      }
    }
    // Records that come while nobody sleeps make no wake-up call (the flag is set again before every sleep).
    if (waiter == Waiter::kSleep) sleeping_waiter_.store(false, std::memory_order_relaxed);
    if (last_vcpu_.load(std::memory_order_relaxed) != target.value() ||
        last_vector_.load(std::memory_order_relaxed) != vector.value()) {
      return absl::InternalError(fmt::format("MSI vector {} to vCPU {} was handled by vCPU {} as vector {}", vector,
                                             target, last_vcpu_.load(), last_vector_.load()));
    }
    const int64_t entry = static_cast<int64_t>(guest_entry_tsc_.load(std::memory_order_relaxed)) - vm.tsc_offset();
    out.to_handler_us.push_back(TscToUs(entry - static_cast<int64_t>(t0), vm.tsc_khz()));
    out.to_vmm_us.push_back(
        TscToUs(static_cast<int64_t>(seen_host_tsc_.load(std::memory_order_relaxed) - t0), vm.tsc_khz()));
  }
  return out;
}

std::vector<double> PingPongRoundTripsUs(const VcpuReport& report, uint64_t tsc_khz) {
  return RecordSpansUs(report, guest::AGGVM_REC_PING_ROUND, tsc_khz);
}

std::vector<double> ExitRoundTripsUs(const VcpuReport& report, uint64_t tsc_khz) {
  return RecordSpansUs(report, guest::AGGVM_REC_EXIT_ROUND, tsc_khz);
}

}  // namespace aggvm::agent
