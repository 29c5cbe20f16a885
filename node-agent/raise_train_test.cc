// RaiseTrain: the raises happen on schedule (absolute deadlines), Stop ends a train at once, a new train replaces a
// running one, and nothing runs after Stop returns.
#include "node-agent/raise_train.h"

#include <atomic>
#include <functional>
#include <mutex>
#include <vector>

#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include "common/clock.h"

namespace aggvm::agent {
namespace {

bool WaitFor(const std::function<bool()>& done, absl::Duration limit) {
  for (absl::Time end = absl::Now() + limit; absl::Now() < end;) {
    if (done()) return true;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return done();
}

TEST(RaiseTrain, RaisesCountTimesOnSchedule) {
  RaiseTrain train;
  std::mutex mu;
  std::vector<uint64_t> at;
  constexpr uint32_t kCount = 20;
  const uint64_t t0 = MonotonicNanos();
  train.Start(kCount, absl::Milliseconds(2), [&] {
    std::lock_guard l(mu);
    at.push_back(MonotonicNanos());
  });
  ASSERT_TRUE(WaitFor([&] { return !train.running(); }, absl::Seconds(10)));
  std::lock_guard l(mu);
  // Every deadline is either raised or (after a stall of more than one interval, on a loaded machine) skipped.
  EXPECT_EQ(at.size(), train.raises());
  EXPECT_EQ(train.raises() + train.skipped(), kCount);
  EXPECT_GE(train.raises(), 2u);
  EXPECT_EQ(train.trains(), 1u);
  // The k-th raise is due no earlier than start + 2 ms * k (start >= t0; skipping only moves later): never early.
  for (size_t k = 0; k < at.size(); ++k) {
    EXPECT_GE(at[k] - t0, uint64_t{k} * 2'000'000) << "raise " << k << " came early";
  }
}

// A raise that stalls the thread for more than an interval: the deadlines that passed meanwhile are skipped and
// counted, not fired back to back; the train then goes on on schedule.
TEST(RaiseTrain, DeadlinesMissedInAStallAreSkippedNotBurst) {
  RaiseTrain train;
  std::atomic<uint32_t> n{0};
  constexpr uint32_t kCount = 10;
  train.Start(kCount, absl::Milliseconds(2), [&] {
    if (n.fetch_add(1) == 1) absl::SleepFor(absl::Milliseconds(9));  // the second raise stalls ~4.5 intervals
  });
  ASSERT_TRUE(WaitFor([&] { return !train.running(); }, absl::Seconds(10)));
  EXPECT_GE(train.skipped(), 3u);
  EXPECT_GE(train.late(), 1u);
  EXPECT_EQ(train.raises() + train.skipped(), kCount);
  EXPECT_EQ(n.load(), train.raises());
}

TEST(RaiseTrain, StopEndsATrainAndNothingRunsAfterIt) {
  RaiseTrain train;
  std::atomic<uint32_t> n{0};
  train.Start(1000, absl::Milliseconds(5), [&] { n.fetch_add(1); });
  ASSERT_TRUE(WaitFor([&] { return n.load() >= 2; }, absl::Seconds(5)));
  const absl::Time before = absl::Now();
  train.Stop();
  EXPECT_LT(absl::Now() - before, absl::Milliseconds(500)) << "Stop waited for the next deadline";
  const uint32_t at_stop = n.load();
  EXPECT_LT(at_stop, 1000u);
  EXPECT_FALSE(train.running());
  absl::SleepFor(absl::Milliseconds(30));
  EXPECT_EQ(n.load(), at_stop) << "a raise ran after Stop returned";
}

TEST(RaiseTrain, ANewTrainReplacesTheRunningOne) {
  RaiseTrain train;
  std::atomic<uint32_t> first{0}, second{0};
  train.Start(1000, absl::Milliseconds(5), [&] { first.fetch_add(1); });
  ASSERT_TRUE(WaitFor([&] { return first.load() >= 1; }, absl::Seconds(5)));
  train.Start(3, absl::Milliseconds(1), [&] { second.fetch_add(1); });
  const uint32_t first_at_replace = first.load();
  ASSERT_TRUE(WaitFor([&] { return !train.running(); }, absl::Seconds(5)));
  EXPECT_EQ(second.load(), 3u);
  EXPECT_EQ(first.load(), first_at_replace) << "the replaced train kept raising";
  EXPECT_EQ(train.trains(), 2u);
}

TEST(RaiseTrain, ZeroCountStartsNothing) {
  RaiseTrain train;
  std::atomic<uint32_t> n{0};
  train.Start(0, absl::Milliseconds(1), [&] { n.fetch_add(1); });
  EXPECT_FALSE(train.running());
  EXPECT_EQ(train.trains(), 0u);
  EXPECT_EQ(n.load(), 0u);
}

}  // namespace
}  // namespace aggvm::agent
