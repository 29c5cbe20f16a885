// Remote clock offset estimation by the RTT/2 method (Cristian's algorithm, as NTP's on-wire exchange).
//
// A probe is sent at local time t_send, stamped by the remote at t_remote (its own clock), and its answer received
// at local time t_recv. If the two one-way delays were equal, the remote read its clock at local time
// (t_send + t_recv)/2, so offset = t_remote - (t_send + t_recv)/2 (remote = local + offset). Whatever the delays,
// the true offset lies in [t_remote - t_recv, t_remote - t_send], i.e. within ±RTT/2 of that estimate. Queueing only
// adds delay, so the samples with the smallest RTT carry the tightest bound: the estimate uses the minimum-RTT
// sample(s), and the uncertainty reported is RTT_min/2 (a hard bound, assuming no drift during one probe; when
// several probes share the minimum RTT their offsets are averaged and the bound grows to at most RTT_min).
//
// Two estimates (start and end of a run) give the drift; ClockModel maps remote timestamps to the local clock at
// any time in between (and extrapolates linearly outside).
//
// Pure logic: the probes themselves travel over the control plane (the caller's concern).
#pragma once

#include <cstdint>
#include <limits>
#include <span>

#include "absl/status/statusor.h"

namespace aggvm::lab {

struct ClockSample {
  uint64_t t_send_local = 0;
  uint64_t t_remote = 0;
  uint64_t t_recv_local = 0;
};

struct OffsetEstimate {
  double offset_ns = 0;       // remote - local
  double uncertainty_ns = 0;  // the true offset is within offset_ns ± uncertainty_ns (rtt_min_ns / 2 from one best probe)
  uint64_t rtt_min_ns = 0;
  double at_local_ns = 0;     // the local time the estimate refers to (mid-point of the min-RTT probe)
  size_t samples_used = 0;    // samples whose RTT is within the tolerance of the minimum
  size_t samples_rejected = 0;  // t_recv < t_send (broken sample)
};

struct OffsetOptions {
  /// Samples with RTT <= rtt_min * (1 + tolerance) are averaged (their midpoint offsets): with 0, only the minimum.
  /// The reported uncertainty stays the hard bound of the best sample, widened by the spread of those used.
  double rtt_tolerance = 0.0;
};

/// FAILED_PRECONDITION when no usable sample (empty, or every sample has t_recv < t_send).
absl::StatusOr<OffsetEstimate> EstimateOffset(std::span<const ClockSample> samples, OffsetOptions options = {});

/// Offset as a linear function of local time, from a start- and an end-of-run estimate.
class ClockModel {
 public:
  /// Constant offset (one estimate, no drift information).
  explicit ClockModel(const OffsetEstimate& only);
  /// INVALID_ARGUMENT if the two estimates refer to the same local time (drift undefined).
  static absl::StatusOr<ClockModel> FromStartEnd(const OffsetEstimate& start, const OffsetEstimate& end);

  /// remote - local at local time `local_ns`.
  double OffsetAt(double local_ns) const { return offset0_ + drift_ * (local_ns - t0_); }
  /// Uncertainty at `local_ns`: linear between the two estimates' uncertainties, the larger one outside.
  double UncertaintyAt(double local_ns) const;
  /// Drift in parts per million (remote runs faster than local when > 0).
  double drift_ppm() const { return drift_ * 1e6; }
  /// Converts a remote timestamp to the local clock (rounded to the nearest ns; 0 stays 0 = "not recorded").
  uint64_t ToLocal(uint64_t remote_ns) const;

 private:
  ClockModel() = default;
  double t0_ = 0, t1_ = 0;
  double offset0_ = 0;
  double drift_ = 0;  // d(offset)/d(local time)
  double u0_ = 0, u1_ = 0;
};

/// Causality refines a node's mapping onto the reference clock. A message the node sent at s (its stamp, already
/// mapped to the reference clock) and the reference received at r cannot arrive before it left: r >= s + c, where c
/// is the correction to add to the node's mapped stamps; a message the reference sent at s and the node received at
/// r (mapped) gives s <= r + c. Every traced interrupt adds such pairs, so they bound c from the data themselves
/// (the adjustment distributed tracers make for spans that "start before their parent").
///
/// Fit() picks the correction closest to 0 inside those bounds, but never beyond the node's offset uncertainty: the
/// probes proved the true offset lies within it, so a larger violation is not a clock error and stays visible
/// (HopBreakdown counts it as a clock anomaly).
struct CausalFit {
  double correction_ns = 0;  // add to the node's mapped stamps
  double lower_ns = 0, upper_ns = 0;  // the causal interval for the correction (±infinity when unconstrained)
  bool consistent = true;             // lower <= upper (false: the stamps contradict each other; no correction)
  bool within_uncertainty = true;     // the causal interval reaches into [-uncertainty, +uncertainty]
  size_t constraints = 0;
};

class CausalBounds {
 public:
  /// The node sent at `node_send` (mapped), the reference received at `reference_recv`. Zero stamps are ignored.
  void SentToReference(uint64_t node_send, uint64_t reference_recv);
  /// The reference sent at `reference_send`, the node received at `node_recv` (mapped). Zero stamps are ignored.
  void ReceivedFromReference(uint64_t reference_send, uint64_t node_recv);
  /// `uncertainty_ns` < 0 is treated as 0.
  CausalFit Fit(double uncertainty_ns) const;

 private:
  double lower_ = -std::numeric_limits<double>::infinity();
  double upper_ = std::numeric_limits<double>::infinity();
  size_t constraints_ = 0;
};

/// Adds `correction_ns` to a mapped stamp (0 stays 0 = "not recorded"; never wraps below 1).
uint64_t ApplyCorrection(uint64_t mapped_ns, double correction_ns);

}  // namespace aggvm::lab
