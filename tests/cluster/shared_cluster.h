// The cluster of processes of one end-to-end test binary (tests/support/cluster_launcher.h): started on the first
// test that needs it (ctest runs each test in its own process, so each case gets a fresh cluster), stopped by a
// GoogleTest global environment when the process ends. Include from one .cc per binary.
#pragma once

#include <memory>

#include <gtest/gtest.h>

#include "tests/support/cluster_launcher.h"
#include "tests/support/require.h"

namespace aggvm::testing {

class SharedCluster {
 public:
  /// The cluster, started with `options` on the first call; nullptr (after a test failure) if it did not come up.
  static ClusterLauncher* Get(const ClusterOptions& options) {
    (void)kEnvironment;
    if (!tried_) {
      tried_ = true;
      auto c = ClusterLauncher::Start(options);
      if (c.ok()) {
        instance_ = std::move(*c);
      } else {
        ADD_FAILURE() << c.status();
      }
    }
    return instance_.get();
  }

 private:
  class Environment : public ::testing::Environment {
   public:
    void TearDown() override { instance_.reset(); }
  };
  static inline std::unique_ptr<ClusterLauncher> instance_;
  static inline bool tried_ = false;
  // Registered before main (static initialisation): TearDown stops the daemons and removes the namespaces.
  static inline ::testing::Environment* const kEnvironment = ::testing::AddGlobalTestEnvironment(new Environment());
};

}  // namespace aggvm::testing

/// Skips (or fails, with AGGVM_REQUIRE=all) without /dev/kvm or namespaces; else binds `cluster` to the shared
/// cluster started with OPTIONS and waits until its 3 agents are UP.
#define AGGVM_SHARED_CLUSTER_OR_SKIP(OPTIONS)                                       \
  AGGVM_REQUIRE_KVM();                                                              \
  AGGVM_REQUIRE_NETNS();                                                            \
  ::aggvm::testing::ClusterLauncher* cluster = ::aggvm::testing::SharedCluster::Get(OPTIONS); \
  ASSERT_NE(cluster, nullptr) << "the cluster did not come up";                     \
  ASSERT_TRUE(cluster->WaitUp(3, absl::Seconds(20)))
