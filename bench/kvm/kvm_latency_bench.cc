// KVM interrupt-path latencies on this node, for both irqchip modes, with their baseline measured in the same run:
//   - host MSI -> guest handler entry, and -> the handler's record seen by the VMM: kernel mode through
//     KVM_SIGNAL_MSI and irqfd, user mode through the userspace LAPIC router + KVM_INTERRUPT;
//   - local IPI round trip between two vCPUs (guest rdtsc), in each mode;
//   - baseline: a bare exit round trip (OUT to the NOP port, guest rdtsc around it).
// --irqchip kernel|user|both (default both) selects the modes.
// Prints a table; --json FILE writes the same numbers.
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/stats.h"
#include "node-agent/irq_probe.h"
#include "node-agent/probe_vm.h"

namespace {

using namespace aggvm;
using namespace aggvm::agent;

struct Row {
  std::string irqchip;
  std::string name;
  Summary us;
};

absl::StatusOr<std::vector<double>> RunRecordWorkload(const std::string& elf, vcpu::IrqchipMode mode,
                                                      guest::aggvm_workload w, uint32_t n, VcpuIndex from) {
  ProbeVmConfig c;
  c.guest_elf = elf;
  c.irqchip = mode;
  c.workload = w;
  c.num_vcpus = 2;
  c.iterations = n;
  auto vm = ProbeVm::Create(c);
  if (!vm.ok()) return vm.status();
  if (auto s = (*vm)->Start(); !s.ok()) return s;
  if (auto s = (*vm)->WaitDone(absl::Seconds(600)); !s.ok()) return s;
  (*vm)->Stop();
  const auto report = (*vm)->report(from);
  return w == guest::AGGVM_WORKLOAD_IPI_PINGPONG ? PingPongRoundTripsUs(report, (*vm)->tsc_khz())
                                                  : ExitRoundTripsUs(report, (*vm)->tsc_khz());
}

absl::Status RunMode(const std::string& elf, vcpu::IrqchipMode mode, uint32_t samples, std::vector<Row>& rows) {
  const std::string m = vcpu::IrqchipModeName(mode);
  {
    ProbeVmConfig c;
    c.guest_elf = elf;
    c.irqchip = mode;
    c.workload = guest::AGGVM_WORKLOAD_IRQ_SINK;
    c.num_vcpus = 2;
    IrqProbe probe;
    probe.Attach(c);
    auto vm = ProbeVm::Create(c);
    if (!vm.ok()) return vm.status();
    if (auto s = (*vm)->Start(); !s.ok()) return s;
    for (MsiPath path : MsiPathsFor(mode)) {
      const char* name = MsiPathName(path, mode);
      auto r = probe.Measure(**vm, VcpuIndex(1), Vector(0x51), samples, path, absl::Seconds(600));
      if (!r.ok()) return r.status();
      rows.push_back({m, fmt::format("{} -> guest handler entry", name), Summarize(r->to_handler_us)});
      rows.push_back({m, fmt::format("{} -> handler's record seen by VMM", name), Summarize(r->to_vmm_us)});
    }
    (*vm)->Stop();
  }
  auto ipi = RunRecordWorkload(elf, mode, guest::AGGVM_WORKLOAD_IPI_PINGPONG, samples, VcpuIndex(0));
  if (!ipi.ok()) return ipi.status();
  rows.push_back({m, "local IPI round trip (guest rdtsc)", Summarize(*ipi)});
  return absl::OkStatus();
}

absl::Status Run(const std::string& elf, const std::vector<vcpu::IrqchipMode>& modes, uint32_t samples,
                 std::vector<Row>& rows) {
  for (vcpu::IrqchipMode mode : modes) {
    if (auto s = RunMode(elf, mode, samples, rows); !s.ok()) {
      return absl::Status(s.code(), fmt::format("{} irqchip: {}", vcpu::IrqchipModeName(mode), std::string(s.message())));
    }
  }
  auto exits = RunRecordWorkload(elf, vcpu::IrqchipMode::kKernel, guest::AGGVM_WORKLOAD_EXIT_LOOP, samples,
                                 VcpuIndex(0));
  if (!exits.ok()) return exits.status();
  rows.push_back({"-", "baseline: bare exit round trip (PIO)", Summarize(*exits)});
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"KVM interrupt latency benchmark (probe guest)"};
  uint32_t samples = 10000;
  std::string json_file;
  std::string elf = AGGVM_PROBE_GUEST_ELF;
  app.add_option("--samples", samples, "samples per measurement")->capture_default_str();
  app.add_option("--json", json_file, "write results as JSON to this file");
  app.add_option("--guest", elf, "probe guest ELF")->capture_default_str();
  std::string irqchip = "both";
  app.add_option("--irqchip", irqchip, "irqchip modes to measure: kernel | user | both")
      ->check(CLI::IsMember({"kernel", "user", "both"}))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  std::vector<vcpu::IrqchipMode> modes;
  if (irqchip != "user") modes.push_back(vcpu::IrqchipMode::kKernel);
  if (irqchip != "kernel") modes.push_back(vcpu::IrqchipMode::kUser);

  std::vector<Row> rows;
  if (auto s = Run(elf, modes, samples, rows); !s.ok()) {
    std::fprintf(stderr, "kvm_latency_bench: %s\n", s.ToString().c_str());
    return 1;
  }
  std::printf("%-7s %-56s %7s %9s %9s %9s %9s\n", "irqchip", "latency (µs)", "n", "p50", "p90", "p99", "max");
  nlohmann::json j = nlohmann::json::array();
  for (const auto& r : rows) {
    std::printf("%-7s %-56s %7zu %9.2f %9.2f %9.2f %9.2f\n", r.irqchip.c_str(), r.name.c_str(), r.us.count, r.us.p50,
                r.us.p90, r.us.p99, r.us.max);
    j.push_back({{"irqchip", r.irqchip}, {"name", r.name}, {"unit", "us"}, {"count", r.us.count}, {"p50", r.us.p50}, {"p90", r.us.p90},
                 {"p99", r.us.p99}, {"min", r.us.min}, {"max", r.us.max}, {"mean", r.us.mean}});
  }
  if (!json_file.empty()) {
    std::ofstream out(json_file);
    out << nlohmann::json{{"benchmark", "kvm_latency"}, {"samples", samples}, {"results", j}}.dump(2) << "\n";
    if (!out) {
      std::fprintf(stderr, "kvm_latency_bench: cannot write %s\n", json_file.c_str());
      return 1;
    }
  }
  return 0;
}
