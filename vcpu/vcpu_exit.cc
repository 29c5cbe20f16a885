#include "vcpu/vcpu_exit.h"

#include <cstring>

#include <fmt/format.h>

namespace aggvm::vcpu {

uint32_t IoOut::Value() const {
  uint32_t v = 0;
  std::memcpy(&v, data.data(), std::min<size_t>(size, sizeof v));
  return v;
}

namespace {
MsrExitReason DecodeMsrReason(uint32_t reason) {
  switch (reason) {
    case KVM_MSR_EXIT_REASON_UNKNOWN:
      return MsrExitReason::kUnknown;
    case KVM_MSR_EXIT_REASON_INVAL:
      return MsrExitReason::kInvalid;
    case KVM_MSR_EXIT_REASON_FILTER:
      return MsrExitReason::kFilter;
    default:
      return MsrExitReason::kOther;
  }
}
}  // namespace

VcpuExit DecodeExit(kvm_run& run, size_t mmap_size) {
  switch (run.exit_reason) {
    case KVM_EXIT_IO: {
      const auto& io = run.io;
      if (io.size != 1 && io.size != 2 && io.size != 4) {
        return UnknownExit{run.exit_reason, fmt::format("port I/O with size {}", io.size)};
      }
      const uint64_t bytes = uint64_t{io.size} * io.count;
      if (io.count == 0 || io.data_offset < sizeof(kvm_run) || io.data_offset > mmap_size ||
          bytes > mmap_size - io.data_offset) {
        return UnknownExit{run.exit_reason, fmt::format("port I/O data (offset {}, {} bytes) outside kvm_run ({} bytes)",
                                                        io.data_offset, bytes, mmap_size)};
      }
      auto* base = reinterpret_cast<uint8_t*>(&run) + io.data_offset;
      if (io.direction == KVM_EXIT_IO_IN) {
        return IoIn{io.port, io.size, io.count, std::span<uint8_t>(base, bytes)};
      }
      return IoOut{io.port, io.size, io.count, std::span<const uint8_t>(base, bytes)};
    }
    case KVM_EXIT_MMIO: {
      const auto& m = run.mmio;
      if (m.len == 0 || m.len > sizeof m.data) {
        return UnknownExit{run.exit_reason, fmt::format("MMIO of length {}", m.len)};
      }
      if (m.is_write) return MmioWrite{GuestAddress(m.phys_addr), std::span<const uint8_t>(m.data, m.len)};
      return MmioRead{GuestAddress(m.phys_addr), std::span<uint8_t>(run.mmio.data, m.len)};
    }
    case KVM_EXIT_IOAPIC_EOI:
      return IoapicEoi{Vector(run.eoi.vector)};
    case KVM_EXIT_HLT:
      return Hlt{};
    case KVM_EXIT_SHUTDOWN:
      return Shutdown{};
    case KVM_EXIT_INTERNAL_ERROR:
      return InternalError{run.internal.suberror};
    case KVM_EXIT_FAIL_ENTRY:
      return FailEntry{run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu};
    case KVM_EXIT_INTR:
      return Kicked{};
    case KVM_EXIT_IRQ_WINDOW_OPEN:
      return IrqWindowOpen{};
    case KVM_EXIT_SYSTEM_EVENT:
      return SystemEvent{run.system_event.type};
    case KVM_EXIT_X86_RDMSR:
      run.msr.error = 0;  // default: the read succeeds (with whatever Reply() puts in data)
      run.msr.data = 0;
      return MsrRead{run.msr.index, DecodeMsrReason(run.msr.reason), &run.msr.data, &run.msr.error};
    case KVM_EXIT_X86_WRMSR:
      run.msr.error = 0;
      return MsrWrite{run.msr.index, DecodeMsrReason(run.msr.reason), run.msr.data, &run.msr.error};
    default:
      return UnknownExit{run.exit_reason, "exit reason not handled by aggvm"};
  }
}

namespace {
struct Describer {
  std::string operator()(const IoIn& e) const {
    return fmt::format("IN port {:#x} size {} count {}", e.port, e.size, e.count);
  }
  std::string operator()(const IoOut& e) const {
    return fmt::format("OUT port {:#x} size {} count {} value {:#x}", e.port, e.size, e.count, e.Value());
  }
  std::string operator()(const MmioRead& e) const { return fmt::format("MMIO read of {} ({} bytes)", e.gpa, e.data.size()); }
  std::string operator()(const MmioWrite& e) const {
    return fmt::format("MMIO write to {} ({} bytes)", e.gpa, e.data.size());
  }
  std::string operator()(const IoapicEoi& e) const { return fmt::format("IOAPIC EOI vector {}", e.vector); }
  std::string operator()(const Hlt&) const { return "HLT"; }
  std::string operator()(const Shutdown&) const { return "shutdown (triple fault)"; }
  std::string operator()(const InternalError& e) const { return fmt::format("KVM internal error, suberror {}", e.suberror); }
  std::string operator()(const FailEntry& e) const {
    return fmt::format("VM entry failure, reason {:#x} on cpu {}", e.reason, e.cpu);
  }
  std::string operator()(const Kicked&) const { return "kicked (EINTR)"; }
  std::string operator()(const IrqWindowOpen&) const { return "interrupt window open"; }
  std::string operator()(const SystemEvent& e) const { return fmt::format("system event type {}", e.type); }
  std::string operator()(const MsrRead& e) const { return fmt::format("RDMSR {:#x}", e.index); }
  std::string operator()(const MsrWrite& e) const { return fmt::format("WRMSR {:#x} value {:#x}", e.index, e.value); }
  std::string operator()(const UnknownExit& e) const { return fmt::format("exit reason {}: {}", e.reason, e.detail); }
};
}  // namespace

std::string DescribeExit(const VcpuExit& exit) { return std::visit(Describer{}, exit); }

}  // namespace aggvm::vcpu
