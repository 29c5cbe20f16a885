#include "lab/clock_offset.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <fmt/format.h>

namespace aggvm::lab {
namespace {

// Midpoint offset of one probe, computed without overflowing or losing the ns on 64-bit timestamps.
double MidOffset(const ClockSample& s) {
  const double mid = static_cast<double>(s.t_send_local) + static_cast<double>(s.t_recv_local - s.t_send_local) / 2;
  return static_cast<double>(s.t_remote) - mid;
}

}  // namespace

absl::StatusOr<OffsetEstimate> EstimateOffset(std::span<const ClockSample> samples, OffsetOptions options) {
  OffsetEstimate e;
  uint64_t rtt_min = std::numeric_limits<uint64_t>::max();
  for (const auto& s : samples) {
    if (s.t_recv_local < s.t_send_local) {
      ++e.samples_rejected;
      continue;
    }
    rtt_min = std::min(rtt_min, s.t_recv_local - s.t_send_local);
  }
  if (e.samples_rejected == samples.size()) {
    return absl::FailedPreconditionError(fmt::format(
        "clock offset: no usable probe among {} samples (each needs t_recv_local >= t_send_local); send more probes",
        samples.size()));
  }
  const double tolerance = std::max(0.0, options.rtt_tolerance);
  const double limit = static_cast<double>(rtt_min) * (1.0 + tolerance);
  double sum_offset = 0, sum_mid = 0;
  for (const auto& s : samples) {
    if (s.t_recv_local < s.t_send_local) continue;
    if (static_cast<double>(s.t_recv_local - s.t_send_local) > limit) continue;
    sum_offset += MidOffset(s);
    sum_mid += static_cast<double>(s.t_send_local) + static_cast<double>(s.t_recv_local - s.t_send_local) / 2;
    ++e.samples_used;
  }
  e.offset_ns = sum_offset / static_cast<double>(e.samples_used);
  e.at_local_ns = sum_mid / static_cast<double>(e.samples_used);
  e.rtt_min_ns = rtt_min;
  // Each used probe bounds the true offset to its midpoint offset ± rtt/2; the average is therefore within
  // |average - o_i| + rtt_i/2 of it for every i: keep the tightest. With one probe this is rtt_min/2.
  e.uncertainty_ns = std::numeric_limits<double>::infinity();
  for (const auto& s : samples) {
    if (s.t_recv_local < s.t_send_local) continue;
    const double rtt = static_cast<double>(s.t_recv_local - s.t_send_local);
    if (rtt > limit) continue;
    e.uncertainty_ns = std::min(e.uncertainty_ns, std::abs(e.offset_ns - MidOffset(s)) + rtt / 2);
  }
  return e;
}

ClockModel::ClockModel(const OffsetEstimate& only)
    : t0_(only.at_local_ns), t1_(only.at_local_ns), offset0_(only.offset_ns), u0_(only.uncertainty_ns),
      u1_(only.uncertainty_ns) {}

absl::StatusOr<ClockModel> ClockModel::FromStartEnd(const OffsetEstimate& start, const OffsetEstimate& end) {
  if (!(end.at_local_ns != start.at_local_ns)) {
    return absl::InvalidArgumentError(fmt::format(
        "clock model: start and end estimates both refer to local time {} ns; take the end estimate later",
        start.at_local_ns));
  }
  ClockModel m;
  m.t0_ = start.at_local_ns;
  m.t1_ = end.at_local_ns;
  m.offset0_ = start.offset_ns;
  m.drift_ = (end.offset_ns - start.offset_ns) / (end.at_local_ns - start.at_local_ns);
  m.u0_ = start.uncertainty_ns;
  m.u1_ = end.uncertainty_ns;
  return m;
}

double ClockModel::UncertaintyAt(double local_ns) const {
  const double lo = std::min(t0_, t1_), hi = std::max(t0_, t1_);
  if (hi == lo || local_ns <= lo || local_ns >= hi) {
    // Outside the measured interval the drift extrapolation adds error too: keep the larger bound (documented).
    return std::max(u0_, u1_);
  }
  const double f = (local_ns - t0_) / (t1_ - t0_);
  return u0_ + f * (u1_ - u0_);
}

uint64_t ClockModel::ToLocal(uint64_t remote_ns) const {
  if (remote_ns == 0) return 0;
  // remote = local + offset0 + drift * (local - t0)  =>  local = (remote - offset0 + drift * t0) / (1 + drift)
  const double local = (static_cast<double>(remote_ns) - offset0_ + drift_ * t0_) / (1.0 + drift_);
  if (!(local > 0)) return 0;
  return static_cast<uint64_t>(std::llround(local));
}

void CausalBounds::SentToReference(uint64_t node_send, uint64_t reference_recv) {
  if (node_send == 0 || reference_recv == 0) return;
  upper_ = std::min(upper_, static_cast<double>(reference_recv) - static_cast<double>(node_send));
  ++constraints_;
}

void CausalBounds::ReceivedFromReference(uint64_t reference_send, uint64_t node_recv) {
  if (reference_send == 0 || node_recv == 0) return;
  lower_ = std::max(lower_, static_cast<double>(reference_send) - static_cast<double>(node_recv));
  ++constraints_;
}

CausalFit CausalBounds::Fit(double uncertainty_ns) const {
  CausalFit f;
  f.lower_ns = lower_;
  f.upper_ns = upper_;
  f.constraints = constraints_;
  if (lower_ > upper_) {
    f.consistent = false;
    f.within_uncertainty = false;
    return f;
  }
  const double u = std::max(0.0, uncertainty_ns);
  const double wanted = std::clamp(0.0, lower_, upper_);  // the smallest move that satisfies every constraint
  f.within_uncertainty = std::abs(wanted) <= u;
  f.correction_ns = std::clamp(wanted, -u, u);
  return f;
}

uint64_t ApplyCorrection(uint64_t mapped_ns, double correction_ns) {
  if (mapped_ns == 0) return 0;
  const double v = static_cast<double>(mapped_ns) + correction_ns;
  if (!(v >= 1)) return 1;
  return static_cast<uint64_t>(std::llround(v));
}

}  // namespace aggvm::lab
