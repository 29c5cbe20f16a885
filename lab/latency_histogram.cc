#include "lab/latency_histogram.h"

#include <algorithm>
#include <cmath>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace aggvm::lab {
namespace {

int SubBucketBitsFor(int digits) {
  // b = ceil(log2(10^d)): the smallest b with 2^b >= 10^d.
  uint64_t target = 1;
  for (int i = 0; i < digits; ++i) target *= 10;
  int b = 0;
  while ((uint64_t{1} << b) < target) ++b;
  return b;
}

absl::Status Invalid(std::string_view field, const std::string& why) {
  return absl::InvalidArgumentError(fmt::format("latency histogram: field '{}' {}", field, why));
}

}  // namespace

LatencyHistogram::LatencyHistogram() : LatencyHistogram(HistogramOptions{}, SubBucketBitsFor(2)) {}

LatencyHistogram::LatencyHistogram(const HistogramOptions& options, int sub_bucket_bits)
    : options_(options), sub_bucket_bits_(sub_bucket_bits) {
  first_index_ = IndexOf(options_.lowest);
  counts_.assign(IndexOf(options_.highest) + 1, 0);
}

absl::StatusOr<LatencyHistogram> LatencyHistogram::Create(const HistogramOptions& options) {
  if (options.significant_digits < 1 || options.significant_digits > 4) {
    return Invalid("significant_digits",
                   fmt::format("is {}; use 1..4 (relative error 5 % .. 0.005 %)", options.significant_digits));
  }
  if (options.highest >= (uint64_t{1} << 62)) {
    return Invalid("highest", fmt::format("is {}; must be below 2^62", options.highest));
  }
  if (options.lowest > options.highest) {
    return Invalid("lowest", fmt::format("is {} > highest {}", options.lowest, options.highest));
  }
  return LatencyHistogram(options, SubBucketBitsFor(options.significant_digits));
}

void LatencyHistogram::RecordN(uint64_t value, uint64_t n) {
  if (n == 0) return;
  if (value < options_.lowest) {
    underflow_ += n;
    return;
  }
  if (value > options_.highest) {
    overflow_ += n;
    return;
  }
  counts_[IndexOf(value)] += n;
  count_ += n;
  sum_ += static_cast<double>(value) * static_cast<double>(n);
  min_ = std::min(min_, value);
  max_ = std::max(max_, value);
}

absl::Status LatencyHistogram::Merge(const LatencyHistogram& other) {
  if (!(options_ == other.options_)) {
    return absl::InvalidArgumentError(fmt::format(
        "cannot merge latency histograms with different options (digits {} vs {}, range [{}, {}] vs [{}, {}]); "
        "record every node with the same HistogramOptions",
        options_.significant_digits, other.options_.significant_digits, options_.lowest, options_.highest,
        other.options_.lowest, other.options_.highest));
  }
  for (size_t i = 0; i < counts_.size(); ++i) counts_[i] += other.counts_[i];
  count_ += other.count_;
  underflow_ += other.underflow_;
  overflow_ += other.overflow_;
  sum_ += other.sum_;
  min_ = std::min(min_, other.min_);
  max_ = std::max(max_, other.max_);
  return absl::OkStatus();
}

void LatencyHistogram::Reset() {
  std::fill(counts_.begin(), counts_.end(), 0);
  count_ = underflow_ = overflow_ = 0;
  min_ = UINT64_MAX;
  max_ = 0;
  sum_ = 0;
}

uint64_t LatencyHistogram::LowerOf(size_t index) const {
  const size_t q = index >> sub_bucket_bits_;
  if (q == 0) return index;
  const size_t shift = q - 1;
  const uint64_t m = index - (shift << sub_bucket_bits_);
  return m << shift;
}

uint64_t LatencyHistogram::WidthOf(size_t index) const {
  const size_t q = index >> sub_bucket_bits_;
  return q == 0 ? 1 : uint64_t{1} << (q - 1);
}

uint64_t LatencyHistogram::Representative(size_t index) const {
  return LowerOf(index) + (WidthOf(index) - 1) / 2;
}

uint64_t LatencyHistogram::NearestRank(double p, uint64_t count) {
  if (count == 0) return 0;
  if (!(p > 0)) return 1;  // also NaN
  if (p >= 100) return count;
  const double r = p / 100.0 * static_cast<double>(count);
  // Tolerate the rounding of p/100 (99.9/100*1000 is 999.0000000000001): ranks are integers.
  auto rank = static_cast<uint64_t>(std::ceil(r - r * 1e-12));
  return std::clamp<uint64_t>(rank, 1, count);
}

uint64_t LatencyHistogram::Percentile(double p) const {
  if (count_ == 0) return 0;
  if (!(p > 0)) return min_;
  if (p >= 100) return max_;
  const uint64_t rank = NearestRank(p, count_);
  uint64_t cumulative = 0;
  for (size_t i = first_index_; i < counts_.size(); ++i) {
    cumulative += counts_[i];
    if (cumulative >= rank) return std::clamp(Representative(i), min_, max_);
  }
  return max_;  // unreachable: the counts add up to count_
}

double LatencyHistogram::CumulativeFraction(uint64_t value) const {
  if (count_ == 0 || value < options_.lowest) return 0.0;
  if (value >= max_) return 1.0;
  const size_t last = IndexOf(value);
  uint64_t cumulative = 0;
  for (size_t i = first_index_; i <= last; ++i) cumulative += counts_[i];
  return static_cast<double>(cumulative) / static_cast<double>(count_);
}

std::vector<LatencyHistogram::Bucket> LatencyHistogram::NonEmptyBuckets() const {
  std::vector<Bucket> out;
  for (size_t i = first_index_; i < counts_.size(); ++i) {
    if (counts_[i] != 0) out.push_back({LowerOf(i), LowerOf(i) + WidthOf(i) - 1, counts_[i]});
  }
  return out;
}

