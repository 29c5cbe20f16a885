#include "vcpu/vcpu_thread.h"

#include <csignal>
#include <cstring>
#include <variant>

#include "absl/strings/str_cat.h"
#include "common/thread.h"
#include "vcpu/errno_status.h"

namespace aggvm::vcpu {
namespace {

void IgnoreKick(int) {}

absl::Status InstallKickHandler() {
  static const absl::Status installed = [] {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_handler = IgnoreKick;  // no SA_RESTART: the point is to interrupt KVM_RUN
    sigemptyset(&sa.sa_mask);
    if (::sigaction(KickSignal(), &sa, nullptr) != 0) return ErrnoStatus(errno, "sigaction(SIGRTMIN)");
    return absl::OkStatus();
  }();
  return installed;
}

}  // namespace

int KickSignal() { return SIGRTMIN; }

VcpuThread::VcpuThread(Vcpu& vcpu, ExitHandler handler, VcpuInterruptHooks* hooks)
    : vcpu_(vcpu), handler_(std::move(handler)), hooks_(hooks) {}

VcpuThread::~VcpuThread() {
  Stop();
  if (thread_.joinable()) thread_.join();
}

absl::Status VcpuThread::Start(bool paused) {
  if (auto s = InstallKickHandler(); !s.ok()) return s;
  std::lock_guard l(mu_);
  if (state_ != State::kCreated || thread_.joinable()) {
    return absl::FailedPreconditionError(absl::StrCat("vCPU ", vcpu_.id().value(), " thread already started"));
  }
  // A Stop() before Start() wins.
  State expected = State::kCreated;
  desired_.compare_exchange_strong(expected, paused ? State::kPaused : State::kRunning);
  thread_ = std::thread([this] {
    NameThisThread(absl::StrCat("vcpu-", vcpu_.id().value()));
    Loop();
  });
  return absl::OkStatus();
}

absl::Status VcpuThread::Pin(const std::vector<int>& cpus) {
  // Under mu_ the thread cannot get past its final SetState(kStopped), so it is alive for the call below. An exited
  // thread must never be pinned: glibc then passes tid 0 to sched_setaffinity, which places the *calling* thread.
  std::lock_guard l(mu_);
  if (!thread_.joinable() || state_ == State::kStopped) {
    return absl::FailedPreconditionError(absl::StrCat("vCPU ", vcpu_.id().value(), " thread is not running"));
  }
  if (auto s = PinThread(thread_.native_handle(), cpus); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("vCPU ", vcpu_.id().value(), ": ", s.message()));
  }
  return absl::OkStatus();
}

void VcpuThread::Pause() {
  State cur = desired_.load();
  while (cur != State::kStopped && !desired_.compare_exchange_weak(cur, State::kPaused)) {
  }
  Kick();
}

void VcpuThread::Resume() {
  {
    std::lock_guard l(mu_);
    State cur = desired_.load();
    while (cur != State::kStopped && !desired_.compare_exchange_weak(cur, State::kRunning)) {
    }
  }
  cv_.notify_all();
}

void VcpuThread::Stop() {
  {
    std::lock_guard l(mu_);
    desired_.store(State::kStopped);
  }
  cv_.notify_all();
  Kick();
}

void VcpuThread::Kick() {
  // Order: the caller's desired_ store, then immediate_exit = 1, then the signal. The vCPU thread clears
  // immediate_exit before it reloads desired_, so it either sees the new desired_ or enters KVM_RUN with
  // immediate_exit set (an immediate EINTR) or is inside the guest when the signal lands (EINTR).
  vcpu_.SetImmediateExit(true);
  if (hooks_ != nullptr) hooks_->Wake();  // a vCPU sleeping through a guest HLT in userspace
  std::lock_guard l(mu_);
  if (thread_.joinable() && state_ != State::kStopped) ::pthread_kill(thread_.native_handle(), KickSignal());
}

bool VcpuThread::started() const {
  std::lock_guard l(mu_);
  return thread_.joinable();
}

VcpuThread::State VcpuThread::state() const {
  std::lock_guard l(mu_);
  return state_;
}

void VcpuThread::SetState(State s) {
  {
    std::lock_guard l(mu_);
    state_ = s;
  }
  cv_.notify_all();
}

bool VcpuThread::WaitForState(State want, absl::Duration timeout) {
  std::unique_lock l(mu_);
  cv_.wait_for(l, absl::ToChronoNanoseconds(timeout), [&] { return state_ == want || state_ == State::kStopped; });
  return state_ == want;
}

absl::Status VcpuThread::WaitStopped(absl::Duration timeout) {
  std::unique_lock l(mu_);
  if (!cv_.wait_for(l, absl::ToChronoNanoseconds(timeout), [&] { return state_ == State::kStopped; })) {
    return absl::DeadlineExceededError(
        absl::StrCat("vCPU ", vcpu_.id().value(), " thread did not stop within ", absl::FormatDuration(timeout)));
  }
  return finish_status_;
}

void VcpuThread::Loop() {
  absl::Status why;
  bool published_running = false;  // state_ == kRunning already announced (avoids a lock per exit)
  for (;;) {
    if (desired_.load() != State::kRunning) {
      std::unique_lock l(mu_);
      while (desired_.load() == State::kPaused) {
        if (state_ != State::kPaused) {
          state_ = State::kPaused;
          cv_.notify_all();
        }
        cv_.wait(l);
      }
      if (desired_.load() == State::kStopped) break;
      vcpu_.SetImmediateExit(false);
      published_running = state_ == State::kRunning;
    }
    if (!published_running) {
      SetState(State::kRunning);
      published_running = true;
    }

    if (hooks_ != nullptr) {
      if (absl::Status s = hooks_->BeforeRun(); !s.ok()) {
        why = std::move(s);
        break;
      }
    }
    auto exit = vcpu_.Run();
    if (hooks_ != nullptr) hooks_->AfterRun();
    if (!exit.ok()) {
      why = exit.status();
      break;
    }
    if (std::holds_alternative<Kicked>(*exit)) {
      kicks_.fetch_add(1, std::memory_order_relaxed);
      vcpu_.SetImmediateExit(false);  // before desired_ is reloaded at the top (see Kick)
      continue;
    }
    exits_.fetch_add(1, std::memory_order_relaxed);
    if (hooks_ != nullptr && hooks_->OnExit(*exit) == VcpuInterruptHooks::Disposition::kHandled) continue;
    ExitAction action = handler_(*exit);
    if (action.finish) {
      why = std::move(action.status);
      break;
    }
  }
  {
    std::lock_guard l(mu_);
    finish_status_ = std::move(why);
    state_ = State::kStopped;
    desired_.store(State::kStopped);
  }
  cv_.notify_all();
}

}  // namespace aggvm::vcpu
