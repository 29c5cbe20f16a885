// Thin RAII wrappers over the libibverbs objects the rdma transport creates, one class per verbs object, in the
// order of creation: device context -> protection domain -> memory region / completion channel -> completion queue
// -> queue pair. Each owner frees its object in its destructor; a class that holds several frees them in the
// reverse order of creation (member order). The wrappers return errors as values and log nothing.
//
// The QP state machine (RESET -> INIT -> RTR -> RTS) is spelled out with the attribute masks the IB spec requires
// for an RC QP at each transition (IBA 1.4 vol. 1, 11.2.5.3 "Modify QP", table of required/optional attributes;
// rdma-core's libibverbs/man/ibv_modify_qp.3 lists the same masks).
#pragma once

#include <infiniband/verbs.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace aggvm::transport::rdma {

/// "ENOSYS"-style name of an errno value (for messages that tell the user what to look up).
const char* ErrnoName(int err);

struct ContextDeleter {
  void operator()(ibv_context* c) const { ibv_close_device(c); }
};
struct PdDeleter {
  void operator()(ibv_pd* p) const { ibv_dealloc_pd(p); }
};
struct MrDeleter {
  void operator()(ibv_mr* m) const { ibv_dereg_mr(m); }
};
struct CompChannelDeleter {
  void operator()(ibv_comp_channel* c) const { ibv_destroy_comp_channel(c); }
};
struct QpDeleter {
  void operator()(ibv_qp* q) const { ibv_destroy_qp(q); }
};

using Context = std::unique_ptr<ibv_context, ContextDeleter>;
using ProtectionDomain = std::unique_ptr<ibv_pd, PdDeleter>;
using MemoryRegion = std::unique_ptr<ibv_mr, MrDeleter>;
using CompletionChannel = std::unique_ptr<ibv_comp_channel, CompChannelDeleter>;
using QueuePair = std::unique_ptr<ibv_qp, QpDeleter>;

/// A completion queue. With a completion channel, events delivered by ibv_get_cq_event must be acknowledged before
/// the CQ is destroyed (ibv_ack_cq_events); this class counts them and acknowledges the rest on destruction.
class CompletionQueue {
 public:
  CompletionQueue() = default;
  explicit CompletionQueue(ibv_cq* cq) : cq_(cq) {}
  CompletionQueue(CompletionQueue&& o) noexcept : cq_(o.cq_), unacked_events_(o.unacked_events_) {
    o.cq_ = nullptr;
    o.unacked_events_ = 0;
  }
  CompletionQueue& operator=(CompletionQueue&& o) noexcept;
  CompletionQueue(const CompletionQueue&) = delete;
  CompletionQueue& operator=(const CompletionQueue&) = delete;
  ~CompletionQueue() { reset(); }

  ibv_cq* get() const { return cq_; }
  explicit operator bool() const { return cq_ != nullptr; }
  /// Counts one event returned by ibv_get_cq_event; acknowledges in batches (the ack takes a mutex).
  void CountEvent();
  void reset();

 private:
  static constexpr unsigned kAckBatch = 64;
  ibv_cq* cq_ = nullptr;
  unsigned unacked_events_ = 0;
};

/// Device and port selection.
struct DeviceSelection {
  std::string device;   // empty: the first device
  uint8_t port = 1;
  int gid_index = -1;   // < 0: automatic (RoCE: the first RoCE v2 IPv4-mapped GID, else the first valid one)
};

/// The local addressing facts of an opened port.
struct PortInfo {
  std::string device_name;
  uint8_t port = 1;
  uint16_t lid = 0;
  ibv_mtu active_mtu = IBV_MTU_1024;
  bool ethernet = false;          // RoCE: a GRH (GID) is mandatory
  int gid_index = -1;             // -1: no GRH (InfiniBand with LIDs)
  std::array<uint8_t, 16> gid{};
  uint32_t max_inline_data = 0;   // probed by creating a QP (filled by the transport)
};

struct OpenedDevice {
  Context context;
  PortInfo port;
};

/// Opens the selected device and queries the port and GID. With no RDMA device at all the error says how to proceed
/// ("no RDMA device found (ibv_get_device_list: ENOSYS); set `transport: TRANSPORT_KIND_TCP` in the VM spec, or
/// load rdma_rxe (rdma link add rxe0 type rxe netdev <netdev>)").
absl::StatusOr<OpenedDevice> OpenDevice(const DeviceSelection& sel);

/// The remote end of an RC connection.
struct RemoteQp {
  uint32_t qpn = 0;
  uint32_t psn = 0;
  uint16_t lid = 0;
  std::array<uint8_t, 16> gid{};
  ibv_mtu mtu = IBV_MTU_1024;
};

/// Timing of the RC transport's retries (IBA 9.7.6.1.1 and 9.7.5.2.8): local ACK timeout is 4.096 us * 2^timeout.
struct RcTiming {
  uint8_t timeout = 14;     // 4.096 us * 2^14 = 67 ms per try
  uint8_t retry_cnt = 7;    // transport retries before IBV_WC_RETRY_EXC_ERR
  uint8_t rnr_retry = 7;    // 7 = retry forever while the receiver has no receive posted
  uint8_t min_rnr_timer = 1;  // 0.01 ms
};

/// RESET -> INIT: pkey index, port, access flags (none: only two-sided sends are used).
absl::Status QpToInit(ibv_qp* qp, uint8_t port);
/// INIT -> RTR: path MTU, destination QPN, receive PSN, responder resources, RNR timer, address vector.
absl::Status QpToRtr(ibv_qp* qp, const PortInfo& local, const RemoteQp& remote, const RcTiming& timing);
/// RTR -> RTS: local ACK timeout, retry counts, send PSN, initiator depth.
absl::Status QpToRts(ibv_qp* qp, uint32_t send_psn, const RcTiming& timing);

}  // namespace aggvm::transport::rdma
