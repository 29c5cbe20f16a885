// `aggvm-agent --standalone`: runs the probe guest with one workload on this node and summarises what it measured.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/stats.h"
#include "vcpu/interrupt_injector.h"

namespace aggvm::agent {

struct StandaloneOptions {
  std::string guest_elf;
  uint32_t vcpus = 1;
  std::string workload = "hello";
  uint32_t iterations = 0;  // 0: the workload's default (1000)
  bool xapic = false;
  vcpu::IrqchipMode irqchip = vcpu::IrqchipMode::kKernel;
  absl::Duration timeout = absl::Seconds(120);
};

struct Measurement {
  std::string name;
  Summary us;  // microseconds
};

struct StandaloneResult {
  std::string workload;
  std::string irqchip;  // "kernel" / "user"
  uint32_t vcpus = 0;
  uint64_t tsc_khz = 0;
  std::vector<std::string> console;  // "vcpu N: line"
  std::vector<Measurement> measurements;
  /// Records / EOIs the VM did not keep (its per-vCPU store was full): measurements then cover only the kept ones.
  uint64_t dropped_records = 0;
  uint64_t dropped_eois = 0;
};

/// Runs the VM to completion. A misbehaving guest is an error naming what it did.
absl::StatusOr<StandaloneResult> RunStandalone(const StandaloneOptions& options);

/// The result as a table for the terminal, and as JSON.
std::string FormatResult(const StandaloneResult& result);
nlohmann::json ResultToJson(const StandaloneResult& result);

}  // namespace aggvm::agent
