// Runs an aggvm-bench experiment (experiment.h) against a running aggvm cluster: for each configuration of the
// matrix it creates a probe-guest VM over the chosen nodes, runs the workload, and turns what comes back into a
// per-hop breakdown (lab/hop_breakdown.h) on the master's clock:
//
//   doorbell      RingDoorbell(traced) on the first node, GSI 4 -> vector 0x44 routed to the vCPU on the last node
//                 (fixed/physical for policy sdm, lowest-priority over every vCPU not on the first node otherwise),
//                 one interrupt in flight; per sample the target's trace record (lab/trace_record.h) and the guest's
//                 IRQ record (handler-entry rdtsc). With trace_cost, untraced rings alternate with traced ones and
//                 both are timed from the RPC to the handler (the only clock an untraced ring has).
//   storm         traced rings paced at storm.rate_hz for storm.seconds without waiting; the trace records' hops.
//   ipi-pingpong  the probe guest's ping (vCPU 0, first node) / pong (vCPU 1, second node) rounds; the round trip in
//                 end_to_end.
//   ipi-broadcast vCPU 0 (first node) sends one IPI to broadcast_dest (all-excluding-self by default: every other
//                 node) and waits for every recipient's answer; the round (IPI sent -> last answer) in end_to_end.
//
// Clocks: Lab.ProbeClocks at the start and the end of each configuration gives each node's offset and uncertainty
// against the master (RTT/2) and a (TSC, CLOCK_MONOTONIC) pair per node; remote stamps go through a ClockModel,
// guest rdtsc through the node's TSC rate fitted between the two pairs (guest TSC = host TSC is assumed: true on
// these hosts, FACTS.md; elsewhere a TSC offset applies).
//
// A configuration that cannot run is kept in the results with a status saying why ("skipped: no RDMA device on
// node-a ...", "failed: ..."), so a matrix always produces one row per configuration.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lab/results.h"
#include "lab/runner/experiment.h"

namespace aggvm::lab::runner {

struct RunOptions {
  std::string master_address;  // host:port of aggvm-master's gRPC service
  std::string cluster;         // what ExperimentResult::cluster records
  /// One line per configuration and notable event. May be empty.
  std::function<void(const std::string&)> progress;
};

/// Runs every configuration. Fails only when the cluster cannot be used at all (master unreachable, fewer UP nodes
/// than experiment.nodes); per-configuration problems become that configuration's status.
absl::StatusOr<ExperimentResult> RunExperiment(const Experiment& experiment, const RunOptions& options);

}  // namespace aggvm::lab::runner
