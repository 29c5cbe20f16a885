// Test helpers that watch a thread from outside: how often it went to sleep (read from /proc), and whether a stop
// request ends it in time without letting a stuck thread hang the test.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <fstream>
#include <functional>
#include <future>
#include <string>
#include <thread>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace aggvm::testing {

/// How many times thread `tid` of this process went to sleep (voluntary_ctxt_switches in /proc), -1 if unknown: an
/// idle data-plane thread that waits without a timeout must not count up.
inline int64_t VoluntarySwitches(pid_t tid) {
  std::ifstream in("/proc/self/task/" + std::to_string(tid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("voluntary_ctxt_switches:", 0) == 0) return std::stoll(line.substr(line.find(':') + 1));
  }
  return -1;
}

/// How many times thread `tid` went to sleep during the next `window` (the caller sleeps that long), -1 if /proc
/// does not say.
inline int64_t SleepsDuring(pid_t tid, absl::Duration window) {
  const int64_t before = VoluntarySwitches(tid);
  absl::SleepFor(window);
  const int64_t after = VoluntarySwitches(tid);
  return before < 0 || after < 0 ? -1 : after - before;
}

/// Asks `t` to stop and joins it; false if it had not ended within `timeout` — then `unstick` is called (a Wake of
/// the transport it sleeps on) before joining, so that the test fails instead of hanging.
inline bool StopsWithin(std::jthread& t, absl::Duration timeout, const std::function<void()>& unstick) {
  t.request_stop();
  std::promise<void> joined;
  auto done = joined.get_future();
  std::thread joiner([&] {
    t.join();
    joined.set_value();
  });
  const bool in_time = done.wait_for(absl::ToChronoNanoseconds(timeout)) == std::future_status::ready;
  if (!in_time) unstick();
  joiner.join();
  return in_time;
}

}  // namespace aggvm::testing
