#include "common/futex.h"

#include <atomic>
#include <chrono>
#include <thread>

#include <gtest/gtest.h>

#include "common/clock.h"

namespace aggvm {
namespace {

TEST(Futex, AnUntimedWaitSleepsUntilTheWordChangesAndIsWoken) {
  std::atomic<uint32_t> word{0};
  std::atomic<bool> returned{false};
  std::atomic<int> waits{0};
  std::thread waiter([&] {
    for (uint32_t v; (v = word.load()) == 0;) {
      waits.fetch_add(1);
      FutexWait(word, v);
    }
    returned = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(returned) << "the wait returned while the word still held its value";
  word.store(1);
  FutexWake(word);
  waiter.join();
  EXPECT_TRUE(returned);
  // One sleep, perhaps a spurious return: a wait that did not sleep would have looped for the whole 100 ms.
  EXPECT_LE(waits.load(), 3) << "the wait did not sleep";
}

TEST(Futex, ATimedWaitEndsAfterItsTimeoutAndAChangedWordEndsItAtOnce) {
  std::atomic<uint32_t> word{7};
  const uint64_t t0 = MonotonicNanos();
  FutexWait(word, 7, 20'000'000);
  EXPECT_GE(MonotonicNanos() - t0, 20'000'000u);
  const uint64_t t1 = MonotonicNanos();
  FutexWait(word, 8, 10'000'000'000ull);  // the word is not 8: no sleep (EAGAIN)
  EXPECT_LT(MonotonicNanos() - t1, 5'000'000'000u);
}

}  // namespace
}  // namespace aggvm
