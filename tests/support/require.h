// Prerequisites of tests that need real kernel facilities (/dev/kvm, network namespaces, qemu for rdma_rxe).
//
// On a user's machine a missing prerequisite is a clear skip. In CI it is a failure: the test script exports
// AGGVM_REQUIRE=all (or a comma list such as "kvm,netns"), set by `scripts/test.sh --require-all` and `.ci/run`.
#pragma once

#include <string>
#include <string_view>

#include <gtest/gtest.h>

namespace aggvm::testing {

/// True when AGGVM_REQUIRE names `what` (or "all"): a missing prerequisite must then fail the test.
bool IsRequired(std::string_view what);

/// Empty if /dev/kvm can be opened read-write, else the reason.
std::string KvmUnavailableReason();
/// Empty if this process may create network namespaces (root, `ip` present), else the reason.
std::string NetnsUnavailableReason();

}  // namespace aggvm::testing

/// Skips (user machine) or fails (CI) the current test when `reason_expr` is a non-empty reason.
#define AGGVM_REQUIRE_OR_SKIP(what, reason_expr)                                                         \
  do {                                                                                                   \
    const std::string aggvm_reason_ = (reason_expr);                                                     \
    if (!aggvm_reason_.empty()) {                                                                        \
      if (::aggvm::testing::IsRequired(what)) {                                                          \
        FAIL() << "required prerequisite '" << (what) << "' missing: " << aggvm_reason_                  \
               << " (AGGVM_REQUIRE is set)";                                                             \
      }                                                                                                  \
      GTEST_SKIP() << "skipping: " << aggvm_reason_ << " (set AGGVM_REQUIRE=" << (what)                  \
                   << " to make this a failure)";                                                        \
    }                                                                                                    \
  } while (0)

#define AGGVM_REQUIRE_KVM() AGGVM_REQUIRE_OR_SKIP("kvm", ::aggvm::testing::KvmUnavailableReason())
#define AGGVM_REQUIRE_NETNS() AGGVM_REQUIRE_OR_SKIP("netns", ::aggvm::testing::NetnsUnavailableReason())
