#include "lab/clock_offset.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace aggvm::lab {
namespace {

// A simulated remote clock: remote(local) = local + offset + drift * (local - epoch).
struct RemoteClock {
  double offset_ns;
  double drift;  // e.g. 20e-6 = 20 ppm
  double epoch;
  uint64_t At(double local) const { return static_cast<uint64_t>(std::llround(local + offset_ns + drift * (local - epoch))); }
  double OffsetAt(double local) const { return offset_ns + drift * (local - epoch); }
};

// Probes starting at `start`, one every `period`, with one-way delays drawn from `min_delay + exponential(jitter)`,
// independently in each direction (so the delays are asymmetric per probe).
std::vector<ClockSample> Probe(const RemoteClock& remote, double start, double period, int n, double min_delay_out,
                               double min_delay_back, double jitter_ns, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::exponential_distribution<double> extra(1.0 / jitter_ns);
  std::vector<ClockSample> out;
  for (int i = 0; i < n; ++i) {
    const double send = start + period * i;
    const double at_remote = send + min_delay_out + extra(rng);
    const double recv = at_remote + min_delay_back + extra(rng);
    out.push_back({static_cast<uint64_t>(send), remote.At(at_remote), static_cast<uint64_t>(recv)});
  }
  return out;
}

TEST(ClockOffset, SymmetricMinimumDelaysRecoverTheOffset) {
  const RemoteClock remote{-123'456'789.0, 0, 0};
  const auto samples = Probe(remote, 5e12, 100'000, 200, 20'000, 20'000, 30'000, 1);
  auto e = EstimateOffset(samples);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->samples_used, 1u);
  EXPECT_EQ(e->samples_rejected, 0u);
  EXPECT_DOUBLE_EQ(e->uncertainty_ns, static_cast<double>(e->rtt_min_ns) / 2);
  // The truth is inside the reported interval, and with equal minimum delays the estimate is close to it: the
  // only error left is the jitter of the best probe.
  EXPECT_LE(std::abs(e->offset_ns - remote.offset_ns), e->uncertainty_ns);
  EXPECT_LT(std::abs(e->offset_ns - remote.offset_ns), 5'000);
  EXPECT_GE(e->rtt_min_ns, 40'000u);
}

TEST(ClockOffset, AsymmetricDelaysStayWithinTheReportedUncertainty) {
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    const RemoteClock remote{987'654.0 * static_cast<double>(seed), 0, 0};
    // The path out is much slower than the path back: the midpoint estimate is biased, but by at most RTT/2.
    const auto samples = Probe(remote, 1e9, 50'000, 100, 90'000, 5'000, 20'000, seed);
    auto e = EstimateOffset(samples);
    ASSERT_TRUE(e.ok());
    EXPECT_LE(std::abs(e->offset_ns - remote.offset_ns), e->uncertainty_ns + 1) << seed;
    EXPECT_GT(std::abs(e->offset_ns - remote.offset_ns), 30'000) << "the asymmetry must show as bias";
  }
}

TEST(ClockOffset, ToleranceAveragesNearMinimumProbesAndKeepsAHardBound) {
  const RemoteClock remote{42'000.0, 0, 0};
  const auto samples = Probe(remote, 1e9, 10'000, 500, 10'000, 10'000, 2'000, 9);
  auto best = EstimateOffset(samples);
  auto avg = EstimateOffset(samples, {.rtt_tolerance = 0.2});
  ASSERT_TRUE(best.ok() && avg.ok());
  EXPECT_GT(avg->samples_used, 1u);
  EXPECT_EQ(avg->rtt_min_ns, best->rtt_min_ns);
  EXPECT_LE(std::abs(avg->offset_ns - remote.offset_ns), avg->uncertainty_ns);
  EXPECT_GE(avg->uncertainty_ns, static_cast<double>(avg->rtt_min_ns) / 2);
}

TEST(ClockOffset, BrokenSamplesAreRejected) {
  std::vector<ClockSample> s = {{100, 5, 50}, {200, 999, 100}};
  auto e = EstimateOffset(s);
  EXPECT_EQ(e.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(EstimateOffset({}).status().code(), absl::StatusCode::kFailedPrecondition);
  s.push_back({1'000, 1'600, 1'200});  // offset 1600 - 1100 = 500, rtt 200
  e = EstimateOffset(s);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->samples_rejected, 2u);
  EXPECT_DOUBLE_EQ(e->offset_ns, 500);
  EXPECT_DOUBLE_EQ(e->uncertainty_ns, 100);
  EXPECT_DOUBLE_EQ(e->at_local_ns, 1'100);
}

TEST(ClockOffset, StartAndEndEstimatesGiveTheDrift) {
  const double run_ns = 60e9;  // a one-minute run
  for (double ppm : {-50.0, 0.0, 3.0, 100.0}) {
    const RemoteClock remote{7'500'000.0, ppm * 1e-6, 1e12};
    const auto at_start = Probe(remote, 1e12, 20'000, 100, 15'000, 15'000, 10'000, 3);
    const auto at_end = Probe(remote, 1e12 + run_ns, 20'000, 100, 15'000, 15'000, 10'000, 4);
    auto s = EstimateOffset(at_start);
    auto e = EstimateOffset(at_end);
    ASSERT_TRUE(s.ok() && e.ok());
    auto model = ClockModel::FromStartEnd(*s, *e);
    ASSERT_TRUE(model.ok()) << model.status();
    // Drift error is bounded by the two uncertainties over the run length.
    const double drift_bound_ppm = (s->uncertainty_ns + e->uncertainty_ns) / run_ns * 1e6;
    EXPECT_NEAR(model->drift_ppm(), ppm, drift_bound_ppm) << ppm;
    // In the middle of the run the modelled offset is within the interpolated uncertainty of the truth.
    const double mid = 1e12 + run_ns / 2;
    EXPECT_LE(std::abs(model->OffsetAt(mid) - remote.OffsetAt(mid)), model->UncertaintyAt(mid)) << ppm;
    // Converting a remote stamp back to local time lands within the uncertainty.
    const uint64_t remote_stamp = remote.At(mid);
    EXPECT_LE(std::abs(static_cast<double>(model->ToLocal(remote_stamp)) - mid), model->UncertaintyAt(mid) + 1)
        << ppm;
    EXPECT_EQ(model->ToLocal(0), 0u);
  }
}

TEST(ClockOffset, ModelFromOneEstimateIsConstantAndSameTimeIsRefused) {
  OffsetEstimate e;
  e.offset_ns = 1'000;
  e.uncertainty_ns = 50;
  e.at_local_ns = 5'000;
  ClockModel m(e);
  EXPECT_DOUBLE_EQ(m.OffsetAt(1e12), 1'000);
  EXPECT_DOUBLE_EQ(m.UncertaintyAt(1e12), 50);
  EXPECT_EQ(m.ToLocal(1'000'000), 999'000u);
  EXPECT_EQ(ClockModel::FromStartEnd(e, e).status().code(), absl::StatusCode::kInvalidArgument);
}


TEST(CausalFit, NoConstraintsMeansNoCorrection) {
  const CausalFit f = CausalBounds().Fit(50'000);
  EXPECT_EQ(f.correction_ns, 0);
  EXPECT_TRUE(f.consistent);
  EXPECT_TRUE(f.within_uncertainty);
  EXPECT_EQ(f.constraints, 0u);
}

TEST(CausalFit, StampsThatAlreadyRespectCausalityAreLeftAlone) {
  CausalBounds b;
  b.SentToReference(1'000, 1'040);       // sent by the node, received 40 ns later at the reference
  b.ReceivedFromReference(2'000, 2'030);  // sent by the reference, received 30 ns later at the node
  const CausalFit f = b.Fit(100);
  EXPECT_EQ(f.correction_ns, 0);
  EXPECT_EQ(f.lower_ns, -30);
  EXPECT_EQ(f.upper_ns, 40);
  EXPECT_EQ(f.constraints, 2u);
}

TEST(CausalFit, AnEstimateThatPutsAReceiveBeforeItsSendIsMovedJustEnough) {
  // The offset estimate is 25 ns off: the node's stamps read 25 ns late, so a message to the reference seems to
  // arrive 5 ns before it left. The smallest correction within the uncertainty is -5.
  CausalBounds b;
  b.SentToReference(1'025, 1'020);
  b.SentToReference(5'025, 5'060);
  b.ReceivedFromReference(3'000, 3'030);
  const CausalFit f = b.Fit(30);
  EXPECT_TRUE(f.consistent);
  EXPECT_TRUE(f.within_uncertainty);
  EXPECT_EQ(f.correction_ns, -5);
  EXPECT_EQ(ApplyCorrection(1'025, f.correction_ns), 1'020u);
  EXPECT_EQ(ApplyCorrection(0, f.correction_ns), 0u) << "0 means not recorded and stays so";
}

TEST(CausalFit, NeverMovesBeyondTheUncertaintyTheProbesProved) {
  CausalBounds b;
  b.ReceivedFromReference(10'000, 9'000);  // received 1000 ns before it was sent: needs +1000
  const CausalFit f = b.Fit(200);
  EXPECT_TRUE(f.consistent);
  EXPECT_FALSE(f.within_uncertainty);
  EXPECT_EQ(f.correction_ns, 200) << "moved as far as the hard bound allows; the rest stays a visible anomaly";
}

TEST(CausalFit, ContradictoryStampsAreReportedAndNotCorrected) {
  CausalBounds b;
  b.SentToReference(1'000, 900);          // needs c <= -100
  b.ReceivedFromReference(2'000, 1'900);  // needs c >= +100
  const CausalFit f = b.Fit(1'000);
  EXPECT_FALSE(f.consistent);
  EXPECT_EQ(f.correction_ns, 0);
}

TEST(CausalFit, ZeroStampsAddNoConstraint) {
  CausalBounds b;
  b.SentToReference(0, 10);
  b.ReceivedFromReference(10, 0);
  EXPECT_EQ(b.Fit(5).constraints, 0u);
  EXPECT_EQ(ApplyCorrection(3, -10), 1u) << "a correction never wraps a stamp below 1";
}

}  // namespace
}  // namespace aggvm::lab
