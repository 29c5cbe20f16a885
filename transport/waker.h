// Waker: lets any thread end a transport's Wait early — the owner's polling thread then runs what was queued for it
// (the master's operator commands: a doorbell ring, a policy switch) at once instead of after Wait's timeout.
//
// An eventfd the transport adds to what its Wait sleeps on (epoll set, ppoll set) plus a flag that busy-polling
// loops read without a system call. Created with the transport and closed only when it is destroyed, so a Wake from
// another thread never writes to a closed (or reused) descriptor.
#pragma once

#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>

#include "absl/status/status.h"

namespace aggvm::transport {

class Waker {
 public:
  Waker() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  ~Waker() {
    if (fd_ >= 0) ::close(fd_);
  }
  Waker(const Waker&) = delete;
  Waker& operator=(const Waker&) = delete;

  /// Any thread. The flag first (release), so a waiter woken by the eventfd also sees it.
  void Wake() noexcept {
    pending_.store(true, std::memory_order_release);
    Signal();
  }
  /// Any thread: ends a sleep in progress (or the next one) without asking the waiter to return — it re-checks what
  /// it sleeps for (say, a peer that another thread's Send found lost) and sleeps again if there is nothing to
  /// report. Unlike Wake, a Kick never makes a Wait return 0 frames by itself.
  void Kick() noexcept { Signal(); }
  /// The waiting thread: true if a Wake came since the last Consume. Always drains the eventfd: a Wake whose flag
  /// an earlier Consume already took may still have written it, and a readable eventfd with nothing behind it
  /// would make every later sleep return at once. Drains first, then takes the flag: a Wake whose write this read
  /// swallowed set its flag before writing, so the exchange sees it (the other order could drain a Wake's write
  /// after clearing the flag it set just before, leaving a set flag with nothing to wake a sleep without timeout).
  bool Consume() noexcept {
    if (fd_ >= 0) {
      uint64_t v = 0;
      [[maybe_unused]] const ssize_t n = ::read(fd_, &v, sizeof v);
    }
    return pending_.exchange(false, std::memory_order_acq_rel);
  }
  [[nodiscard]] bool pending() const noexcept { return pending_.load(std::memory_order_acquire); }
  /// -1 if eventfd failed: then only the flag works (busy polling); the transports refuse to be created in event
  /// mode without it, since a Wait without a timeout could then not be woken.
  [[nodiscard]] int fd() const noexcept { return fd_; }
  /// What a transport's Create returns in event mode when the eventfd is missing (OK otherwise).
  [[nodiscard]] absl::Status CanEndASleep() const {
    if (fd_ >= 0) return absl::OkStatus();
    return absl::ResourceExhaustedError("eventfd for the transport's waker failed: an event-mode Wait could not be "
                                        "woken (out of file descriptors?)");
  }

 private:
  void Signal() noexcept {
    if (fd_ >= 0) {
      const uint64_t one = 1;
      [[maybe_unused]] const ssize_t n = ::write(fd_, &one, sizeof one);  // EAGAIN only at 2^64-1: already readable
    }
  }

  const int fd_;
  std::atomic<bool> pending_{false};
};

}  // namespace aggvm::transport
