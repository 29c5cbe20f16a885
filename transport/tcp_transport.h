// The tcp implementation of Transport: one TCP connection per peer (a full mesh), 64-byte frames over the stream.
//
// Connection set-up (Connect): every node listens on `listen_address` from Create on. For each pair the node with
// the LOWER id dials the higher one, so exactly one connection exists per pair whatever the start order. Both ends
// then exchange a kControl/kHello frame (sequence 1 of each direction) that names the sender and the node it meant
// to reach. The accepting side reads every accepted connection's hello concurrently (one poll set, per-connection
// state), each bounded by `connect_timeout`: a client that connects and stays silent is closed when its own time is
// up and delays no other peer. A hello that is invalid or from an unexpected node is counted in bad_frames and that
// connection closed; set-up carries on. Once every peer is connected the listening socket is closed (later connects
// are refused). Sockets are TCP_NODELAY and non-blocking from then on.
//
// Per frame: Send encodes into a stack buffer and issues one send(2) (MSG_NOSIGNAL). A partial write (socket buffer
// full mid-frame) is finished in place — a frame is never split across Send calls — bounded by
// `send_stall_timeout`; EAGAIN before any byte is RESOURCE_EXHAUSTED (nothing consumed, retry later). Poll issues
// one recv(2) per peer into a fixed per-peer buffer and decodes complete frames in place with DecodeFrameRaw (no
// allocation for a bad frame either; the loss message is built once, when the connection ends); Wait in kEvent mode
// sleeps in epoll_wait and reads only the ready peers. Sequence numbers are checked per peer: a gap or reorder is
// counted in `sequence_errors` (the frame is still delivered; TCP itself cannot reorder, so this means a broken
// peer). A frame that fails DecodeFrameRaw, or claims another source node, is counted in bad_frames, its reason kept
// (last_bad_frame), and that connection is shut down: the stream can no longer be trusted. A lost peer (EOF, reset, bad bytes) is reported once by
// Poll/Wait as UNAVAILABLE naming the node and its address; Send to it returns UNAVAILABLE.
//
// Namespaces: Create and Connect open sockets, so call them on a thread that is in the network namespace the node
// lives in; the sockets keep that namespace, and Send/Poll/Wait may then run on any thread.
//
// Threads: one thread polls; Send may run on other threads (serialised per peer by the caller). A lost connection is
// shut down, not closed, until Close(), so a concurrent Send never writes to a reused descriptor. Counters are
// relaxed atomics.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "transport/transport.h"
#include "transport/waker.h"

namespace aggvm::transport {

struct TcpTransportOptions {
  /// "host:port" to listen on; port 0 picks a free port (see TcpTransport::listen_port). "[v6addr]:port" works.
  std::string listen_address = "0.0.0.0:0";
  WaitMode wait_mode = WaitMode::kEvent;
  /// Bound on one dial attempt to a peer (TCP handshake), and on how long an accepted connection may take to send
  /// its hello. Connect's own timeout bounds the whole mesh set-up; refused dials are retried until then (the peer
  /// may not have started yet).
  absl::Duration connect_timeout = absl::Seconds(2);
  /// How long Send may wait to finish a frame that the socket took only part of before declaring the peer lost.
  absl::Duration send_stall_timeout = absl::Seconds(2);
};

class TcpTransport final : public Transport {
 public:
  /// Opens the listening socket (so peers may dial from now on). INVALID_ARGUMENT for a bad address,
  /// UNAVAILABLE if it cannot be bound (the message names the address and errno).
  static absl::StatusOr<std::unique_ptr<TcpTransport>> Create(NodeId self, TcpTransportOptions options);
  ~TcpTransport() override;
  TcpTransport(const TcpTransport&) = delete;
  TcpTransport& operator=(const TcpTransport&) = delete;

  /// The bound port (useful with port 0). The socket itself is closed once Connect has every peer.
  uint16_t listen_port() const { return listen_port_; }

  NodeId self() const override { return self_; }
  absl::Status Connect(std::span<const PeerEndpoint> peers, absl::Duration timeout) override;
  absl::Status Send(NodeId to, Frame& frame) override;
  absl::StatusOr<size_t> Poll(std::span<ReceivedFrame> out) override;
  absl::StatusOr<size_t> Wait(std::span<ReceivedFrame> out, absl::Duration timeout) override;
  void Wake() override { waker_.Wake(); }
  void Close() override;
  TransportStats stats() const override;
  FrameError last_bad_frame(NodeId peer) const override;
  std::string_view name() const override { return "tcp"; }

 private:
  struct Peer;
  TcpTransport(NodeId self, TcpTransportOptions options, int listen_fd, uint16_t port);

  absl::Status DialPeer(Peer& p, absl::Time deadline);
  absl::Status AcceptPeers(std::vector<Peer*>& waiting, absl::Time deadline);
  // Reads what the socket has (one recv), decodes complete frames into out[n..]; returns the new n.
  size_t ReadPeer(Peer& p, std::span<ReceivedFrame> out, size_t n);
  size_t DrainBuffered(Peer& p, std::span<ReceivedFrame> out, size_t n);
  void MarkLost(Peer& p, std::string reason);
  absl::StatusOr<size_t> Finish(size_t n);

  const NodeId self_;
  const TcpTransportOptions options_;
  int listen_fd_ = -1;
  const uint16_t listen_port_;
  int epoll_fd_ = -1;
  Waker waker_;  // in the epoll set as kWakeToken
  std::vector<std::unique_ptr<Peer>> peers_;
  std::vector<int32_t> index_of_node_;  // NodeId value -> index in peers_, -1 if not a peer (65536 entries)
  size_t next_poll_start_ = 0;          // round-robin start so one busy peer cannot starve the others
  bool closed_ = false;

  std::atomic<uint64_t> bad_frames_{0};
  std::atomic<uint64_t> sequence_errors_{0};
  std::atomic<uint64_t> peers_lost_{0};
};

}  // namespace aggvm::transport
