#include "tests/support/require.h"

#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace aggvm::testing {

bool IsRequired(std::string_view what) {
  const char* env = std::getenv("AGGVM_REQUIRE");
  if (env == nullptr) return false;
  std::stringstream ss(env);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item == "all" || item == what) return true;
  }
  return false;
}

std::string KvmUnavailableReason() {
  int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) return std::string("cannot open /dev/kvm: ") + std::strerror(errno);
  const int version = ::ioctl(fd, KVM_GET_API_VERSION, 0);
  const int err = errno;
  ::close(fd);
  if (version != KVM_API_VERSION) {
    return "/dev/kvm does not answer KVM_GET_API_VERSION with " + std::to_string(KVM_API_VERSION) + " (got " +
           std::to_string(version) + (version < 0 ? std::string(": ") + std::strerror(err) : std::string()) + ")";
  }
  return {};
}

std::string NetnsUnavailableReason() {
  if (::geteuid() != 0) return "network namespace tests need root";
  if (::access("/usr/sbin/ip", X_OK) != 0 && ::access("/sbin/ip", X_OK) != 0 && ::access("/usr/bin/ip", X_OK) != 0) {
    return "iproute2 `ip` not found";
  }
  return {};
}

}  // namespace aggvm::testing
