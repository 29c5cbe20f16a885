// HopBreakdown: per-hop latency histograms built from the frames' trace blocks (transport/frame.h TraceBlock).
//
// The path of a traced interrupt has seven stamps, all CLOCK_MONOTONIC ns (remote nodes' stamps already converted
// to the local clock, see lab/clock_offset.h), 0 meaning "not reached / not recorded":
//   raised -> local_controller -> master_received -> master_decided -> target_received -> injected -> guest_handler
// Each adjacent pair is one hop; "end_to_end" runs from raised to guest_handler when the sample has one, else to
// injected. Per hop:
//  - both stamps non-zero and later >= earlier: the difference is recorded in that hop's histogram;
//  - either stamp 0: counted in `missing` (e.g. route mode "direct" has no master stamps);
//  - later < earlier: counted in `clock_anomalies` and NOT recorded (never a negative or wrapped latency).
// A sample whose non-zero stamps are not non-decreasing along the path is also counted once in
// `anomalous_samples`.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

#include <nlohmann/json_fwd.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "lab/latency_histogram.h"
#include "transport/frame.h"

namespace aggvm::lab {

enum class Hop : uint8_t {
  kRaisedToLocalController = 0,
  kLocalControllerToMasterReceived,
  kMasterReceivedToDecided,
  kDecidedToTargetReceived,
  kTargetReceivedToInjected,
  kInjectedToGuestHandler,
  kEndToEnd,
};
inline constexpr size_t kHopCount = 7;
inline constexpr size_t kPathHopCount = 6;  // the hops without end-to-end
/// Stable names used in JSON, CSV and plots: "raised->local_controller", ..., "end_to_end".
std::string_view HopName(Hop h);
std::optional<Hop> HopFromName(std::string_view name);

struct HopStats {
  LatencyHistogram histogram;
  uint64_t missing = 0;
  uint64_t clock_anomalies = 0;

  bool operator==(const HopStats&) const = default;
};

class HopBreakdown {
 public:
  /// Default histogram options (2 significant digits, 1 ns .. 1 hour).
  HopBreakdown();
  /// INVALID_ARGUMENT for bad histogram options.
  static absl::StatusOr<HopBreakdown> Create(const HistogramOptions& options);

  /// Adds one sample. `guest_handler_ns` 0 = none. O(1), no allocation.
  void Add(const transport::TraceBlock& trace, uint64_t guest_handler_ns = 0);
  /// Adds `other` into this (e.g. the breakdowns of several nodes). INVALID_ARGUMENT if the options differ.
  absl::Status Merge(const HopBreakdown& other);

  const HopStats& hop(Hop h) const { return hops_[static_cast<size_t>(h)]; }
  uint64_t samples() const { return samples_; }
  uint64_t anomalous_samples() const { return anomalous_samples_; }
  const HistogramOptions& options() const { return hops_[0].histogram.options(); }

  /// {"samples","anomalous_samples","hops":[{"hop":name,"missing","clock_anomalies","histogram":{...}}, ...]}
  nlohmann::json ToJson() const;
  /// Every hop must be present exactly once with the same histogram options; INVALID_ARGUMENT otherwise.
  static absl::StatusOr<HopBreakdown> FromJson(const nlohmann::json& j);

  bool operator==(const HopBreakdown&) const = default;

 private:
  explicit HopBreakdown(const LatencyHistogram& prototype);
  void AddHop(Hop h, uint64_t from, uint64_t to);

  std::array<HopStats, kHopCount> hops_;
  uint64_t samples_ = 0;
  uint64_t anomalous_samples_ = 0;
};

}  // namespace aggvm::lab
