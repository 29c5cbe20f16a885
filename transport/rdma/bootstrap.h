// How two rdma transports learn each other's queue pair before the first frame: the bootstrap.
//
// An RC queue pair can only reach RTR once it knows the remote QPN, PSN, address (LID, or GID for RoCE) and MTU.
// Those travel out of band. The transport hands its side to RdmaBootstrap::Exchange and gets the peer's back; once
// its QP is in RTS with the receive ring posted it calls Ready, which returns when the peer has done the same — so
// no frame is ever sent to a QP that is not yet in RTR (it would be dropped and retried only after the ACK timeout).
//
// The control plane implements this interface over gRPC later; TcpBootstrap (tcp_bootstrap.h) is the plain TCP
// implementation used until then and by the tests.
#pragma once

#include <array>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "transport/transport.h"

namespace aggvm::transport::rdma {

/// One side's connection data for one RC connection.
struct RdmaConnInfo {
  NodeId node{};                // who sends this (checked against the expected peer)
  uint32_t qpn = 0;             // 24 bits
  uint32_t psn = 0;             // 24 bits: the first PSN this side sends
  uint16_t lid = 0;             // InfiniBand
  std::array<uint8_t, 16> gid{};  // RoCE (all zero when no GRH is used)
  uint8_t mtu = 0;              // enum ibv_mtu (1..5) of the active port MTU
  uint8_t uses_grh = 0;         // 1 when the sender addresses by GID (RoCE)

  /// Fixed little-endian layout, 40 bytes:
  ///   0 magic "AGRB" | 4 version (1) | 5 flags (bit 0 uses_grh) | 6 mtu | 7 zero | 8 node u16 | 10 lid u16 |
  ///  12 qpn u32 | 16 psn u32 | 20 gid[16] | 36 zero u32
  static constexpr size_t kWireSize = 40;
  std::array<uint8_t, kWireSize> Encode() const;
  /// Validates magic, version, 24-bit QPN/PSN and the MTU enum; a clear error otherwise.
  static absl::StatusOr<RdmaConnInfo> Decode(const uint8_t* data, size_t size);
};

class RdmaBootstrap {
 public:
  virtual ~RdmaBootstrap() = default;
  /// Sends `local` to `peer` and returns the peer's connection data. Blocks until `deadline`.
  virtual absl::StatusOr<RdmaConnInfo> Exchange(const PeerEndpoint& peer, const RdmaConnInfo& local,
                                                absl::Time deadline) = 0;
  /// Tells `peer` this side is ready (QP in RTS, receives posted) and waits until the peer says the same.
  virtual absl::Status Ready(const PeerEndpoint& peer, absl::Time deadline) = 0;
  /// Releases the out-of-band connections (after every peer is Ready, or on failure). Idempotent.
  virtual void Close() = 0;
};

}  // namespace aggvm::transport::rdma
