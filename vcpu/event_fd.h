// eventfd(2) and the two KVM bindings of it (api.rst, KVM_IRQFD and KVM_IOEVENTFD):
//  - IrqFd: a write to the eventfd injects the interrupt routed at a GSI (no vCPU ioctl, no exit);
//  - IoEventFd: a guest write to a port / MMIO address signals the eventfd inside KVM, without a userspace exit.
// IrqFd and IoEventFd deassign themselves on destruction; the Vm and the EventFd they bind must outlive them.
#pragma once

#include <cstdint>
#include <optional>

#include "absl/status/statusor.h"
#include "common/types.h"
#include "vcpu/unique_fd.h"

namespace aggvm::vcpu {

class Vm;

class EventFd {
 public:
  /// eventfd(0, EFD_CLOEXEC | flags).
  static absl::StatusOr<EventFd> Create(int flags = 0);
  [[nodiscard]] int fd() const { return fd_.get(); }
  /// Adds `value` to the counter (write(2)).
  absl::Status Signal(uint64_t value = 1);
  /// Reads and resets the counter (blocks unless EFD_NONBLOCK; then Unavailable when zero).
  absl::StatusOr<uint64_t> Consume();

 private:
  explicit EventFd(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;
};

class IrqFd {
 public:
  /// KVM_IRQFD: signalling `event` triggers `gsi` (route it with Vm::SetGsiRouting).
  static absl::StatusOr<IrqFd> Attach(Vm& vm, const EventFd& event, Gsi gsi);
  IrqFd(IrqFd&& o) noexcept;
  IrqFd& operator=(IrqFd&&) = delete;
  IrqFd(const IrqFd&) = delete;
  ~IrqFd();
  [[nodiscard]] Gsi gsi() const { return gsi_; }

 private:
  IrqFd(int vm_fd, int event_fd, Gsi gsi) : vm_fd_(vm_fd), event_fd_(event_fd), gsi_(gsi) {}
  int vm_fd_ = -1;     // borrowed
  int event_fd_ = -1;  // borrowed
  Gsi gsi_;
};

class IoEventFd {
 public:
  enum class Space { kPio, kMmio };
  /// KVM_IOEVENTFD: a guest write of `len` bytes (1, 2, 4 or 8) to `addr` signals `event`; with `datamatch`, only
  /// writes of that value do.
  static absl::StatusOr<IoEventFd> Attach(Vm& vm, const EventFd& event, Space space, uint64_t addr, uint32_t len,
                                          std::optional<uint64_t> datamatch = std::nullopt);
  IoEventFd(IoEventFd&& o) noexcept;
  IoEventFd& operator=(IoEventFd&&) = delete;
  IoEventFd(const IoEventFd&) = delete;
  ~IoEventFd();

 private:
  IoEventFd() = default;
  int vm_fd_ = -1;  // borrowed; -1 once moved from
  uint64_t addr_ = 0;
  uint32_t len_ = 0;
  int event_fd_ = -1;
  uint32_t flags_ = 0;
  uint64_t datamatch_ = 0;
};

}  // namespace aggvm::vcpu
