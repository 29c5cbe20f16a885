// An aggvm-bench experiment: what to run, as a JSON file, so that a run can be repeated exactly.
//
//   {
//     "name": "doorbell-matrix",
//     "workload": "doorbell",            // doorbell | storm | ipi-pingpong | ipi-broadcast
//     "samples": 500, "warmup": 50,       // doorbell: measured rings (one in flight); ipi-pingpong: rounds
//     "max_seconds": 60,                  // bound per configuration
//     "storm": {"rate_hz": 2000, "seconds": 2},   // storm: one train of edges at rate_hz raised by the first
//                                                 // node itself (<= 100 kHz, <= 10^6 edges)
//     "trace_cost": false,                // doorbell: alternate traced and untraced rings, compare their p50
//     "trace_cost_control": false,        // with trace_cost: keep the two groups but trace neither (A/A control)
//     "pace_us": 0,                       // doorbell: ring every pace_us on a fixed schedule (0: as soon as the
//                                         // previous ring's records are back)
//     "broadcast_dest": "all-excluding-self",  // ipi-broadcast: all-excluding-self | all-including-self |
//                                              // physical-broadcast
//     "nodes": 2,                         // local cluster: agents (node-a raises; the target is on the last node)
//     "clock_samples": 16,                // GetClock round trips per node for each offset estimate
//     "matrix": {
//       "transport": ["tcp-busy-poll", "tcp-epoll", "rdma"],
//       "irqchip": ["kernel", "user"],
//       "route_mode": ["via-master", "direct"],
//       "routing_policy": ["sdm", "round-robin", "node-local-first"]
//     }
//   }
//
// Every field but "name" has the default shown in Experiment. The configurations are the cartesian product of the
// matrix axes, in the order of the axes above, each value's order kept. Unknown fields are refused (a typo must not
// silently run another experiment).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "absl/status/statusor.h"

namespace aggvm::lab::runner {

/// One point of the matrix.
struct Configuration {
  std::string workload;
  std::string transport;       // tcp-busy-poll | tcp-epoll | rdma
  std::string irqchip;         // kernel | user
  std::string route_mode;      // via-master | direct
  std::string routing_policy;  // sdm | round-robin | node-local-first

  /// The key/values recorded in the results (ConfigurationResult::config).
  std::map<std::string, std::string> Labels() const;
};

struct Experiment {
  std::string name;
  std::string workload = "doorbell";
  uint32_t samples = 200;
  uint32_t warmup = 20;
  double max_seconds = 60;
  double storm_rate_hz = 1000;
  double storm_seconds = 2;
  bool trace_cost = false;
  bool trace_cost_control = false;
  /// doorbell: one ring every pace_us µs on a fixed schedule, so that every ring, traced or not, follows the same
  /// idle time (without it a traced ring's loop also waits for its trace record, which shifts the next ring's start).
  double pace_us = 0;
  std::string broadcast_dest = "all-excluding-self";
  uint32_t nodes = 2;
  uint32_t clock_samples = 16;
  std::vector<std::string> transports = {"tcp-busy-poll"};
  std::vector<std::string> irqchips = {"kernel"};
  std::vector<std::string> route_modes = {"via-master"};
  std::vector<std::string> routing_policies = {"sdm"};

  /// INVALID_ARGUMENT naming the field for anything unknown, mistyped or out of range.
  static absl::StatusOr<Experiment> FromJson(const nlohmann::json& j);
  static absl::StatusOr<Experiment> FromJsonString(std::string_view text);
  /// Every field, defaults included: what the results file records.
  nlohmann::json ToJson() const;

  std::vector<Configuration> Expand() const;
};

}  // namespace aggvm::lab::runner
