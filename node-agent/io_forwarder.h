// Synchronous forwarding of a vCPU's port / MMIO access to a device on the master (the console UART, the doorbell,
// the IOAPIC registers): the vCPU thread sends kIoRequest and sleeps until the matching kIoResponse arrives.
//
// Hand-off (several vCPU threads forward at once; ONE data-plane thread polls the transport):
//   - one Slot per vCPU index, cache-line aligned. A vCPU has at most one access in flight (its thread is inside
//     KVM_RUN's exit handling), so a slot needs no queue and the response is matched by the vCPU index.
//   - vCPU thread (Forward): state = kWaiting (release), send the request through LocalController::SendToMaster,
//     then spin for `spin` (busy-poll nodes) and futex-wait on `state` until it leaves kWaiting or the deadline.
//   - data-plane thread (OnResponse): checks the response against the slot's request (space, direction, size,
//     address), stores data/status, then state = kDone (release) and FUTEX_WAKE. The waiter reads them after an
//     acquire load of kDone.
//   - A response that arrives after its request timed out must not answer the NEXT request of that vCPU: the slot
//     counts responses still owed (`stale`); the transport is in order, so the next `stale` responses for the vCPU
//     are discarded (counted) before one is matched again.
//   - Master lost (LocalController calls FailAll): every waiter wakes with UNAVAILABLE, later calls fail at once.
// No allocation, no mutex, no log per access.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/counter.h"
#include "common/types.h"
#include "transport/frame.h"

namespace aggvm::agent {

class LocalController;

struct IoAccess {
  transport::IoRequestPayload::Space space = transport::IoRequestPayload::Space::kPio;
  bool is_write = false;
  uint8_t size = 1;     // 1, 2, 4 (pio) or 8 (mmio)
  uint64_t address = 0;
  uint64_t data = 0;    // writes
};

struct IoResult {
  uint64_t data = 0;        // reads: the value (all ones when no device answered)
  bool no_device = false;   // the master has no device there (status 1)
};

struct IoForwarderOptions {
  /// How long a vCPU waits for the answer before giving up (the VM should then stop with the error).
  absl::Duration timeout = absl::Seconds(2);
  /// Spin before sleeping (busy-poll nodes: the answer usually comes within a few microseconds).
  absl::Duration spin = absl::Microseconds(50);
};

struct IoForwarderCounters {
  Counter requests;
  Counter responses;
  Counter no_device;
  Counter timeouts;
  Counter failed;             // send failed or master lost
  Counter stale_responses;    // answers to requests that had timed out, discarded
  Counter unexpected;         // responses matching no request in flight (bad vCPU, mismatched access)
};

class IoForwarder {
 public:
  /// Attaches itself to `controller` (set_io_forwarder); call before the data-plane thread starts.
  IoForwarder(LocalController* controller, uint32_t num_vcpus, IoForwarderOptions options = {});
  ~IoForwarder();
  IoForwarder(const IoForwarder&) = delete;
  IoForwarder& operator=(const IoForwarder&) = delete;

  /// Called on vCPU `vcpu`'s thread (one access at a time per vCPU). INVALID_ARGUMENT for a bad access or vCPU,
  /// DEADLINE_EXCEEDED after options.timeout, UNAVAILABLE when the master is lost.
  absl::StatusOr<IoResult> Forward(VcpuIndex vcpu, const IoAccess& access);

  // --- data-plane thread (LocalController) ---
  void OnResponse(const transport::IoRequestPayload& response);
  void FailAll(const absl::Status& why);

  [[nodiscard]] IoForwarderCounters counters() const { return counters_; }

 private:
  struct Slot;
  LocalController* controller_;
  const uint32_t num_vcpus_;
  const IoForwarderOptions options_;
  std::unique_ptr<Slot[]> slots_;
  std::atomic<bool> lost_{false};
  std::string lost_reason_;  // written once before lost_ is set (release)
  IoForwarderCounters counters_;
};

}  // namespace aggvm::agent
