#include "tests/support/require.h"

#include <fcntl.h>
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
  ::close(fd);
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
