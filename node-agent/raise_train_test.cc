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
  ASSERT_EQ(at.size(), kCount);
  EXPECT_EQ(train.raises(), kCount);
  EXPECT_EQ(train.trains(), 1u);
  // Raise i is due at first + 2 ms * i: never before it (deadlines are absolute, a wake-up is never early).
  for (uint32_t i = 1; i < kCount; ++i) {
    EXPECT_GE(at[i] - at[0], uint64_t{i} * 2'000'000 - 100'000) << "raise " << i << " came early";
  }
  EXPECT_GE(at.back() - t0, uint64_t{kCount - 1} * 2'000'000 - 100'000);
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
