// The rdma implementation of Transport: one libibverbs reliable-connected (RC) queue pair per peer.
//
// Objects, created in this order and destroyed in the reverse order (Close):
//   device context -> protection domain -> [completion channel, event mode] -> frame buffers + one memory region
//   (registered once in Connect) -> receive CQ (shared by every peer) -> per peer: send CQ -> QP.
// Per frame: Send encodes into the peer's registered send slot and posts one inline SEND (the 64-byte frame fits
// the QP's max_inline_data; otherwise the slot is sent by reference), signalling only every kSignalEvery-th send
// (selective signalling); a full send queue returns a RESOURCE_EXHAUSTED status prebuilt per peer. Poll drains the
// receive CQ, decodes each 64-byte receive once with DecodeFrameRaw (in place, no allocation even for a bad frame,
// whose reason is kept per peer: last_bad_frame), checks the per-peer sequence number (a gap or reorder is counted in
// sequence_errors, the frame still delivered) and reposts the slot right away. No allocation, lock or log call on
// these paths.
//
// A failed work completion (e.g. IBV_WC_RETRY_EXC_ERR: the peer stopped acknowledging, IBA 9.7.6.1.3) moves the QP
// to the error state, which flushes its receives: the peer is reported lost (UNAVAILABLE naming it) by Poll/Wait
// once and by every later Send to it.
//
// Threads: one thread polls; sends to one peer must be serialised by the caller, sends to different peers may run
// in parallel (each peer has its own send queue and send CQ, reaped only by its sender).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "transport/rdma/bootstrap.h"
#include "transport/rdma/verbs.h"
#include "transport/transport.h"
#include "transport/waker.h"

namespace aggvm::transport::rdma {

struct RdmaOptions {
  NodeId self{};
  DeviceSelection device;                    // --rdma-device, --rdma-port, --rdma-gid-index
  WaitMode wait_mode = WaitMode::kBusyPoll;  // kEvent: Wait sleeps on the receive CQ's completion channel
  RcTiming timing;                           // ACK timeout and retries: how fast a dead peer is noticed
};

class RdmaTransport final : public Transport {
 public:
  static constexpr uint32_t kRecvDepth = 256;   // receive ring per peer (frames in flight towards us)
  static constexpr uint32_t kSendDepth = 128;   // send queue per peer
  static constexpr uint32_t kSignalEvery = 16;  // one signalled SEND per this many
  static constexpr uint32_t kPollBatch = 32;    // completions taken per ibv_poll_cq
  static_assert(kSendDepth % kSignalEvery == 0,
                "a signalled send must close every window, or unsignalled WRs could fill the send queue");
  static_assert(kSendDepth >= 2 * kSignalEvery, "keep sending while one signalled window is still in flight");
  static_assert(kPollBatch <= kRecvDepth);

  /// Opens the device and allocates the protection domain (and completion channel). With no RDMA device this fails
  /// with UNAVAILABLE: "no RDMA device found (ibv_get_device_list: ENOSYS); set `transport: TRANSPORT_KIND_TCP` in
  /// the VM spec, or load rdma_rxe (rdma link add rxe0 type rxe netdev <netdev>)".
  static absl::StatusOr<std::unique_ptr<RdmaTransport>> Create(const RdmaOptions& options,
                                                               std::unique_ptr<RdmaBootstrap> bootstrap);
  ~RdmaTransport() override;
  RdmaTransport(const RdmaTransport&) = delete;
  RdmaTransport& operator=(const RdmaTransport&) = delete;

  NodeId self() const override { return options_.self; }
  absl::Status Connect(std::span<const PeerEndpoint> peers, absl::Duration timeout) override;
  absl::Status Send(NodeId to, Frame& frame) override;
  absl::StatusOr<size_t> Poll(std::span<ReceivedFrame> out) override;
  absl::StatusOr<size_t> Wait(std::span<ReceivedFrame> out, absl::Duration timeout) override;
  void Wake() override { waker_.Wake(); }
  void Close() override;
  TransportStats stats() const override;
  FrameError last_bad_frame(NodeId peer) const override;
  std::string_view name() const override { return "rdma"; }

  /// The opened device and port (GID index chosen, max_inline_data once connected).
  const PortInfo& port_info() const { return device_.port; }
  /// True when frames are sent inline (the QP accepted max_inline_data >= kFrameSize).
  bool inline_sends() const { return inline_sends_; }

 private:
  struct Peer;
  RdmaTransport(const RdmaOptions& options, std::unique_ptr<RdmaBootstrap> bootstrap, OpenedDevice device);
  absl::Status SetUpQueuePair(Peer& peer, size_t index);
  absl::Status ReapSends(Peer& peer);
  void MarkLost(Peer& peer, const ibv_wc& wc);
  Peer* FindPeer(NodeId node);

  RdmaOptions options_;
  std::unique_ptr<RdmaBootstrap> bootstrap_;
  // Verbs objects in creation order; Close() releases them in reverse.
  OpenedDevice device_;
  ProtectionDomain pd_;
  CompletionChannel channel_;
  struct FreeDeleter {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, FreeDeleter> buffer_;  // per peer: kRecvDepth receive slots, then kSendDepth send slots
  MemoryRegion mr_;
  CompletionQueue recv_cq_;
  std::vector<std::unique_ptr<Peer>> peers_;

  bool connected_ = false;
  bool closed_ = false;
  bool inline_sends_ = false;
  uint64_t retired_sent_ = 0;         // counters of peers released by Close
  uint64_t retired_send_errors_ = 0;
  // Written by the polling thread only (plain load + store, no locked instruction), read by stats().
  std::atomic<uint64_t> frames_received_{0};
  std::atomic<uint64_t> bad_frames_{0};
  std::atomic<uint64_t> sequence_errors_{0};
  std::atomic<uint64_t> peers_lost_{0};  // incremented by whichever thread sees the loss first
  uint64_t losses_reported_ = 0;         // poller only
  Waker waker_;                          // Wait's ppoll watches its eventfd next to the completion channel
};

}  // namespace aggvm::transport::rdma
