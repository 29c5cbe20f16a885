#include "lab/hop_breakdown.h"

#include <gtest/gtest.h>

#include <random>

#include <nlohmann/json.hpp>

namespace aggvm::lab {
namespace {

using transport::TraceBlock;

// A full path starting at `t0` with the given hop durations.
TraceBlock Path(uint64_t t0, const std::array<uint64_t, 5>& d) {
  TraceBlock t;
  t.raised = t0;
  t.local_controller = t.raised + d[0];
  t.master_received = t.local_controller + d[1];
  t.master_decided = t.master_received + d[2];
  t.target_received = t.master_decided + d[3];
  t.injected = t.target_received + d[4];
  return t;
}

TEST(HopBreakdown, NamesRoundTrip) {
  for (size_t i = 0; i < kHopCount; ++i) {
    const auto h = static_cast<Hop>(i);
    EXPECT_EQ(HopFromName(HopName(h)), h);
  }
  EXPECT_EQ(HopFromName("nope"), std::nullopt);
}

TEST(HopBreakdown, RecordsEachHopAndEndToEnd) {
  HopBreakdown b;
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<uint64_t> d(100, 50'000);
  std::array<std::vector<uint64_t>, kHopCount> expected;
  for (int i = 0; i < 5'000; ++i) {
    const std::array<uint64_t, 5> hops = {d(rng), d(rng), d(rng), d(rng), d(rng)};
    const uint64_t handler_delay = d(rng);
    const TraceBlock t = Path(1'000'000'000 + static_cast<uint64_t>(i) * 1'000'000, hops);
    b.Add(t, t.injected + handler_delay);
    for (size_t h = 0; h < 5; ++h) expected[h].push_back(hops[h]);
    expected[5].push_back(handler_delay);
    expected[6].push_back(t.injected + handler_delay - t.raised);
  }
  EXPECT_EQ(b.samples(), 5'000u);
  EXPECT_EQ(b.anomalous_samples(), 0u);
  for (size_t h = 0; h < kHopCount; ++h) {
    const HopStats& s = b.hop(static_cast<Hop>(h));
    auto v = expected[h];
    std::sort(v.begin(), v.end());
    EXPECT_EQ(s.histogram.count(), v.size());
    EXPECT_EQ(s.missing, 0u);
    EXPECT_EQ(s.clock_anomalies, 0u);
    EXPECT_EQ(s.histogram.min(), v.front());
    EXPECT_EQ(s.histogram.max(), v.back());
    for (double p : {50.0, 90.0, 99.0, 99.9}) {
      const double exact = static_cast<double>(v[LatencyHistogram::NearestRank(p, v.size()) - 1]);
      EXPECT_LE(std::abs(static_cast<double>(s.histogram.Percentile(p)) - exact),
                exact * s.histogram.relative_error())
          << HopName(static_cast<Hop>(h)) << " p" << p;
    }
  }
}

TEST(HopBreakdown, MissingHopsAreCountedSeparately) {
  HopBreakdown b;
  // Route mode "direct": no master stamps; no guest handler stamp.
  TraceBlock t = Path(1'000, {10, 20, 30, 40, 50});
  t.master_received = 0;
  t.master_decided = 0;
  b.Add(t);
  EXPECT_EQ(b.hop(Hop::kRaisedToLocalController).histogram.count(), 1u);
  EXPECT_EQ(b.hop(Hop::kLocalControllerToMasterReceived).missing, 1u);
  EXPECT_EQ(b.hop(Hop::kMasterReceivedToDecided).missing, 1u);
  EXPECT_EQ(b.hop(Hop::kDecidedToTargetReceived).missing, 1u);
  EXPECT_EQ(b.hop(Hop::kTargetReceivedToInjected).histogram.count(), 1u);
  EXPECT_EQ(b.hop(Hop::kTargetReceivedToInjected).histogram.max(), 50u);
  EXPECT_EQ(b.hop(Hop::kInjectedToGuestHandler).missing, 1u);
  // Without a guest handler stamp, end to end runs to `injected`.
  EXPECT_EQ(b.hop(Hop::kEndToEnd).histogram.max(), 150u);
  EXPECT_EQ(b.anomalous_samples(), 0u);
  // Never injected, no handler: end to end is missing too.
  TraceBlock lost = Path(5'000, {10, 20, 30, 40, 50});
  lost.target_received = 0;
  lost.injected = 0;
  b.Add(lost);
  EXPECT_EQ(b.hop(Hop::kEndToEnd).missing, 1u);
  EXPECT_EQ(b.hop(Hop::kEndToEnd).histogram.count(), 1u);
}

TEST(HopBreakdown, NonMonotonicStampsAreAnomaliesNotNegativeLatencies) {
  HopBreakdown b;
  TraceBlock t = Path(1'000'000, {100, 200, 300, 400, 500});
  t.master_received = t.local_controller - 50;  // a remote clock behind ours
  b.Add(t, t.injected + 10);
  EXPECT_EQ(b.anomalous_samples(), 1u);
  EXPECT_EQ(b.hop(Hop::kLocalControllerToMasterReceived).clock_anomalies, 1u);
  EXPECT_EQ(b.hop(Hop::kLocalControllerToMasterReceived).histogram.count(), 0u);
  // The next hop (master_received -> decided) is positive and is recorded.
  EXPECT_EQ(b.hop(Hop::kMasterReceivedToDecided).histogram.count(), 1u);
  EXPECT_EQ(b.hop(Hop::kEndToEnd).histogram.count(), 1u);
  // A handler stamp before the injection: an anomaly on that hop and on end to end? No: end to end is still
  // raised -> handler, which is positive.
  TraceBlock u = Path(2'000'000, {100, 200, 300, 400, 500});
  b.Add(u, u.injected - 1);
  EXPECT_EQ(b.hop(Hop::kInjectedToGuestHandler).clock_anomalies, 1u);
  EXPECT_EQ(b.anomalous_samples(), 2u);
  // A handler stamp before raised: end to end is an anomaly.
  b.Add(u, u.raised - 1);
  EXPECT_EQ(b.hop(Hop::kEndToEnd).clock_anomalies, 1u);
  // Across a missing stamp: local_controller > target_received with the master stamps missing.
  TraceBlock v = Path(3'000'000, {1'000, 1, 1, 1, 1});
  v.master_received = v.master_decided = 0;
  v.target_received = v.local_controller - 10;
  b.Add(v);
  EXPECT_EQ(b.anomalous_samples(), 4u);
  for (size_t h = 0; h < kHopCount; ++h) {
    // Nothing recorded is absurdly large (a wrapped negative difference would be ~2^64).
    EXPECT_LT(b.hop(static_cast<Hop>(h)).histogram.max(), 10'000'000u);
    EXPECT_EQ(b.hop(static_cast<Hop>(h)).histogram.overflow_count(), 0u);
  }
}

TEST(HopBreakdown, MergeAndJsonRoundTrip) {
  HopBreakdown a, b, all;
  for (uint64_t i = 1; i <= 1'000; ++i) {
    const TraceBlock t = Path(i * 1'000'000, {i, 2 * i, 3 * i, 4 * i, 5 * i});
    (i % 2 ? a : b).Add(t, i % 3 ? t.injected + 7 * i : 0);
    all.Add(t, i % 3 ? t.injected + 7 * i : 0);
  }
  ASSERT_TRUE(a.Merge(b).ok());
  EXPECT_EQ(a, all);
  const std::string text = a.ToJson().dump();
  auto back = HopBreakdown::FromJson(nlohmann::json::parse(text));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, a);
  EXPECT_EQ(back->ToJson().dump(), text);

  auto other = HopBreakdown::Create({3, 1, 1'000'000});
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(a.Merge(*other).code(), absl::StatusCode::kInvalidArgument);
}

TEST(HopBreakdown, MalformedJsonIsRefused) {
  HopBreakdown a;
  a.Add(Path(1'000, {1, 2, 3, 4, 5}));
  const nlohmann::json good = a.ToJson();
  std::vector<nlohmann::json> bad(6, good);
  bad[0]["hops"].erase(0);
  bad[1]["hops"][1]["hop"] = good["hops"][0]["hop"];  // duplicate
  bad[2]["hops"][2]["hop"] = "warp";
  bad[3]["hops"][3]["histogram"]["count"] = 99;
  bad[4].erase("samples");
  bad[5]["hops"][4]["histogram"] = HopBreakdown::Create({3, 1, 1000})->ToJson()["hops"][4]["histogram"];
  for (const auto& j : bad) {
    auto r = HopBreakdown::FromJson(j);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << j.dump();
  }
}

}  // namespace
}  // namespace aggvm::lab
