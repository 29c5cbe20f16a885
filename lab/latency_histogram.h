// LatencyHistogram: a log-linear (HDR-style) histogram of non-negative integer values, in practice nanoseconds.
//
// Layout. With b = sub_bucket_bits, values below 2^b each have their own bucket (exact). Above, every power-of-two
// range [2^k, 2^(k+1)) is split into 2^(b) equal linear sub-buckets of width 2^(k-b). The bucket of v is
//     shift = max(0, bitwidth(v) - 1 - b);   index = (shift << b) + (v >> shift)
// so Record is a count-leading-zeros, a shift and an add: O(1), no allocation, no branch on the data beyond the
// range checks.
//
// Error bound. A bucket's width is at most 2^-b times its lower bound, and queries report the bucket's midpoint, so
// any reported value (percentile, min/max excepted: those are exact) is within relative_error() = 2^-(b+1) of the
// exact value it stands for. `significant_digits` d picks b = ceil(log2(10^d)), hence relative_error() <= 0.5*10^-d
// (d = 2: 0.39 %, d = 3: 0.049 %).
//
// Range. Values in [lowest, highest] are recorded (defaults: 1 ns .. 1 hour). Values below `lowest` are counted in
// underflow_count(), above `highest` in overflow_count(); neither enters count(), min/max/mean or percentiles.
// Memory (one vector of uint64 counters) is allocated once in Create: ~36 KiB for d = 2 and 1 hour.
//
// Threads: not thread-safe. Record from one thread per histogram (e.g. one per node or per poller) and Merge.
#pragma once

#include <bit>
#include <cstdint>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace aggvm::lab {

struct HistogramOptions {
  int significant_digits = 2;            // 1..4
  uint64_t lowest = 1;                   // smallest recorded value (>= 0); smaller ones are underflow
  uint64_t highest = 3'600'000'000'000;  // largest recorded value (1 hour in ns); larger ones are overflow

  bool operator==(const HistogramOptions&) const = default;
};

class LatencyHistogram {
 public:
  /// Default: significant_digits 2, 1 ns .. 1 hour. Allocates its buckets.
  LatencyHistogram();
  /// INVALID_ARGUMENT if digits are outside 1..4, lowest > highest, or highest >= 2^62.
  static absl::StatusOr<LatencyHistogram> Create(const HistogramOptions& options);

  /// O(1), no allocation.
  void Record(uint64_t value) {
    if (value < options_.lowest) {
      ++underflow_;
      return;
    }
    if (value > options_.highest) {
      ++overflow_;
      return;
    }
    ++counts_[IndexOf(value)];
    ++count_;
    sum_ += static_cast<double>(value);
    if (value < min_) min_ = value;
    if (value > max_) max_ = value;
  }
  /// Records `value` `n` times.
  void RecordN(uint64_t value, uint64_t n);

  /// Adds `other` into this. INVALID_ARGUMENT (and no change) if the options differ.
  absl::Status Merge(const LatencyHistogram& other);
  void Reset();

  uint64_t count() const { return count_; }
  uint64_t underflow_count() const { return underflow_; }
  uint64_t overflow_count() const { return overflow_; }
  /// Exact; 0 when empty.
  uint64_t min() const { return count_ == 0 ? 0 : min_; }
  uint64_t max() const { return max_; }
  double mean() const { return count_ == 0 ? 0.0 : sum_ / static_cast<double>(count_); }
  /// Nearest-rank percentile, p in [0, 100] (clamped): the value whose rank is ceil(p/100 * count), within
  /// relative_error(); p = 0 gives min(), p = 100 gives max(). 0 when empty.
  uint64_t Percentile(double p) const;
  /// The nearest rank ceil(p/100 * count) in [1, count] (0 when count is 0), tolerant of the rounding of p/100.
  static uint64_t NearestRank(double p, uint64_t count);
  /// Fraction of recorded values <= value (by bucket: within relative_error() of value). 0 when empty.
  double CumulativeFraction(uint64_t value) const;

  const HistogramOptions& options() const { return options_; }
  double relative_error() const { return 1.0 / static_cast<double>(uint64_t{2} << sub_bucket_bits_); }
  int sub_bucket_bits() const { return sub_bucket_bits_; }
  size_t bucket_count() const { return counts_.size(); }

  /// Non-empty buckets in increasing order, for plots and serialisation: [lower, upper] inclusive and the count.
  struct Bucket {
    uint64_t lower = 0;
    uint64_t upper = 0;
    uint64_t count = 0;
  };
  std::vector<Bucket> NonEmptyBuckets() const;

  /// Sparse JSON: {"significant_digits","lowest","highest","count","min","max","sum","underflow","overflow",
  /// "buckets":[[lower,count],...]}. Round-trips exactly.
  nlohmann::json ToJson() const;
  /// Validates everything (options, bucket lower bounds, order, counts add up, min/max inside their buckets);
  /// INVALID_ARGUMENT naming the bad field otherwise. Safe on any input.
  static absl::StatusOr<LatencyHistogram> FromJson(const nlohmann::json& j);

  bool operator==(const LatencyHistogram& other) const;

 private:
  LatencyHistogram(const HistogramOptions& options, int sub_bucket_bits);

  size_t IndexOf(uint64_t v) const {
    const int width = std::bit_width(v);  // 0 for v == 0
    const int shift = width - 1 - sub_bucket_bits_ > 0 ? width - 1 - sub_bucket_bits_ : 0;
    return (static_cast<size_t>(shift) << sub_bucket_bits_) + static_cast<size_t>(v >> shift);
  }
  uint64_t LowerOf(size_t index) const;
  uint64_t WidthOf(size_t index) const;
  uint64_t Representative(size_t index) const;

  HistogramOptions options_;
  int sub_bucket_bits_ = 0;
  size_t first_index_ = 0;  // IndexOf(lowest): buckets below it are never used
  std::vector<uint64_t> counts_;
  uint64_t count_ = 0;
  uint64_t underflow_ = 0;
  uint64_t overflow_ = 0;
  uint64_t min_ = UINT64_MAX;
  uint64_t max_ = 0;
  double sum_ = 0;
};

}  // namespace aggvm::lab
