// aggvm-agent: the node agent. For now only --standalone: run the probe guest on this node and print what it measured.
#include <cstdio>
#include <fstream>
#include <string>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "node-agent/standalone.h"

#ifndef AGGVM_DEFAULT_GUEST_ELF
#define AGGVM_DEFAULT_GUEST_ELF ""
#endif

int main(int argc, char** argv) {
  CLI::App app{"aggvm node agent"};
  bool standalone = false;
  aggvm::agent::StandaloneOptions opt;
  opt.guest_elf = AGGVM_DEFAULT_GUEST_ELF;
  std::string json_file;
  double timeout_s = 120;
  app.add_flag("--standalone", standalone, "run the probe guest on this node only (no master)");
  app.add_option("--vcpus", opt.vcpus, "number of vCPUs")->check(CLI::Range(1, 64));
  app.add_option("--workload", opt.workload, "hello | ipi-pingpong | irq-sink | exit-loop | bad-port | unmapped | triple-fault");
  app.add_option("--iterations", opt.iterations, "rounds / samples (default 1000)");
  app.add_flag("--xapic", opt.xapic, "guest uses its LAPIC in xAPIC (MMIO) mode instead of x2APIC");
  std::string irqchip = "kernel";
  app.add_option("--irqchip", irqchip,
                 "where the local APICs live: kernel (KVM's, split irqchip) | user (LAPIC models in userspace, "
                 "KVM_INTERRUPT)")
      ->check(CLI::IsMember({"kernel", "user"}))
      ->capture_default_str();
  app.add_option("--guest", opt.guest_elf, "probe guest ELF")->capture_default_str();
  app.add_option("--timeout", timeout_s, "seconds before the run is declared hung")->capture_default_str();
  app.add_option("--json", json_file, "also write the results as JSON to this file");
  CLI11_PARSE(app, argc, argv);
  if (!standalone) {
    spdlog::error("only --standalone is implemented so far");
    return 2;
  }
  opt.timeout = absl::Seconds(timeout_s);
  auto mode = aggvm::vcpu::ParseIrqchipMode(irqchip);
  if (!mode.ok()) {
    spdlog::error("{}", mode.status().ToString());
    return 2;
  }
  opt.irqchip = *mode;

  spdlog::info("running workload {} on {} vCPU(s), {} irqchip, with {}", opt.workload, opt.vcpus, irqchip,
               opt.guest_elf);
  auto result = aggvm::agent::RunStandalone(opt);
  if (!result.ok()) {
    spdlog::error("{}", result.status().ToString());
    return 1;
  }
  std::fputs(aggvm::agent::FormatResult(*result).c_str(), stdout);
  if (!json_file.empty()) {
    std::ofstream out(json_file);
    out << aggvm::agent::ResultToJson(*result).dump(2) << "\n";
    if (!out) {
      spdlog::error("cannot write {}", json_file);
      return 1;
    }
  }
  return 0;
}
