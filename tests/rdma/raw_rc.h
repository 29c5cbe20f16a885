// A minimal raw RC endpoint: the verbs data path with nothing on top (no frame codec, no sequence, no validation).
//
// Two uses: the baseline of bench/rdma (what a bare verbs ping-pong costs on the same device in the same run), and a
// misbehaving peer in the rxe tests (it sends arbitrary bytes, which RdmaTransport must count and drop).
// Set-up reuses transport/rdma/verbs.h; the data path is its own: inline SEND, signalled every kSignalEvery-th,
// a pre-posted receive ring reposted one by one.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "transport/rdma/bootstrap.h"
#include "transport/rdma/verbs.h"

namespace aggvm::testing {

class RawRcEndpoint {
 public:
  static constexpr uint32_t kDepth = 256;        // send queue and receive ring
  static constexpr uint32_t kSlotSize = 256;     // receive slot: larger than a frame, so odd sizes arrive intact
  static constexpr uint32_t kSignalEvery = 16;
  static_assert(kDepth % kSignalEvery == 0);

  static absl::StatusOr<std::unique_ptr<RawRcEndpoint>> Create(const transport::rdma::DeviceSelection& sel);
  ~RawRcEndpoint();

  /// This side's connection data (as `node`).
  transport::rdma::RdmaConnInfo LocalInfo(NodeId node) const;
  /// INIT -> RTR -> RTS towards `remote`.
  absl::Status Connect(const transport::rdma::RdmaConnInfo& remote);

  /// Posts one SEND of `len` bytes (inline when it fits). False when the send queue is full even after reaping, or
  /// when a send completion failed (see failed()).
  bool Send(const void* data, uint32_t len);
  /// Drains up to `max` receive completions, calling on_msg(data, len) for each, and reposts their slots.
  /// Returns how many arrived, or -1 after a failed completion.
  template <typename F>
  int PollRecv(int max, F&& on_msg);

  bool failed() const { return failed_; }
  uint32_t max_inline() const { return max_inline_; }

 private:
  RawRcEndpoint() = default;
  bool Reap();
  void Repost(uint64_t slot);

  // Creation order; the destructor releases in reverse.
  transport::rdma::OpenedDevice dev_;
  transport::rdma::ProtectionDomain pd_;
  std::unique_ptr<uint8_t[]> buf_;
  transport::rdma::MemoryRegion mr_;
  transport::rdma::CompletionQueue send_cq_, recv_cq_;
  transport::rdma::QueuePair qp_;
  uint32_t psn_ = 0;
  uint32_t max_inline_ = 0;
  uint64_t posted_ = 0, completed_ = 0;
  bool failed_ = false;
};

template <typename F>
int RawRcEndpoint::PollRecv(int max, F&& on_msg) {
  ibv_wc wc[32];
  const int n = ibv_poll_cq(recv_cq_.get(), max < 32 ? max : 32, wc);
  if (n < 0) return -1;
  for (int i = 0; i < n; ++i) {
    if (wc[i].status != IBV_WC_SUCCESS) {
      failed_ = true;
      return -1;
    }
    on_msg(buf_.get() + wc[i].wr_id * kSlotSize, wc[i].byte_len);
    Repost(wc[i].wr_id);
  }
  return n;
}

}  // namespace aggvm::testing
