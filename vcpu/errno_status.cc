#include "vcpu/errno_status.h"

#include <cstring>

#include <fmt/format.h>

namespace aggvm::vcpu {

absl::Status ErrnoStatus(int err, std::string_view call, std::string_view what_to_do) {
  std::string msg = fmt::format("{} failed: {} (errno {})", call, std::strerror(err), err);
  if (!what_to_do.empty()) msg += fmt::format("; {}", what_to_do);
  return absl::Status(absl::ErrnoToStatusCode(err), msg);
}

}  // namespace aggvm::vcpu
