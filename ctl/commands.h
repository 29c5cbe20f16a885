// aggvmctl's commands: each talks to the master over gRPC, prints a human-readable result to `out` and returns the
// error (with what to do) otherwise. No gRPC types in this header: main.cc only parses flags.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace aggvm::ctl {

struct CtlOptions {
  std::string master = "127.0.0.1:7070";    // --master host:port
  absl::Duration timeout = absl::Seconds(5);  // per unary call (connecting included)
};

absl::Status Status(const CtlOptions& opt, std::ostream& out);
/// Offline: parses and validates a spec file without a master (node names are not checked).
absl::Status VmValidate(const std::string& spec_file, std::ostream& out);
absl::Status VmCreate(const CtlOptions& opt, const std::string& spec_file, std::ostream& out);
/// verb: "start", "pause" or "stop".
absl::Status VmLifecycle(const CtlOptions& opt, const std::string& verb, const std::string& name, std::ostream& out);
absl::Status VmList(const CtlOptions& opt, std::ostream& out);
absl::Status VmGet(const CtlOptions& opt, const std::string& name, std::ostream& out);
absl::Status VmTopology(const CtlOptions& opt, const std::string& name, std::ostream& out);
absl::Status VmRouting(const CtlOptions& opt, const std::string& name, std::ostream& out);
/// Switches a VM's routing policy ("sdm", "round-robin", "node-local-first", "static"); `pins` are static-policy
/// routes "VECTOR=VCPU". A running VM's router switches at once.
absl::Status VmPolicy(const CtlOptions& opt, const std::string& name, const std::string& policy,
                      const std::vector<std::string>& pins, std::ostream& out);

struct DoorbellOptions {
  std::string vm;
  std::string node;      // the node that raises the GSI (as its own device would)
  uint32_t gsi = 0;
  bool level = false;    // level-triggered source (held) instead of one edge
  bool deassert = false; // level: drop the line (default: assert)
  bool traced = false;
  uint32_t count = 0;       // a train of `count` edges, one every interval_us, timed by the node (0: one ring)
  uint32_t interval_us = 0;
};
/// Rings the master's doorbell device: node `node` raises `gsi`.
absl::Status Doorbell(const CtlOptions& opt, const DoorbellOptions& d, std::ostream& out);

struct FollowOptions {
  absl::Duration duration = absl::InfiniteDuration();  // stop following after this long
  uint64_t max_lines = 0;                               // stop after this many console lines (0 = no limit)
  bool records = false;                                 // also print the guest's result records (IRQ, HELLO, ...)
};
/// Prints the VM's console lines (and state changes) as they arrive.
absl::Status Console(const CtlOptions& opt, const std::string& vm, const FollowOptions& follow, std::ostream& out);
/// Prints each UP node's CLOCK_MONOTONIC offset against the master's, with its uncertainty (RTT/2 method over
/// `samples` GetClock round trips per node, Lab.ProbeClocks).
absl::Status Clocks(const CtlOptions& opt, uint32_t samples, std::ostream& out);
/// Prints every event (nodes joining / lost, VM state changes) as they arrive.
absl::Status Events(const CtlOptions& opt, const FollowOptions& follow, std::ostream& out);

}  // namespace aggvm::ctl
