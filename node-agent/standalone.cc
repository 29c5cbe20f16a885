#include "node-agent/standalone.h"

#include <fmt/format.h>

#include "node-agent/irq_probe.h"
#include "node-agent/probe_vm.h"

namespace aggvm::agent {
namespace {

constexpr uint32_t kDefaultIterations = 1000;
constexpr Vector kIpiVector(0x40);
constexpr Vector kMsiVector(0x51);

absl::Status CheckHello(ProbeVm& vm) {
  for (uint32_t i = 0; i < vm.num_vcpus(); ++i) {
    const VcpuReport r = vm.report(VcpuIndex(i));
    bool found = false;
    for (const auto& rec : r.records) {
      if (rec.type != guest::AGGVM_REC_HELLO) continue;
      found = true;
      if (rec.a != vm.apic_id(VcpuIndex(i)).value()) {
        return absl::InternalError(
            fmt::format("vCPU {} reports APIC ID {}, the VMM gave it {}", i, rec.a, vm.apic_id(VcpuIndex(i))));
      }
    }
    if (!found) return absl::InternalError(fmt::format("vCPU {} finished without a HELLO record", i));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<StandaloneResult> RunStandalone(const StandaloneOptions& options) {
  auto workload = ParseWorkload(options.workload);
  if (!workload.ok()) return workload.status();
  if (*workload == guest::AGGVM_WORKLOAD_SPIN) {
    return absl::InvalidArgumentError("the spin workload never finishes; it is for tests (pause/resume)");
  }
  const uint32_t iterations = options.iterations ? options.iterations : kDefaultIterations;
  ProbeVmConfig config;
  config.guest_elf = options.guest_elf;
  config.num_vcpus = options.vcpus;
  config.workload = *workload;
  config.iterations = iterations;
  config.x2apic = !options.xapic;
  config.irqchip = options.irqchip;
  config.ipi_vector = kIpiVector;
  IrqProbe probe;
  if (*workload == guest::AGGVM_WORKLOAD_IRQ_SINK) probe.Attach(config);

  auto vm = ProbeVm::Create(std::move(config));
  if (!vm.ok()) return vm.status();
  if (auto s = (*vm)->Start(); !s.ok()) return s;

  StandaloneResult result;
  result.workload = options.workload;
  result.irqchip = vcpu::IrqchipModeName(options.irqchip);
  result.vcpus = options.vcpus;
  result.tsc_khz = (*vm)->tsc_khz();
  if (*workload == guest::AGGVM_WORKLOAD_IRQ_SINK) {
    const VcpuIndex target(options.vcpus - 1);
    for (MsiPath path : MsiPathsFor(options.irqchip)) {
      const char* name = MsiPathName(path, options.irqchip);
      auto samples = probe.Measure(**vm, target, kMsiVector, iterations, path, options.timeout);
      if (!samples.ok()) return samples.status();
      result.measurements.push_back(
          {fmt::format("{} -> guest handler (vCPU {})", name, target), Summarize(samples->to_handler_us)});
      result.measurements.push_back(
          {fmt::format("{} -> record seen by VMM (vCPU {})", name, target), Summarize(samples->to_vmm_us)});
    }
  } else {
    if (auto s = (*vm)->WaitDone(options.timeout); !s.ok()) return s;
  }
  (*vm)->Stop();
  if (auto s = (*vm)->error(); !s.ok()) return s;
  result.dropped_records = (*vm)->dropped_records();
  result.dropped_eois = (*vm)->dropped_eois();

  if (*workload == guest::AGGVM_WORKLOAD_HELLO) {
    if (auto s = CheckHello(**vm); !s.ok()) return s;
  }
  for (uint32_t i = 0; i < options.vcpus; ++i) {
    const VcpuReport r = (*vm)->report(VcpuIndex(i));
    for (const auto& line : r.console_lines) result.console.push_back(fmt::format("vcpu {}: {}", i, line));
    if (*workload == guest::AGGVM_WORKLOAD_IPI_PINGPONG && !r.records.empty()) {
      auto rtt = PingPongRoundTripsUs(r, result.tsc_khz);
      if (!rtt.empty()) result.measurements.push_back({fmt::format("IPI round trip (vCPU {} <-> peer)", i), Summarize(rtt)});
    }
    if (*workload == guest::AGGVM_WORKLOAD_EXIT_LOOP) {
      result.measurements.push_back({fmt::format("exit round trip (vCPU {})", i), Summarize(ExitRoundTripsUs(r, result.tsc_khz))});
    }
  }
  return result;
}

std::string FormatResult(const StandaloneResult& result) {
  std::string out = fmt::format("workload {} on {} vCPU(s), {} irqchip, guest TSC {} kHz\n", result.workload,
                                result.vcpus, result.irqchip, result.tsc_khz);
  for (const auto& line : result.console) out += fmt::format("  {}\n", line);
  if (result.dropped_records != 0 || result.dropped_eois != 0) {
    out += fmt::format("  dropped: {} record(s), {} EOI(s) beyond the per-vCPU store (max_records_per_vcpu); "
                       "measurements cover the kept ones only\n",
                       result.dropped_records, result.dropped_eois);
  }
  if (!result.measurements.empty()) {
    out += fmt::format("  {:<48} {:>7} {:>9} {:>9} {:>9} {:>9}\n", "measurement (µs)", "n", "p50", "p99", "min", "max");
    for (const auto& m : result.measurements) {
      out += fmt::format("  {:<48} {:>7} {:>9.2f} {:>9.2f} {:>9.2f} {:>9.2f}\n", m.name, m.us.count, m.us.p50, m.us.p99,
                         m.us.min, m.us.max);
    }
  }
  return out;
}

nlohmann::json ResultToJson(const StandaloneResult& result) {
  nlohmann::json j;
  j["workload"] = result.workload;
  j["vcpus"] = result.vcpus;
  j["irqchip"] = result.irqchip;
  j["tsc_khz"] = result.tsc_khz;
  j["console"] = result.console;
  j["dropped_records"] = result.dropped_records;
  j["dropped_eois"] = result.dropped_eois;
  j["measurements"] = nlohmann::json::array();
  for (const auto& m : result.measurements) {
    j["measurements"].push_back({{"name", m.name}, {"unit", "us"}, {"count", m.us.count}, {"p50", m.us.p50},
                                 {"p90", m.us.p90}, {"p99", m.us.p99}, {"min", m.us.min}, {"max", m.us.max},
                                 {"mean", m.us.mean}});
  }
  return j;
}

}  // namespace aggvm::agent
