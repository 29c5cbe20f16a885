// errno -> absl::Status for the thin ioctl wrappers of this folder.
#pragma once

#include <cerrno>
#include <string_view>

#include "absl/status/status.h"

namespace aggvm::vcpu {

/// A status for a failed system call: the code follows errno (absl::ErrnoToStatusCode), the message names the call,
/// the errno text and `what_to_do` (may be empty).
absl::Status ErrnoStatus(int err, std::string_view call, std::string_view what_to_do = {});

}  // namespace aggvm::vcpu
