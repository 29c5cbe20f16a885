// RdmaBootstrap over plain TCP: every node listens on one address; for each pair the node with the lower id connects
// to the higher one's PeerEndpoint::address and both send their RdmaConnInfo, then one "ready" byte each.
//
// Peers are expected to be handled in ascending node-id order by every node (RdmaTransport does), which makes the
// pairwise exchanges deadlock-free; connections that arrive for a later peer are kept until that peer's turn.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "transport/rdma/bootstrap.h"

namespace aggvm::transport::rdma {

class TcpBootstrap final : public RdmaBootstrap {
 public:
  /// Listens on `listen_address` ("host:port", IPv4 or a name; port 0 picks a free port, see address()).
  static absl::StatusOr<std::unique_ptr<TcpBootstrap>> Listen(NodeId self, std::string_view listen_address);
  ~TcpBootstrap() override;
  TcpBootstrap(const TcpBootstrap&) = delete;
  TcpBootstrap& operator=(const TcpBootstrap&) = delete;

  /// The bound address, "ip:port" — what the peers put in PeerEndpoint::address for this node.
  const std::string& address() const { return address_; }

  absl::StatusOr<RdmaConnInfo> Exchange(const PeerEndpoint& peer, const RdmaConnInfo& local,
                                        absl::Time deadline) override;
  absl::Status Ready(const PeerEndpoint& peer, absl::Time deadline) override;
  void Close() override;

 private:
  struct Pending {  // an accepted connection whose first message was read already
    int fd = -1;
    RdmaConnInfo info;
  };
  TcpBootstrap(NodeId self, int listen_fd, std::string address)
      : self_(self), listen_fd_(listen_fd), address_(std::move(address)) {}
  absl::StatusOr<int> ConnectTo(const PeerEndpoint& peer, absl::Time deadline);
  absl::StatusOr<Pending> AcceptFrom(const PeerEndpoint& peer, absl::Time deadline);

  NodeId self_;
  int listen_fd_ = -1;
  std::string address_;
  std::map<uint16_t, Pending> early_;  // accepted, for a peer whose turn has not come yet
  std::map<uint16_t, int> conns_;      // exchanged, waiting for Ready
};

}  // namespace aggvm::transport::rdma
