// The KVM system: /dev/kvm, its capabilities and CPUID, and VM creation (Documentation/virt/kvm/api.rst §4,
// "System ioctls"). Thin wrapper: errors are returned, nothing is logged.
#pragma once

#include <linux/kvm.h>

#include <cstddef>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "vcpu/unique_fd.h"

namespace aggvm::vcpu {

class Vm;

class Kvm {
 public:
  /// Opens `path` and checks KVM_GET_API_VERSION == 12.
  static absl::StatusOr<Kvm> Open(const char* path = "/dev/kvm");

  [[nodiscard]] int fd() const { return fd_.get(); }
  /// KVM_CHECK_EXTENSION: 0 = absent, > 0 present (some caps return a value, e.g. KVM_CAP_MAX_VCPUS).
  [[nodiscard]] int CheckExtension(long cap) const;
  /// FailedPrecondition naming the capability when it is absent.
  absl::Status RequireExtension(long cap, std::string_view name) const;
  /// Size of each vCPU's kvm_run mapping (KVM_GET_VCPU_MMAP_SIZE).
  [[nodiscard]] size_t vcpu_mmap_size() const { return vcpu_mmap_size_; }
  /// KVM_GET_SUPPORTED_CPUID: what a guest may be shown.
  absl::StatusOr<std::vector<kvm_cpuid_entry2>> SupportedCpuid() const;
  /// KVM_CREATE_VM (default machine type).
  absl::StatusOr<Vm> CreateVm() const;

 private:
  Kvm(UniqueFd fd, size_t mmap_size) : fd_(std::move(fd)), vcpu_mmap_size_(mmap_size) {}
  UniqueFd fd_;
  size_t vcpu_mmap_size_ = 0;
};

}  // namespace aggvm::vcpu
