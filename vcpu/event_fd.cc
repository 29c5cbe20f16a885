#include "vcpu/event_fd.h"

#include <linux/kvm.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "vcpu/errno_status.h"
#include "vcpu/vm.h"

namespace aggvm::vcpu {

absl::StatusOr<EventFd> EventFd::Create(int flags) {
  UniqueFd fd(::eventfd(0, EFD_CLOEXEC | flags));
  if (!fd.valid()) return ErrnoStatus(errno, "eventfd");
  return EventFd(std::move(fd));
}

absl::Status EventFd::Signal(uint64_t value) {
  if (::write(fd_.get(), &value, sizeof value) != static_cast<ssize_t>(sizeof value)) {
    return ErrnoStatus(errno, "eventfd write");
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> EventFd::Consume() {
  uint64_t v = 0;
  if (::read(fd_.get(), &v, sizeof v) != static_cast<ssize_t>(sizeof v)) return ErrnoStatus(errno, "eventfd read");
  return v;
}

absl::StatusOr<IrqFd> IrqFd::Attach(Vm& vm, const EventFd& event, Gsi gsi) {
  kvm_irqfd req{};
  req.fd = static_cast<uint32_t>(event.fd());
  req.gsi = gsi.value();
  if (::ioctl(vm.fd(), KVM_IRQFD, &req) != 0) {
    return ErrnoStatus(errno, absl::StrCat("KVM_IRQFD(gsi ", gsi.value(), ")"),
                       "the VM needs an in-kernel irqchip (split irqchip) before irqfds are attached");
  }
  return IrqFd(vm.fd(), event.fd(), gsi);
}

IrqFd::IrqFd(IrqFd&& o) noexcept
    : vm_fd_(std::exchange(o.vm_fd_, -1)), event_fd_(std::exchange(o.event_fd_, -1)), gsi_(o.gsi_) {}

IrqFd::~IrqFd() {
  if (vm_fd_ < 0) return;
  kvm_irqfd req{};
  req.fd = static_cast<uint32_t>(event_fd_);
  req.gsi = gsi_.value();
  req.flags = KVM_IRQFD_FLAG_DEASSIGN;
  ::ioctl(vm_fd_, KVM_IRQFD, &req);
}

namespace {
kvm_ioeventfd MakeIoeventfd(uint64_t addr, uint32_t len, int fd, uint32_t flags, uint64_t datamatch) {
  kvm_ioeventfd req{};
  req.addr = addr;
  req.len = len;
  req.fd = fd;
  req.flags = flags;
  req.datamatch = datamatch;
  return req;
}
}  // namespace

absl::StatusOr<IoEventFd> IoEventFd::Attach(Vm& vm, const EventFd& event, Space space, uint64_t addr, uint32_t len,
                                            std::optional<uint64_t> datamatch) {
  if (len != 1 && len != 2 && len != 4 && len != 8) {
    return absl::InvalidArgumentError(absl::StrCat("ioeventfd length ", len, " (must be 1, 2, 4 or 8)"));
  }
  IoEventFd out;
  out.addr_ = addr;
  out.len_ = len;
  out.event_fd_ = event.fd();
  out.flags_ = (space == Space::kPio ? KVM_IOEVENTFD_FLAG_PIO : 0) | (datamatch ? KVM_IOEVENTFD_FLAG_DATAMATCH : 0);
  out.datamatch_ = datamatch.value_or(0);
  kvm_ioeventfd req = MakeIoeventfd(addr, len, out.event_fd_, out.flags_, out.datamatch_);
  if (::ioctl(vm.fd(), KVM_IOEVENTFD, &req) != 0) {
    return ErrnoStatus(errno, absl::StrCat("KVM_IOEVENTFD(", space == Space::kPio ? "port " : "gpa ",
                                           absl::Hex(addr), ", len ", len, ")"));
  }
  out.vm_fd_ = vm.fd();
  return out;
}

IoEventFd::IoEventFd(IoEventFd&& o) noexcept
    : vm_fd_(std::exchange(o.vm_fd_, -1)),
      addr_(o.addr_),
      len_(o.len_),
      event_fd_(o.event_fd_),
      flags_(o.flags_),
      datamatch_(o.datamatch_) {}

IoEventFd::~IoEventFd() {
  if (vm_fd_ < 0) return;
  kvm_ioeventfd req = MakeIoeventfd(addr_, len_, event_fd_, flags_ | KVM_IOEVENTFD_FLAG_DEASSIGN, datamatch_);
  ::ioctl(vm_fd_, KVM_IOEVENTFD, &req);
}

}  // namespace aggvm::vcpu
