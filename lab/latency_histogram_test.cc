#include "lab/latency_histogram.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <nlohmann/json.hpp>

namespace aggvm::lab {
namespace {

constexpr double kPercentiles[] = {0, 0.1, 1, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.99, 100};

// Exact nearest-rank percentile of sorted data (the same rank definition as the histogram's).
uint64_t Exact(const std::vector<uint64_t>& sorted, double p) {
  if (p <= 0) return sorted.front();
  return sorted[LatencyHistogram::NearestRank(p, sorted.size()) - 1];
}

LatencyHistogram Make(int digits) {
  auto h = LatencyHistogram::Create({digits, 1, 3'600'000'000'000});
  EXPECT_TRUE(h.ok()) << h.status();
  return *h;
}

// Every percentile of `h` is within the stated relative error of the exact percentile of `data`.
void ExpectWithinBound(const LatencyHistogram& h, std::vector<uint64_t> data, const char* what) {
  std::sort(data.begin(), data.end());
  ASSERT_EQ(h.count(), data.size()) << what;
  EXPECT_EQ(h.min(), data.front()) << what;
  EXPECT_EQ(h.max(), data.back()) << what;
  for (double p : kPercentiles) {
    const auto exact = static_cast<double>(Exact(data, p));
    const auto got = static_cast<double>(h.Percentile(p));
    EXPECT_LE(std::abs(got - exact), exact * h.relative_error())
        << what << ": p" << p << " exact " << exact << " histogram " << got << " bound " << h.relative_error();
  }
  double sum = 0;
  for (auto v : data) sum += static_cast<double>(v);
  EXPECT_NEAR(h.mean(), sum / static_cast<double>(data.size()), 1e-9 * sum) << what;
}

std::vector<uint64_t> Uniform(size_t n, uint64_t lo, uint64_t hi, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<uint64_t> d(lo, hi);
  std::vector<uint64_t> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<uint64_t> LogNormal(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::lognormal_distribution<double> d(std::log(20'000.0), 1.0);  // median 20 µs, long tail
  std::vector<uint64_t> v(n);
  for (auto& x : v) x = static_cast<uint64_t>(std::max(1.0, d(rng)));
  return v;
}

std::vector<uint64_t> Bimodal(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> fast(5'000, 300), slow(200'000, 20'000);
  std::bernoulli_distribution pick_slow(0.1);
  std::vector<uint64_t> v(n);
  for (auto& x : v) x = static_cast<uint64_t>(std::max(1.0, pick_slow(rng) ? slow(rng) : fast(rng)));
  return v;
}

TEST(LatencyHistogram, StatedErrorBoundFollowsDigits) {
  EXPECT_LE(Make(1).relative_error(), 0.05);
  EXPECT_LE(Make(2).relative_error(), 0.005);
  EXPECT_LE(Make(3).relative_error(), 0.0005);
  EXPECT_LE(Make(4).relative_error(), 0.00005);
  // The default is 2 digits over 1 ns .. 1 hour in a few tens of KiB.
  LatencyHistogram d;
  EXPECT_EQ(d.options(), (HistogramOptions{2, 1, 3'600'000'000'000}));
  EXPECT_LT(d.bucket_count() * sizeof(uint64_t), 64u * 1024);
}

TEST(LatencyHistogram, PercentilesWithinBoundOnKnownDistributions) {
  for (int digits : {1, 2, 3}) {
    SCOPED_TRACE(digits);
    struct Case {
      const char* name;
      std::vector<uint64_t> data;
    };
    const Case cases[] = {
        {"uniform small", Uniform(20'000, 1, 1'000, 1)},
        {"uniform wide", Uniform(20'000, 1, 10'000'000'000, 2)},
        {"log-normal", LogNormal(50'000, 3)},
        {"bimodal", Bimodal(50'000, 4)},
        {"constant", std::vector<uint64_t>(1000, 123'456'789)},
        {"constant small", std::vector<uint64_t>(7, 3)},
        {"one value", {987'654}},
        {"two values", {10, 1'000'000}},
        {"three values", {5'000, 5'001, 3'000'000'000'000}},
        {"range ends", {1, 3'600'000'000'000}},
    };
    for (const auto& c : cases) {
      LatencyHistogram h = Make(digits);
      for (auto v : c.data) h.Record(v);
      ExpectWithinBound(h, c.data, c.name);
    }
  }
}

TEST(LatencyHistogram, SmallValuesAreExact) {
  LatencyHistogram h = Make(2);
  std::vector<uint64_t> data;
  for (uint64_t v = 1; v <= 127; ++v) data.push_back(v);
  for (auto v : data) h.Record(v);
  for (double p : kPercentiles) EXPECT_EQ(h.Percentile(p), Exact(data, p)) << p;
}

TEST(LatencyHistogram, MergeEqualsRecordingEverythingInOne) {
  const auto data = LogNormal(30'000, 11);
  LatencyHistogram all = Make(2), a = Make(2), b = Make(2), c = Make(2);
  for (size_t i = 0; i < data.size(); ++i) {
    all.Record(data[i]);
    (i % 3 == 0 ? a : i % 3 == 1 ? b : c).Record(data[i]);
  }
  ASSERT_TRUE(a.Merge(b).ok());
  ASSERT_TRUE(a.Merge(c).ok());
  EXPECT_EQ(a.count(), all.count());
  for (double p : kPercentiles) EXPECT_EQ(a.Percentile(p), all.Percentile(p)) << p;
  ExpectWithinBound(a, data, "merged");
  // Merging an empty histogram changes nothing; merging into an empty one copies.
  LatencyHistogram empty = Make(2);
  const LatencyHistogram before = a;
  ASSERT_TRUE(a.Merge(empty).ok());
  EXPECT_EQ(a, before);
  ASSERT_TRUE(empty.Merge(a).ok());
  EXPECT_EQ(empty.Percentile(99), a.Percentile(99));
  EXPECT_EQ(empty.min(), a.min());
}

TEST(LatencyHistogram, MergeOfDifferentOptionsIsAnErrorAndChangesNothing) {
  LatencyHistogram a = Make(2), b = Make(3);
  a.Record(100);
  b.Record(200);
  const LatencyHistogram before = a;
  auto s = a.Merge(b);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(a, before);
  auto c = LatencyHistogram::Create({2, 1, 1'000'000});
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(a.Merge(*c).code(), absl::StatusCode::kInvalidArgument);
}

TEST(LatencyHistogram, OutOfRangeValuesAreCountedNotRecorded) {
  auto h = LatencyHistogram::Create({2, 10, 1'000});
  ASSERT_TRUE(h.ok());
  h->Record(0);
  h->Record(9);
  h->Record(1'001);
  h->Record(UINT64_MAX);
  h->RecordN(5'000, 3);
  h->Record(500);
  EXPECT_EQ(h->underflow_count(), 2u);
  EXPECT_EQ(h->overflow_count(), 5u);
  EXPECT_EQ(h->count(), 1u);
  EXPECT_EQ(h->min(), 500u);
  EXPECT_EQ(h->max(), 500u);
  EXPECT_EQ(h->Percentile(99.9), 500u);
  LatencyHistogram d;  // default range: 0 is below 1 ns, UINT64_MAX above an hour
  d.Record(0);
  d.Record(UINT64_MAX);
  EXPECT_EQ(d.count(), 0u);
  EXPECT_EQ(d.underflow_count(), 1u);
  EXPECT_EQ(d.overflow_count(), 1u);
  EXPECT_EQ(d.Percentile(50), 0u);
}

TEST(LatencyHistogram, BadOptionsAreRefused) {
  EXPECT_FALSE(LatencyHistogram::Create({0, 1, 100}).ok());
  EXPECT_FALSE(LatencyHistogram::Create({5, 1, 100}).ok());
  EXPECT_FALSE(LatencyHistogram::Create({2, 100, 1}).ok());
  EXPECT_FALSE(LatencyHistogram::Create({2, 1, uint64_t{1} << 62}).ok());
  EXPECT_TRUE(LatencyHistogram::Create({2, 0, 100}).ok());
}

TEST(LatencyHistogram, EmptyHistogramAnswersZero) {
  LatencyHistogram h;
  EXPECT_EQ(h.count(), 0u);
  EXPECT_EQ(h.min(), 0u);
  EXPECT_EQ(h.max(), 0u);
  EXPECT_EQ(h.mean(), 0.0);
  EXPECT_EQ(h.Percentile(50), 0u);
  EXPECT_EQ(h.CumulativeFraction(1000), 0.0);
}

TEST(LatencyHistogram, CumulativeFraction) {
  LatencyHistogram h = Make(2);
  for (uint64_t v = 1; v <= 100; ++v) h.Record(v * 1000);
  EXPECT_NEAR(h.CumulativeFraction(50'000), 0.5, 0.011);
  EXPECT_EQ(h.CumulativeFraction(100'000), 1.0);
  EXPECT_EQ(h.CumulativeFraction(0), 0.0);
}

TEST(LatencyHistogram, JsonRoundTripIsExactAndKeepsPercentiles) {
  for (int digits : {1, 2, 4}) {
    const auto data = Bimodal(20'000, 100 + static_cast<uint64_t>(digits));
    LatencyHistogram h = Make(digits);
    for (auto v : data) h.Record(v);
    h.Record(0);            // underflow
    h.Record(UINT64_MAX);   // overflow
    const std::string text = h.ToJson().dump();
    auto back = LatencyHistogram::FromJson(nlohmann::json::parse(text));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, h);
    EXPECT_EQ(back->ToJson().dump(), text);
    ExpectWithinBound(*back, data, "after json");
    // Ship two halves as JSON and merge them on the receiving side.
    LatencyHistogram x = Make(digits), y = Make(digits);
    for (size_t i = 0; i < data.size(); ++i) (i < data.size() / 2 ? x : y).Record(data[i]);
    auto rx = LatencyHistogram::FromJson(x.ToJson());
    auto ry = LatencyHistogram::FromJson(nlohmann::json::parse(y.ToJson().dump()));
    ASSERT_TRUE(rx.ok() && ry.ok());
    ASSERT_TRUE(rx->Merge(*ry).ok());
    ExpectWithinBound(*rx, data, "json + merge");
  }
  LatencyHistogram empty;
  auto e = LatencyHistogram::FromJson(empty.ToJson());
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(*e, empty);
}

TEST(LatencyHistogram, JsonIsSparse) {
  LatencyHistogram h;
  h.RecordN(1'000, 10);
  h.Record(2'000'000);
  const auto j = h.ToJson();
  ASSERT_EQ(j["buckets"].size(), 2u);
  EXPECT_EQ(j["buckets"][0][1], 10);
}

TEST(LatencyHistogram, MalformedJsonIsRefusedWithTheField) {
  LatencyHistogram h;
  h.Record(1'000);
  h.Record(5'000);
  const nlohmann::json good = h.ToJson();
  struct Case {
    const char* field;
    std::function<void(nlohmann::json&)> mutate;
  };
  const Case cases[] = {
      {"count", [](auto& j) { j["count"] = 3; }},
      {"significant_digits", [](auto& j) { j["significant_digits"] = 9; }},
      {"significant_digits", [](auto& j) { j["significant_digits"] = -1; }},
      {"lowest", [](auto& j) { j.erase("lowest"); }},
      {"sum", [](auto& j) { j["sum"] = "x"; }},
      {"buckets[0]", [](auto& j) { j["buckets"][0][0] = 1'001; }},          // not a bucket boundary
      {"buckets[1]", [](auto& j) { j["buckets"][1][0] = 1'000; }},          // not increasing
      {"buckets[0]", [](auto& j) { j["buckets"][0] = nlohmann::json::array({1'000}); }},
      {"buckets[0]", [](auto& j) { j["buckets"][0][1] = 0; }},
      {"buckets[1]", [](auto& j) { j["buckets"][1][0] = uint64_t{1} << 61; }},  // beyond highest
      {"min", [](auto& j) { j["min"] = 10; }},
      {"max", [](auto& j) { j["max"] = 1; }},
      {"buckets", [](auto& j) { j["buckets"] = 3; }},
  };
  for (const auto& c : cases) {
    nlohmann::json j = good;
    c.mutate(j);
    auto r = LatencyHistogram::FromJson(j);
    ASSERT_FALSE(r.ok()) << c.field << ": " << j.dump();
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(c.field), std::string_view::npos) << r.status();
  }
  EXPECT_FALSE(LatencyHistogram::FromJson(nlohmann::json::array()).ok());
  EXPECT_FALSE(LatencyHistogram::FromJson(nlohmann::json(5)).ok());
}

}  // namespace
}  // namespace aggvm::lab
