#include "vcpu/kvm.h"

#include <fcntl.h>
#include <sys/ioctl.h>

#include <algorithm>
#include <memory>

#include <fmt/format.h>

#include "absl/strings/str_cat.h"
#include "vcpu/errno_status.h"
#include "vcpu/kvm_abi.h"
#include "vcpu/vm.h"

namespace aggvm::vcpu {

absl::StatusOr<Kvm> Kvm::Open(const char* path) {
  UniqueFd fd(::open(path, O_RDWR | O_CLOEXEC));
  if (!fd.valid()) {
    return ErrnoStatus(errno, absl::StrCat("open(", path, ")"),
                       "is the kvm module loaded and is this user in group 'kvm'?");
  }
  const int version = ::ioctl(fd.get(), KVM_GET_API_VERSION, 0);
  if (version != KVM_API_VERSION) {
    return absl::FailedPreconditionError(
        absl::StrCat("KVM_GET_API_VERSION returned ", version, ", this VMM needs ", KVM_API_VERSION));
  }
  const int size = ::ioctl(fd.get(), KVM_GET_VCPU_MMAP_SIZE, 0);
  if (size < static_cast<int>(sizeof(kvm_run))) return ErrnoStatus(errno, "KVM_GET_VCPU_MMAP_SIZE");
  return Kvm(std::move(fd), static_cast<size_t>(size));
}

int Kvm::CheckExtension(long cap) const {
  const int r = ::ioctl(fd_.get(), KVM_CHECK_EXTENSION, cap);
  return r < 0 ? 0 : r;
}

absl::Status Kvm::RequireExtension(long cap, std::string_view name) const {
  if (CheckExtension(cap) > 0) return absl::OkStatus();
  return absl::FailedPreconditionError(
      fmt::format("KVM capability {} ({}) is not available on this host; aggvm needs it", name, cap));
}

absl::StatusOr<std::vector<kvm_cpuid_entry2>> Kvm::SupportedCpuid() const {
  for (uint32_t n = 64; n <= 4096; n *= 2) {
    abi::FlexBuffer<kvm_cpuid_entry2> buf(n);
    if (::ioctl(fd_.get(), abi::kGetSupportedCpuid, buf.arg()) == 0) {
      const uint32_t got = std::min<uint32_t>(buf.header()->count, n);
      return std::vector<kvm_cpuid_entry2>(buf.entries(), buf.entries() + got);
    }
    if (errno != E2BIG) return ErrnoStatus(errno, "KVM_GET_SUPPORTED_CPUID");
  }
  return absl::ResourceExhaustedError("KVM_GET_SUPPORTED_CPUID: more than 4096 entries");
}

absl::StatusOr<Vm> Kvm::CreateVm() const {
  int vm;
  do {
    vm = ::ioctl(fd_.get(), KVM_CREATE_VM, 0);
  } while (vm < 0 && errno == EINTR);
  if (vm < 0) return ErrnoStatus(errno, "KVM_CREATE_VM");
  return Vm(UniqueFd(vm), vcpu_mmap_size_);
}

}  // namespace aggvm::vcpu
