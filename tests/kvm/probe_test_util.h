// Helpers shared by the KVM integration tests.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <thread>

#include <gtest/gtest.h>

#include "node-agent/irq_probe.h"
#include "node-agent/probe_vm.h"

namespace aggvm::testing {

inline agent::ProbeVmConfig ProbeConfig(guest::aggvm_workload workload, uint32_t vcpus) {
  agent::ProbeVmConfig c;
  c.guest_elf = AGGVM_PROBE_GUEST_ELF;
  c.num_vcpus = vcpus;
  c.workload = workload;
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
