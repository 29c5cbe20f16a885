// Devices that live on the master and are reached by port I/O from any vCPU of the VM, wherever it runs (a vCPU on
// another node forwards its IN/OUT as a kIoRequest frame; node-agent/io_forwarder.h).
//
// Contract: Read/Write run on the master's data-plane thread, one access at a time (no locking inside a device).
// `offset` is relative to the device's base; the bus has already checked that [offset, offset + size) lies inside the
// device's window and that size is 1, 2 or 4. A device never fails an access: what it does not implement it
// ignores (writes) or reads as defined in its header, and counts.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "common/types.h"

namespace aggvm::master {

class PioDevice {
 public:
  virtual ~PioDevice() = default;
  [[nodiscard]] virtual std::string_view name() const = 0;
  [[nodiscard]] virtual uint16_t base() const = 0;
  /// Number of ports in the window, >= 1.
  [[nodiscard]] virtual uint16_t size() const = 0;
  /// The value read; only the low `size` bytes are used.
  virtual uint32_t Read(VcpuIndex vcpu, uint16_t offset, uint8_t size) = 0;
  virtual void Write(VcpuIndex vcpu, uint16_t offset, uint8_t size, uint32_t value) = 0;
};

/// Port -> device. A handful of devices: linear search, no allocation per access.
class PioBus {
 public:
  /// Registers `device` (not owned; must outlive the bus). Refuses a window that wraps past 0xFFFF or overlaps
  /// another device's.
  absl::Status Add(PioDevice* device);
  /// The device whose window holds all of [port, port + size), with the offset of `port` in it; nullptr if none
  /// (no device there, or the access straddles a window's end).
  PioDevice* Find(uint64_t port, uint8_t size, uint16_t* offset) const;

 private:
  std::vector<PioDevice*> devices_;
};

}  // namespace aggvm::master
