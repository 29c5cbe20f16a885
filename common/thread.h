// Thread names and CPU placement for the node's long-lived threads.
//
// Every thread of a master or an agent that runs for the life of a VM is named (vcpu-3, dataplane, train, ...):
// `top -H`, `ps -L -o tid,comm`, perf and /proc/PID/task/*/comm then say which thread is which, and an operator can
// place them with `taskset -p` by name. Placement from the agent's own flags uses ParseCpuList + PinThisThread.
#pragma once

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <future>
#include <iterator>
#include <string>
#include <string_view>
#include <stop_token>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace aggvm {

/// Names the calling thread (Linux keeps 15 bytes; longer names are cut).
inline void NameThisThread(std::string_view name) {
  char buf[16] = {};
  name.copy(buf, sizeof buf - 1);
  (void)pthread_setname_np(pthread_self(), buf);
}

/// "0-3,6,8-9" -> {0,1,2,3,6,8,9}, sorted, no duplicates. Refuses (naming the part) an empty list, a part that is
/// not a number or a range, a reversed range and CPUs >= CPU_SETSIZE.
inline absl::StatusOr<std::vector<int>> ParseCpuList(std::string_view text) {
  std::vector<int> cpus;
  if (text.empty()) return absl::InvalidArgumentError("CPU list: empty (expected e.g. 0-1,3)");
  auto number = [](std::string_view s, int& out) {  // digits only: no sign, no space
    if (s.empty() || s.size() > 9 || s.find_first_not_of("0123456789") != std::string_view::npos) return false;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
    return ec == std::errc() && end == s.data() + s.size();
  };
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t comma = std::min(text.find(',', pos), text.size());
    const std::string_view part = text.substr(pos, comma - pos);
    const size_t dash = part.find('-');
    int lo = 0, hi = 0;
    const bool ok = dash == std::string_view::npos
                        ? number(part, lo) && ((hi = lo), true)
                        : number(part.substr(0, dash), lo) && number(part.substr(dash + 1), hi);
    if (!ok) {
      return absl::InvalidArgumentError(
          fmt::format("CPU list '{}': '{}' is not a CPU number or a range like 2-3", text, part));
    }
    if (lo > hi) return absl::InvalidArgumentError(fmt::format("CPU list '{}': range '{}' is reversed", text, part));
    if (hi >= CPU_SETSIZE) {
      return absl::InvalidArgumentError(fmt::format("CPU list '{}': CPU {} is above {}", text, hi, CPU_SETSIZE - 1));
    }
    for (int c = lo; c <= hi; ++c) cpus.push_back(c);
    pos = comma + 1;
  }
  std::sort(cpus.begin(), cpus.end());
  cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
  return cpus;
}

/// "0-3,6" for {0,1,2,3,6}: how logs print a set.
inline std::string FormatCpuList(const std::vector<int>& cpus) {
  std::string out;
  for (size_t i = 0; i < cpus.size();) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += j == i ? fmt::format("{}", cpus[i]) : fmt::format("{}-{}", cpus[i], cpus[j]);
    i = j + 1;
  }
  return out;
}

/// Restricts `thread` to `cpus` (threads it starts afterwards inherit that). FAILED_PRECONDITION naming the CPUs
/// when the kernel refuses (a CPU that is offline or outside this process's cpuset, an empty list).
inline absl::Status PinThread(pthread_t thread, const std::vector<int>& cpus) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : cpus) {
    if (c >= 0 && c < CPU_SETSIZE) CPU_SET(c, &set);
  }
  if (const int err = pthread_setaffinity_np(thread, sizeof set, &set); err != 0) {
    return absl::FailedPreconditionError(fmt::format("cannot run a thread on CPUs {}: {}", FormatCpuList(cpus),
                                                     std::strerror(err)));
  }
  return absl::OkStatus();
}
inline absl::Status PinThisThread(const std::vector<int>& cpus) { return PinThread(pthread_self(), cpus); }

/// The CPUs in `set`, sorted.
inline std::vector<int> CpusIn(const cpu_set_t& set) {
  std::vector<int> out;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &set)) out.push_back(c);
  }
  return out;
}

