#include "node-agent/trace_reporter.h"

#include <chrono>
#include <latch>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace aggvm::agent {
namespace {

using namespace std::chrono_literals;

struct Collected {
  std::mutex mu;
  std::vector<uint64_t> raised;
  std::vector<std::thread::id> threads;

  TraceReporter::Sink Sink() {
    return [this](const transport::TraceBlock& t) {
      std::lock_guard l(mu);
      raised.push_back(t.raised);
      threads.push_back(std::this_thread::get_id());
    };
  }
  size_t Size() {
    std::lock_guard l(mu);
    return raised.size();
  }
  bool WaitFor(size_t n, std::chrono::milliseconds limit = 5000ms) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (Size() < n) {
      if (std::chrono::steady_clock::now() > end) return false;
      std::this_thread::sleep_for(1ms);
    }
    return true;
  }
};

transport::TraceBlock Block(uint64_t raised) {
  transport::TraceBlock t;
  t.raised = raised;
  t.injected = raised + 10;
  return t;
}

TEST(TraceReporter, BlocksReachTheSinkInOrderOnTheFlusherThread) {
  Collected c;
  auto r = TraceReporter::Start(c.Sink(), {.capacity = 64, .period = absl::Milliseconds(1)});
  ASSERT_TRUE(r.ok()) << r.status();
  for (uint64_t i = 1; i <= 40; ++i) ASSERT_TRUE((*r)->Push(Block(i)));
  ASSERT_TRUE(c.WaitFor(40));
  std::lock_guard l(c.mu);
  for (uint64_t i = 0; i < 40; ++i) EXPECT_EQ(c.raised[i], i + 1);
  for (const auto& id : c.threads) EXPECT_NE(id, std::this_thread::get_id()) << "Push must not call the sink";
  EXPECT_EQ((*r)->pushed(), 40u);
  EXPECT_EQ((*r)->dropped(), 0u);
}

TEST(TraceReporter, AFullRingDropsAndCountsNeverBlocks) {
  std::latch entered(1), release(1);
  std::atomic<bool> first{true};
  std::vector<uint64_t> got;
  std::mutex mu;
  auto r = TraceReporter::Start(
      [&](const transport::TraceBlock& t) {
        if (first.exchange(false)) {
          entered.count_down();
          release.wait();  // the consumer is stuck: the ring fills
        }
        std::lock_guard l(mu);
        got.push_back(t.raised);
      },
      {.capacity = 4, .period = absl::Milliseconds(1)});
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE((*r)->Push(Block(1)));
  entered.wait();
  for (uint64_t i = 2; i <= 5; ++i) EXPECT_TRUE((*r)->Push(Block(i))) << i;
  EXPECT_FALSE((*r)->Push(Block(6))) << "capacity 4, all in use";
  EXPECT_EQ((*r)->dropped(), 1u);
  release.count_down();
  r->reset();  // flushes what is queued
  EXPECT_EQ(got, (std::vector<uint64_t>{1, 2, 3, 4, 5}));
}

TEST(TraceReporter, DestructionFlushesWhatIsQueued) {
  Collected c;
  auto r = TraceReporter::Start(c.Sink(), {.capacity = 8, .period = absl::Seconds(5), .idle_after = absl::Seconds(5)});
  ASSERT_TRUE(r.ok());
  for (uint64_t i = 1; i <= 3; ++i) ASSERT_TRUE((*r)->Push(Block(i)));
  r->reset();
  EXPECT_EQ(c.Size(), 3u);
}

TEST(TraceReporter, SleepsWhenIdleAndWakesOnTheNextPush) {
  Collected c;
  auto r = TraceReporter::Start(c.Sink(), {.capacity = 8, .period = absl::Milliseconds(1),
                                           .idle_after = absl::Milliseconds(10)});
  ASSERT_TRUE(r.ok());
  std::this_thread::sleep_for(50ms);  // the flusher starts asleep
  ASSERT_TRUE((*r)->Push(Block(1)));
  ASSERT_TRUE(c.WaitFor(1));
  const uint64_t wakeups = (*r)->wakeups();
  EXPECT_GE(wakeups, 1u);
  std::this_thread::sleep_for(200ms);  // well past idle_after: asleep again
  ASSERT_TRUE((*r)->Push(Block(2)));
  ASSERT_TRUE(c.WaitFor(2)) << "a Push after a quiet spell must wake the flusher";
  EXPECT_GT((*r)->wakeups(), wakeups);
}

TEST(TraceReporter, BadOptionsAreRefused) {
  Collected c;
  EXPECT_FALSE(TraceReporter::Start(c.Sink(), {.capacity = 6}).ok());
  EXPECT_FALSE(TraceReporter::Start(c.Sink(), {.capacity = 0}).ok());
  EXPECT_FALSE(TraceReporter::Start(c.Sink(), {.period = absl::ZeroDuration()}).ok());
  EXPECT_FALSE(TraceReporter::Start(nullptr).ok());
}

}  // namespace
}  // namespace aggvm::agent