bool LatencyHistogram::operator==(const LatencyHistogram& o) const {
  return options_ == o.options_ && count_ == o.count_ && underflow_ == o.underflow_ && overflow_ == o.overflow_ &&
         min() == o.min() && max_ == o.max_ && sum_ == o.sum_ && counts_ == o.counts_;
}

nlohmann::json LatencyHistogram::ToJson() const {
  nlohmann::json buckets = nlohmann::json::array();
  for (size_t i = first_index_; i < counts_.size(); ++i) {
    if (counts_[i] != 0) buckets.push_back(nlohmann::json::array({LowerOf(i), counts_[i]}));
  }
  return nlohmann::json{{"significant_digits", options_.significant_digits},
                        {"lowest", options_.lowest},
                        {"highest", options_.highest},
                        {"count", count_},
                        {"min", min()},
                        {"max", max_},
                        {"sum", sum_},
                        {"underflow", underflow_},
                        {"overflow", overflow_},
                        {"buckets", std::move(buckets)}};
}

namespace {

bool NonNegative(const nlohmann::json& j) {
  return j.is_number_integer() && (j.is_number_unsigned() || j.get<int64_t>() >= 0);
}

absl::StatusOr<uint64_t> GetUnsigned(const nlohmann::json& j, const char* field) {
  auto it = j.find(field);
  if (it == j.end()) return Invalid(field, "is missing");
  if (!NonNegative(*it)) return Invalid(field, fmt::format("must be a non-negative integer, got {}", it->dump()));
  return it->get<uint64_t>();
}

}  // namespace

absl::StatusOr<LatencyHistogram> LatencyHistogram::FromJson(const nlohmann::json& j) {
  if (!j.is_object()) return Invalid("(top)", "must be an object");
  auto digits = GetUnsigned(j, "significant_digits");
  auto lowest = GetUnsigned(j, "lowest");
  auto highest = GetUnsigned(j, "highest");
  auto count = GetUnsigned(j, "count");
  auto min = GetUnsigned(j, "min");
  auto max = GetUnsigned(j, "max");
  auto underflow = GetUnsigned(j, "underflow");
  auto overflow = GetUnsigned(j, "overflow");
  for (const auto* s : {&digits, &lowest, &highest, &count, &min, &max, &underflow, &overflow}) {
    if (!s->ok()) return s->status();
  }
  if (*digits > 4) return Invalid("significant_digits", fmt::format("is {}; must be 1..4", *digits));
  auto h = Create({static_cast<int>(*digits), *lowest, *highest});
  if (!h.ok()) return h.status();

  auto sum_it = j.find("sum");
  if (sum_it == j.end() || !sum_it->is_number()) return Invalid("sum", "must be a number");
  const double sum = sum_it->get<double>();
  if (!std::isfinite(sum) || sum < 0) return Invalid("sum", fmt::format("must be finite and >= 0, got {}", sum));

  auto b_it = j.find("buckets");
  if (b_it == j.end() || !b_it->is_array()) return Invalid("buckets", "must be an array of [lower, count]");
  uint64_t total = 0;
  size_t previous = 0;
  bool first = true;
  size_t first_used = 0;
  size_t last_used = 0;
  for (size_t k = 0; k < b_it->size(); ++k) {
    const auto& e = (*b_it)[k];
    const std::string where = fmt::format("buckets[{}]", k);
    if (!e.is_array() || e.size() != 2 || !NonNegative(e[0]) || !NonNegative(e[1])) {
      return Invalid(where, "must be [lower, count] with non-negative integers");
    }
    const auto lower = e[0].get<uint64_t>();
    const auto n = e[1].get<uint64_t>();
    if (lower < h->options_.lowest || lower > h->options_.highest) {
      return Invalid(where, fmt::format("lower {} outside [lowest {}, highest {}]", lower, *lowest, *highest));
    }
    const size_t index = h->IndexOf(lower);
    if (h->LowerOf(index) != lower) {
      return Invalid(where, fmt::format("lower {} is not a bucket boundary (nearest below: {})", lower,
                                        h->LowerOf(index)));
    }
    if (!first && index <= previous) return Invalid(where, "buckets must be in strictly increasing order");
    if (n == 0) return Invalid(where, "count must be > 0 (the format is sparse)");
    if (total + n < total) return Invalid(where, "counts overflow");
    total += n;
    h->counts_[index] = n;
    if (first) first_used = index;
    last_used = index;
    previous = index;
    first = false;
  }
  if (total != *count) return Invalid("count", fmt::format("is {} but the buckets add up to {}", *count, total));
  if (total == 0) {
    if (*min != 0 || *max != 0 || sum != 0) return Invalid("min", "min, max and sum must be 0 when count is 0");
  } else {
    if (*min < h->LowerOf(first_used) || *min > h->LowerOf(first_used) + h->WidthOf(first_used) - 1) {
      return Invalid("min", fmt::format("{} is not inside the first non-empty bucket (lower {})", *min,
                                        h->LowerOf(first_used)));
    }
    if (*max < h->LowerOf(last_used) || *max > h->LowerOf(last_used) + h->WidthOf(last_used) - 1) {
      return Invalid("max", fmt::format("{} is not inside the last non-empty bucket (lower {})", *max,
                                        h->LowerOf(last_used)));
    }
    h->min_ = *min;
    h->max_ = *max;
  }
  h->count_ = total;
  h->sum_ = sum;
  h->underflow_ = *underflow;
  h->overflow_ = *overflow;
  return h;
}

}  // namespace aggvm::lab
