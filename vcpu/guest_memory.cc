#include "vcpu/guest_memory.h"

#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "vcpu/errno_status.h"
#include "vcpu/vm.h"

namespace aggvm::vcpu {

absl::StatusOr<GuestMemory> GuestMemory::Create(Vm& vm, uint32_t slot, GuestAddress base, uint64_t size) {
  if (size == 0 || size % 4096 != 0 || base.raw() % 4096 != 0 || !base.checked_add(size)) {
    return absl::InvalidArgumentError(
        absl::StrCat("guest memory region at ", absl::Hex(base.raw()), " of ", size,
                     " bytes: base and size must be non-zero multiples of 4096 that do not overflow"));
  }
  void* host = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (host == MAP_FAILED) return ErrnoStatus(errno, absl::StrCat("mmap of ", size, " bytes of guest memory"));
  GuestMemory mem(vm.fd(), slot, base, size, static_cast<uint8_t*>(host));
  kvm_userspace_memory_region region{};
  region.slot = slot;
  region.guest_phys_addr = base.raw();
  region.memory_size = size;
  region.userspace_addr = reinterpret_cast<uint64_t>(host);
  if (::ioctl(vm.fd(), KVM_SET_USER_MEMORY_REGION, &region) != 0) {
    const int err = errno;
    mem.vm_fd_ = -1;  // nothing registered: the destructor only unmaps
    return ErrnoStatus(err, absl::StrCat("KVM_SET_USER_MEMORY_REGION(slot ", slot, ", gpa ", absl::Hex(base.raw()),
                                         ", ", size, " bytes)"));
  }
  return mem;
}

GuestMemory::GuestMemory(GuestMemory&& o) noexcept
    : vm_fd_(std::exchange(o.vm_fd_, -1)),
      slot_(o.slot_),
      base_(o.base_),
      size_(std::exchange(o.size_, 0)),
      host_(std::exchange(o.host_, nullptr)) {}

GuestMemory::~GuestMemory() {
  if (vm_fd_ >= 0) {
    kvm_userspace_memory_region region{};
    region.slot = slot_;
    region.memory_size = 0;  // deletes the slot
    ::ioctl(vm_fd_, KVM_SET_USER_MEMORY_REGION, &region);
  }
  if (host_ != nullptr) ::munmap(host_, size_);
}

bool GuestMemory::Contains(GuestAddress gpa, uint64_t len) const {
  if (gpa.raw() < base_.raw()) return false;
  const uint64_t off = gpa.raw() - base_.raw();
  return off <= size_ && len <= size_ - off;
}

absl::StatusOr<std::span<uint8_t>> GuestMemory::Slice(GuestAddress gpa, uint64_t len) {
  if (!Contains(gpa, len)) {
    return absl::OutOfRangeError(absl::StrCat("guest range [", absl::Hex(gpa.raw()), ", +", len,
                                              ") is outside guest memory [", absl::Hex(base_.raw()), ", ",
                                              absl::Hex(base_.raw() + size_), ")"));
  }
  return std::span<uint8_t>(host_ + (gpa.raw() - base_.raw()), len);
}

absl::Status GuestMemory::Write(GuestAddress gpa, std::span<const uint8_t> bytes) {
  auto s = Slice(gpa, bytes.size());
  if (!s.ok()) return s.status();
  std::memcpy(s->data(), bytes.data(), bytes.size());
  return absl::OkStatus();
}

}  // namespace aggvm::vcpu