/// The CPUs `thread` may run on, sorted (empty if it cannot be read).
inline std::vector<int> ThreadCpus(pthread_t thread) {
  cpu_set_t set;
  return pthread_getaffinity_np(thread, sizeof set, &set) == 0 ? CpusIn(set) : std::vector<int>{};
}

/// A CPU-list command-line flag: "" = no placement (empty list); otherwise parsed and tried on a scratch thread, so a
/// list the kernel refuses — wholly, or in part (it keeps the usable CPUs of a list and drops the others) — is an
/// error at start-up naming the flag and the CPUs, not a surprise at the first VM.
inline absl::StatusOr<std::vector<int>> CpuListFlag(std::string_view flag, std::string_view text) {
  if (text.empty()) return std::vector<int>{};
  auto cpus = ParseCpuList(text);
  if (!cpus.ok()) return absl::InvalidArgumentError(fmt::format("{}: {}", flag, std::string(cpus.status().message())));
  absl::Status tried;
  std::vector<int> got;
  std::thread([&] {
    tried = PinThisThread(*cpus);
    got = ThreadCpus(pthread_self());
  }).join();
  if (!tried.ok()) return absl::InvalidArgumentError(fmt::format("{} {}: {}", flag, text, std::string(tried.message())));
  if (got != *cpus) {
    std::vector<int> missing;
    std::set_difference(cpus->begin(), cpus->end(), got.begin(), got.end(), std::back_inserter(missing));
    return absl::InvalidArgumentError(fmt::format("{} {}: CPUs {} cannot be used here (of the list, only {} can)",
                                                  flag, text, FormatCpuList(missing), FormatCpuList(got)));
  }
  return cpus;
}

/// Starts a thread named `name` that first places itself on `cpus` (stays where it may run now if empty) and then
/// runs `body(stop_token)`. Returns once the placement is known: the kernel's refusal (the thread has then ended
/// without running `body`) or the running thread. The thread places itself, rather than its creator placing it,
/// because a thread that has already exited must never be pinned: glibc would then place the calling thread.
template <typename Body>
absl::StatusOr<std::jthread> StartPlacedThread(std::string_view name, std::vector<int> cpus, Body body) {
  std::promise<absl::Status> placed;
  std::future<absl::Status> placement = placed.get_future();
  std::jthread thread([name = std::string(name), cpus = std::move(cpus), placed = std::move(placed),
                       body = std::move(body)](std::stop_token stop) mutable {
    NameThisThread(name);
    absl::Status s = cpus.empty() ? absl::OkStatus() : PinThisThread(cpus);
    const bool ok = s.ok();
    placed.set_value(std::move(s));
    if (ok) body(std::move(stop));
  });
  if (absl::Status s = placement.get(); !s.ok()) {
    thread.join();
    return s;
  }
  return thread;
}

/// Places the calling thread on `cpus` (nothing if empty) for the object's lifetime, then puts it back where it
/// could run before. status() says whether the placement took; it is refused when the current CPUs cannot be read,
/// since they could not be restored afterwards.
class ScopedPlacement {
 public:
  explicit ScopedPlacement(const std::vector<int>& cpus) : before_(ThreadCpus(pthread_self())) {
    if (cpus.empty()) return;
    if (before_.empty()) {
      status_ = absl::InternalError("cannot read this thread's CPUs (sched_getaffinity) to restore them afterwards");
      return;
    }
    status_ = PinThisThread(cpus);
    placed_ = status_.ok();
  }
  ~ScopedPlacement() {
    if (!placed_) return;
    if (const absl::Status s = PinThisThread(before_); !s.ok()) {
      std::fprintf(stderr, "could not put a thread back on CPUs %s after a placed section (%s); what follows runs "
                           "placed\n", FormatCpuList(before_).c_str(), std::string(s.message()).c_str());
    }
  }
  ScopedPlacement(const ScopedPlacement&) = delete;
  ScopedPlacement& operator=(const ScopedPlacement&) = delete;
  [[nodiscard]] const absl::Status& status() const { return status_; }

 private:
  std::vector<int> before_;
  absl::Status status_;
  bool placed_ = false;
};

}  // namespace aggvm
