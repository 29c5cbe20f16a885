#include "master/devices/pio_device.h"

#include <fmt/format.h>

namespace aggvm::master {

absl::Status PioBus::Add(PioDevice* device) {
  const uint32_t lo = device->base();
  const uint32_t hi = lo + device->size();  // exclusive
  if (device->size() == 0 || hi > 0x10000) {
    return absl::InvalidArgumentError(fmt::format("pio device '{}' window [{:#x}, {:#x}) is empty or passes 0xffff",
                                                  device->name(), lo, hi));
  }
  for (const PioDevice* d : devices_) {
    const uint32_t dlo = d->base();
    const uint32_t dhi = dlo + d->size();
    if (lo < dhi && dlo < hi) {
      return absl::AlreadyExistsError(
          fmt::format("pio device '{}' window [{:#x}, {:#x}) overlaps '{}' at [{:#x}, {:#x})", device->name(), lo, hi,
                      d->name(), dlo, dhi));
    }
  }
  devices_.push_back(device);
  return absl::OkStatus();
}

PioDevice* PioBus::Find(uint64_t port, uint8_t size, uint16_t* offset) const {
  for (PioDevice* d : devices_) {
    const uint64_t lo = d->base();
    if (port >= lo && port + size <= lo + d->size()) {
      *offset = static_cast<uint16_t>(port - lo);
      return d;
    }
  }
  return nullptr;
}

}  // namespace aggvm::master
