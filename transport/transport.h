// The data-plane transport between nodes: small fixed frames, lowest latency.
//
// Contract shared by every implementation (tcp, rdma):
//  - Frames are delivered to a peer reliably and in order, or the peer is reported lost (UNAVAILABLE).
//  - Send, Poll and Wait do no allocation, take no lock shared with another sending thread and log nothing on the
//    per-frame path; errors are values and counters.
//  - Received bytes are decoded once (DecodeFrameRaw, which does not allocate) at the edge; a frame that fails
//    validation is counted in `bad_frames` and dropped (tcp also closes that connection: its stream can no longer be
//    trusted). The reason of the last refused frame is kept per peer (last_bad_frame) and rendered only on request.
//  - Sequence numbers are checked per peer: a gap or reorder is counted in `sequence_errors`, the frame is still
//    delivered (both transports are reliable and ordered, so this means a broken peer).
//  - One thread polls; sending from several threads to the same peer must be serialised by the caller.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/types.h"
#include "transport/frame.h"

namespace aggvm::transport {

/// How a receiver waits for frames.
enum class WaitMode : uint8_t {
  kBusyPoll,  // spin on the socket / completion queue: lowest latency, burns a core
  kEvent,     // sleep in epoll / on the completion channel
};

/// Where a peer is reachable. For tcp `address` is "host:port"; for rdma it is the bootstrap address.
struct PeerEndpoint {
  NodeId node{};
  std::string address;
};

struct ReceivedFrame {
  NodeId from{};
  Frame frame;
};

struct TransportStats {
  uint64_t frames_sent = 0;
  uint64_t frames_received = 0;
  uint64_t bad_frames = 0;        // failed DecodeFrameRaw (or wrong source node): counted and dropped
  uint64_t sequence_errors = 0;   // a frame whose sequence number is not the expected next one (gap or reorder)
  uint64_t send_errors = 0;
  uint64_t peers_lost = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;

  /// This node's id.
  virtual NodeId self() const = 0;
  /// Establishes a connection with every peer (blocking, bounded by `timeout`). Peers may connect in any order.
  virtual absl::Status Connect(std::span<const PeerEndpoint> peers, absl::Duration timeout) = 0;
  /// Sends one frame to `to`. Fills in source and sequence. UNAVAILABLE if the peer is gone, NOT_FOUND if unknown,
  /// RESOURCE_EXHAUSTED if the send queue is full (caller may retry), INVALID_ARGUMENT if the frame is invalid.
  virtual absl::Status Send(NodeId to, Frame& frame) = 0;
  /// Non-blocking: writes up to out.size() received frames, returns how many. UNAVAILABLE when a peer was lost
  /// (the message names it); frames received before the loss are still returned by earlier calls.
  virtual absl::StatusOr<size_t> Poll(std::span<ReceivedFrame> out) = 0;
  /// Like Poll but waits up to `timeout` for at least one frame (busy-polling or sleeping per the WaitMode). Returns
  /// early, with what arrived (possibly 0 frames), once Wake() was called or a peer was lost (also when another
  /// thread's Send found the loss). absl::InfiniteDuration(): no timeout at all (event mode arms no timer), so only
  /// a frame, a Wake or a loss ends the wait.
  virtual absl::StatusOr<size_t> Wait(std::span<ReceivedFrame> out, absl::Duration timeout) = 0;
  /// Any thread: makes the Wait in progress (or the next one) return at once, so that the polling thread can run
  /// work queued for it by another thread. Cheap enough per operator command; not for the per-frame path.
  virtual void Wake() = 0;
  /// Closes every connection and releases every resource, in the reverse order of creation. Idempotent.
  virtual void Close() = 0;
  virtual TransportStats stats() const = 0;
  /// Why the last frame refused from `peer` was refused (code + field + value; DescribeFrameError renders it), or an
  /// ok() FrameError if none was or `peer` is unknown. Call it on the polling thread.
  virtual FrameError last_bad_frame(NodeId peer) const = 0;
  virtual std::string_view name() const = 0;
};

}  // namespace aggvm::transport
