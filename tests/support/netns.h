// Network namespaces for integration tests: N "hosts" joined by veth pairs to one bridge, made and removed by the test.
//
//   hub namespace  <prefix>hub : bridge br0 (up), veth v<i> enslaved to it for each host i
//   host namespace <prefix><i> : eth0 = the other end of v<i>, address 10.<subnet>.0.<i+1>/24, lo up
//
// The bridge lives in its own namespace (not the host's), so the host's firewall and bridge-netfilter settings don't
// apply and nothing is left in the root namespace. Names carry the test process id, so parallel ctest runs don't
// collide. The destructor deletes every namespace (which removes the veths and the bridge), also when the test
// failed part-way; namespaces left by a crashed earlier run with the same prefix are removed at creation.
//
// Work runs inside a host namespace either on a thread (RunInNamespace / EnterNamespace: setns(2) changes only the
// calling thread; sockets keep the namespace they were created in, so they may be used from any thread afterwards)
// or in a child process (SpawnInNamespace: fork, setns, execv).
//
// Needs root and iproute2 (see AGGVM_REQUIRE_NETNS in require.h).
#pragma once

#include <sys/types.h>

#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace aggvm::testing {

class NetnsTopology {
 public:
  /// Creates `hosts` namespaces joined by a bridge. `tag` (a few [a-z0-9] chars) goes into the names with the pid.
  static absl::StatusOr<NetnsTopology> Create(int hosts, std::string tag);
  NetnsTopology(NetnsTopology&&) noexcept;
  NetnsTopology& operator=(NetnsTopology&&) noexcept;
  ~NetnsTopology();

  int hosts() const { return static_cast<int>(names_.size()); }
  /// Name of host i's namespace (for `ip netns exec` or SpawnInNamespace).
  const std::string& name(int i) const { return names_.at(static_cast<size_t>(i)); }
  /// IPv4 address of host i's eth0, e.g. "10.213.0.2".
  std::string address(int i) const;

  /// Runs fn on a new thread that has entered host i's namespace, and joins it. Returns fn's status, or the
  /// setns error.
  absl::Status RunInNamespace(int i, const std::function<absl::Status()>& fn) const;
  /// Moves the calling thread into host i's namespace (for threads the caller manages).
  absl::Status EnterNamespace(int i) const;
  /// Forks a child that enters host i's namespace and execs argv (argv[0] is the path). Returns its pid.
  absl::StatusOr<pid_t> SpawnInNamespace(int i, const std::vector<std::string>& argv) const;

  /// Deletes everything (idempotent; also done by the destructor).
  void Destroy();

 private:
  NetnsTopology() = default;
  std::string hub_;
  std::vector<std::string> names_;
  int subnet_ = 0;
};

/// Runs `ip` with the arguments; OK if it exits 0, else an error with its stderr. Exposed for tests' own tweaks.
absl::Status RunIp(const std::vector<std::string>& args);

}  // namespace aggvm::testing
