#include "node-agent/io_forwarder.h"

#include <fmt/format.h>

#include "common/clock.h"
#include "common/futex.h"
#include "node-agent/local_controller.h"

namespace aggvm::agent {

using transport::Frame;
using transport::FrameType;
using transport::IoRequestPayload;

namespace {

enum SlotState : uint32_t { kIdle = 0, kWaiting = 1, kDone = 2, kFailed = 3 };

}  // namespace

// The futex word: (generation << 2) | state. The generation (bumped by the vCPU thread per request) makes a late
// answer unable to complete a newer request of the same vCPU even if it races with the timeout (no ABA).
constexpr uint32_t kStateMask = 3;
constexpr uint32_t Word(uint32_t gen, uint32_t state) { return (gen << 2) | state; }

struct alignas(64) IoForwarder::Slot {
  std::atomic<uint32_t> word{Word(0, kIdle)};
  uint32_t gen = 0;  // vCPU thread only
  // The access in flight: written by the vCPU thread before the kWaiting store (release), read by the data-plane
  // thread after its acquire load. Atomics because a vCPU that timed out may start its next request meanwhile.
  std::atomic<uint64_t> address{0};
  std::atomic<uint32_t> access{0};  // space | is_write << 1 | size << 8
  // The answer: written by the data-plane thread before its kDone CAS (release), read by the waiter after kDone.
  uint64_t data = 0;
  uint8_t status = 0;
  // Responses still owed for requests that timed out: the data-plane thread discards that many first.
  std::atomic<uint32_t> stale{0};
};

namespace {
uint32_t PackAccess(IoRequestPayload::Space space, uint8_t is_write, uint8_t size) {
  return static_cast<uint32_t>(space) | (static_cast<uint32_t>(is_write) << 1) | (static_cast<uint32_t>(size) << 8);
}
}  // namespace

IoForwarder::IoForwarder(LocalController* controller, uint32_t num_vcpus, IoForwarderOptions options)
    : controller_(controller), num_vcpus_(num_vcpus), options_(options),
      slots_(std::make_unique<Slot[]>(num_vcpus)) {
  controller_->set_io_forwarder(this);
}

IoForwarder::~IoForwarder() { controller_->set_io_forwarder(nullptr); }

absl::StatusOr<IoResult> IoForwarder::Forward(VcpuIndex vcpu, const IoAccess& access) {
  if (vcpu.value() >= num_vcpus_) {
    return absl::InvalidArgumentError(fmt::format("forwarded I/O: vCPU {} is outside the VM's {} vCPUs", vcpu,
                                                  num_vcpus_));
  }
  if (lost_.load(std::memory_order_acquire)) {
    counters_.failed.Add();
    return absl::UnavailableError(fmt::format("forwarded I/O of vCPU {} to {:#x}: {}", vcpu, access.address,
                                              lost_reason_));
  }
  Slot& slot = slots_[vcpu.value()];
  const uint32_t gen = ++slot.gen;
  const uint32_t waiting = Word(gen, kWaiting);
  slot.address.store(access.address, std::memory_order_relaxed);
  slot.access.store(PackAccess(access.space, access.is_write ? 1 : 0, access.size), std::memory_order_relaxed);
  slot.word.store(waiting, std::memory_order_release);

  Frame f;
  f.type = FrameType::kIoRequest;
  IoRequestPayload p;
  p.space = access.space;
  p.is_write = access.is_write ? 1 : 0;
  p.size = access.size;
  p.vcpu = vcpu;
  p.address = access.address;
  p.data = access.is_write ? access.data : 0;
  f.payload = p;
  if (absl::Status s = controller_->SendToMaster(f); !s.ok()) {
    slot.word.store(Word(gen, kIdle), std::memory_order_relaxed);
    counters_.failed.Add();
    if (s.code() == absl::StatusCode::kInvalidArgument) return s;  // names the bad field of the access
    return absl::Status(s.code(), fmt::format("forwarded I/O of vCPU {} to {:#x}: {}", vcpu, access.address,
                                              std::string(s.message())));
  }
  counters_.requests.Add();

  const uint64_t start = MonotonicNanos();
  const uint64_t spin_ns = static_cast<uint64_t>(absl::ToInt64Nanoseconds(options_.spin));
  const uint64_t timeout_ns = static_cast<uint64_t>(absl::ToInt64Nanoseconds(options_.timeout));
  uint32_t w = slot.word.load(std::memory_order_acquire);
  while (w == waiting) {
    const uint64_t elapsed = MonotonicNanos() - start;
    if (elapsed >= timeout_ns) break;
    if (elapsed < spin_ns) {
      __builtin_ia32_pause();
    } else {
      FutexWait(slot.word, waiting, timeout_ns - elapsed);
    }
    w = slot.word.load(std::memory_order_acquire);
  }
  if (w == waiting) {
    // Give up. If the answer lands between our load and this exchange, take it after all.
    if (slot.word.compare_exchange_strong(w, Word(gen, kIdle), std::memory_order_acq_rel)) {
      slot.stale.fetch_add(1, std::memory_order_relaxed);
      counters_.timeouts.Add();
      return absl::DeadlineExceededError(fmt::format(
          "forwarded {} of {} byte(s) at {} {:#x} by vCPU {}: no answer from the master within {}; is the master's "
          "data-plane thread running?", access.is_write ? "write" : "read", access.size,
          access.space == IoRequestPayload::Space::kPio ? "port" : "address", access.address, vcpu,
          absl::FormatDuration(options_.timeout)));
    }
  }
  if ((w & kStateMask) == kFailed) {
    slot.word.store(Word(gen, kIdle), std::memory_order_relaxed);
    counters_.failed.Add();
    return absl::UnavailableError(fmt::format("forwarded I/O of vCPU {} to {:#x}: {}", vcpu, access.address,
                                              lost_reason_));
  }
  IoResult r;
  r.data = slot.data;
  r.no_device = slot.status != 0;
  slot.word.store(Word(gen, kIdle), std::memory_order_relaxed);
  if (r.no_device) counters_.no_device.Add();
  return r;
}

void IoForwarder::OnResponse(const IoRequestPayload& response) {
  if (response.vcpu.value() >= num_vcpus_) {
    counters_.unexpected.Add();
    return;
  }
  Slot& slot = slots_[response.vcpu.value()];
  // The word first (acquire): if it shows a newer request, the stale count bumped before it is visible below.
  uint32_t w = slot.word.load(std::memory_order_acquire);
  const uint32_t stale = slot.stale.load(std::memory_order_relaxed);
  if (stale > 0) {
    // In-order transport: this answers the oldest request that timed out.
    slot.stale.store(stale - 1, std::memory_order_relaxed);
    counters_.stale_responses.Add();
    return;
  }
  if ((w & kStateMask) != kWaiting || slot.address.load(std::memory_order_relaxed) != response.address ||
      slot.access.load(std::memory_order_relaxed) != PackAccess(response.space, response.is_write, response.size)) {
    counters_.unexpected.Add();
    return;
  }
  slot.data = response.data;
  slot.status = response.status;
  // release: data/status are visible to the waiter that sees kDone. Fails only if that waiter just timed out (it
  // then counted this answer as owed).
  if (slot.word.compare_exchange_strong(w, (w & ~kStateMask) | kDone, std::memory_order_acq_rel)) {
    counters_.responses.Add();
    FutexWake(slot.word, 1);
  } else {
    counters_.stale_responses.Add();
    slot.stale.fetch_sub(1, std::memory_order_relaxed);
  }
}

void IoForwarder::FailAll(const absl::Status& why) {
  if (lost_.load(std::memory_order_relaxed)) return;
  lost_reason_ = fmt::format("the master is lost ({})", std::string(why.message()));
  lost_.store(true, std::memory_order_release);
  for (uint32_t i = 0; i < num_vcpus_; ++i) {
    uint32_t w = slots_[i].word.load(std::memory_order_acquire);
    if ((w & kStateMask) == kWaiting &&
        slots_[i].word.compare_exchange_strong(w, (w & ~kStateMask) | kFailed, std::memory_order_acq_rel)) {
      FutexWake(slots_[i].word, 1);
    }
  }
}

}  // namespace aggvm::agent
