// Helpers shared by the KVM integration tests.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "node-agent/irq_probe.h"
#include "node-agent/probe_vm.h"

namespace aggvm::testing {

/// What a parametrized KVM test runs on: where the LAPICs live (KVM or userspace models) and the mode the guest
/// enables its LAPIC in (x2APIC MSRs or xAPIC MMIO).
struct ApicSetup {
  vcpu::IrqchipMode irqchip = vcpu::IrqchipMode::kKernel;
  bool x2apic = true;
};

/// Every combination, for INSTANTIATE_TEST_SUITE_P.
inline ::testing::internal::ParamGenerator<ApicSetup> AllApicSetups() {
  return ::testing::Values(ApicSetup{vcpu::IrqchipMode::kKernel, true}, ApicSetup{vcpu::IrqchipMode::kKernel, false},
                           ApicSetup{vcpu::IrqchipMode::kUser, true}, ApicSetup{vcpu::IrqchipMode::kUser, false});
}

/// "KernelX2apic", "UserXapic", ...
inline std::string ApicSetupName(const ::testing::TestParamInfo<ApicSetup>& info) {
  return std::string(info.param.irqchip == vcpu::IrqchipMode::kUser ? "User" : "Kernel") +
         (info.param.x2apic ? "X2apic" : "Xapic");
}

inline agent::ProbeVmConfig ProbeConfig(guest::aggvm_workload workload, uint32_t vcpus, ApicSetup setup = {}) {
  agent::ProbeVmConfig c;
  c.guest_elf = AGGVM_PROBE_GUEST_ELF;
  c.num_vcpus = vcpus;
  c.workload = workload;
  c.irqchip = setup.irqchip;
  c.x2apic = setup.x2apic;
  return c;
}

/// Polls `pred` every millisecond until it holds or `timeout` passes.
inline bool WaitUntil(const std::function<bool()>& pred, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return pred();
}

inline size_t CountRecords(const agent::VcpuReport& r, guest::aggvm_record_type type) {
  size_t n = 0;
  for (const auto& rec : r.records) n += rec.type == type;
  return n;
}

}  // namespace aggvm::testing
