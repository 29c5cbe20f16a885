// The thread that runs one vCPU, as an explicit state machine (after Firecracker's vstate/vcpu.rs):
//
//     Created --Start()--> Running <--Pause()/Resume()--> Paused
//                             |                              |
//                             +-----------> Stopped <--------+   (Stop(), a handler's Finish, or a KVM_RUN error)
//
// Another thread drives it with Pause / Resume / Stop; each of these records the wanted state and kicks the vCPU
// out of KVM_RUN: kvm_run->immediate_exit = 1 (catches a vCPU that is about to enter) plus a signal to the thread
// (catches a vCPU inside the guest, also while it halts in the in-kernel LAPIC). KVM_RUN then returns EINTR, which is
// the Kicked exit, never a failure. Stopped is final.
//
// Every other exit goes to the ExitHandler on the vCPU thread; it returns Continue or Finish(status).
//
// In `user` irqchip mode the vCPU's local APIC lives in userspace: VcpuInterruptHooks (user_irqchip.h) inject before
// each entry, take the APIC's exits (MSR, APIC MMIO, HLT, interrupt window) before the ExitHandler sees them, and
// sleep through a guest HLT. Kick() then also ends such a userspace halt.
#pragma once

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "vcpu/vcpu.h"
#include "vcpu/vcpu_exit.h"

namespace aggvm::vcpu {

/// Interrupt delivery done in userspace for one vCPU (no in-kernel LAPIC). Called by its VcpuThread.
class VcpuInterruptHooks {
 public:
  enum class Disposition : uint8_t { kHandled, kPass };
  virtual ~VcpuInterruptHooks() = default;
  /// vCPU thread, right before each KVM_RUN: inject what is pending (KVM_INTERRUPT) or request an interrupt window.
  /// An error ends the thread.
  virtual absl::Status BeforeRun() = 0;
  /// vCPU thread, right after each KVM_RUN returned, whatever it returned.
  virtual void AfterRun() = 0;
  /// vCPU thread, every exit but Kicked. kHandled: consumed (may have slept through a HLT); kPass: `exit`, possibly
  /// rewritten (an EOI broadcast becomes IoapicEoi), goes to the ExitHandler.
  virtual Disposition OnExit(VcpuExit& exit) = 0;
  /// Any thread: end a userspace halt wait now (the VcpuThread has a new command).
  virtual void Wake() = 0;
};

class VcpuThread {
 public:
  enum class State : uint8_t { kCreated, kRunning, kPaused, kStopped };

  /// What the exit handler wants next.
  struct ExitAction {
    bool finish = false;
    absl::Status status;  // why it finished (OK = the guest is done)
    static ExitAction Continue() { return {}; }
    static ExitAction Finish(absl::Status s) { return {true, std::move(s)}; }
  };
  using ExitHandler = std::function<ExitAction(VcpuExit&)>;

  /// `vcpu` (and `hooks`, when given) must outlive this object. The thread starts with Start().
  VcpuThread(Vcpu& vcpu, ExitHandler handler, VcpuInterruptHooks* hooks = nullptr);
  /// Stops and joins the thread.
  ~VcpuThread();
  VcpuThread(const VcpuThread&) = delete;
  VcpuThread& operator=(const VcpuThread&) = delete;

  /// Starts the thread, running (or paused when `paused`). Fails if already started.
  absl::Status Start(bool paused = false);
  /// Asynchronous requests; WaitForState() waits for their effect. Pause/Resume after Stopped do nothing.
  void Pause();
  void Resume();
  void Stop();
  /// Forces one Kicked exit (e.g. to make the thread look at new work).
  void Kick();
  /// Restricts the started thread to `cpus` (common/thread.h). FAILED_PRECONDITION before Start().
  absl::Status Pin(const std::vector<int>& cpus);

  [[nodiscard]] State state() const;
  /// True once Start() launched the thread (its state may still read kCreated for a moment).
  [[nodiscard]] bool started() const;
  /// True once the thread is in `want` (Stopped also ends the wait, returning want == kStopped).
  bool WaitForState(State want, absl::Duration timeout);
  /// Why the thread stopped (OK for Stop() or a clean finish); DeadlineExceeded if it has not stopped by then.
  absl::Status WaitStopped(absl::Duration timeout);
  /// Exits handled (Kicked ones excluded) and kicks seen.
  [[nodiscard]] uint64_t exits() const { return exits_.load(std::memory_order_relaxed); }
  [[nodiscard]] uint64_t kicks() const { return kicks_.load(std::memory_order_relaxed); }

 private:
  void Loop();
  void SetState(State s);

  Vcpu& vcpu_;
  ExitHandler handler_;
  VcpuInterruptHooks* hooks_ = nullptr;
  std::thread thread_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  State state_ = State::kCreated;       // guarded by mu_
  absl::Status finish_status_;          // guarded by mu_
  std::atomic<State> desired_{State::kCreated};
  std::atomic<uint64_t> exits_{0};
  std::atomic<uint64_t> kicks_{0};
};

/// The signal used to kick vCPU threads (SIGRTMIN). Its handler is installed by the first Start().
int KickSignal();

}  // namespace aggvm::vcpu
