// Test helper: real TcpTransports on 127.0.0.1 (port 0) in one process, connected as a star around the master
// (node ids[0]) — what the data plane of one VM uses — plus small frame helpers.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/status/statusor.h"
#include "transport/tcp_transport.h"

namespace aggvm::testing {

struct TcpStar {
  std::vector<NodeId> ids;
  std::vector<std::unique_ptr<transport::TcpTransport>> t;  // t[i] is node ids[i]; t[0] the master

  transport::TcpTransport& master() { return *t[0]; }
  transport::TcpTransport& node(size_t i) { return *t[i]; }

  /// Every node connects to the master only (a node missing from a controller's config still gets a connection:
  /// that is how tests send frames from nodes outside the VM).
  static absl::StatusOr<TcpStar> Make(std::vector<NodeId> ids,
                                      transport::WaitMode mode = transport::WaitMode::kEvent) {
    TcpStar s;
    s.ids = ids;
    for (NodeId id : ids) {
      transport::TcpTransportOptions o;
      o.listen_address = "127.0.0.1:0";
      o.wait_mode = mode;
      auto t = transport::TcpTransport::Create(id, o);
      if (!t.ok()) return t.status();
      s.t.push_back(*std::move(t));
    }
    auto endpoint = [&](size_t i) {
      return transport::PeerEndpoint{ids[i], "127.0.0.1:" + std::to_string(s.t[i]->listen_port())};
    };
    std::vector<absl::Status> results(ids.size());
    std::vector<std::thread> threads;
    std::vector<transport::PeerEndpoint> master_peers;
    for (size_t i = 1; i < ids.size(); ++i) master_peers.push_back(endpoint(i));
    threads.emplace_back([&] { results[0] = s.t[0]->Connect(master_peers, absl::Seconds(10)); });
    for (size_t i = 1; i < ids.size(); ++i) {
      threads.emplace_back([&, i] {
        const transport::PeerEndpoint m = endpoint(0);
        results[i] = s.t[i]->Connect({&m, 1}, absl::Seconds(10));
      });
    }
    for (auto& th : threads) th.join();
    for (auto& r : results) {
      if (!r.ok()) return r;
    }
    return s;
  }
};

/// The next frame `t` receives within `timeout` (skipping control pings), or nullopt.
inline std::optional<transport::ReceivedFrame> NextFrame(transport::Transport& t,
                                                         absl::Duration timeout = absl::Seconds(5)) {
  const absl::Time end = absl::Now() + timeout;
  transport::ReceivedFrame f[1];
  while (absl::Now() < end) {
    auto n = t.Wait(f, absl::Milliseconds(10));
    if (!n.ok()) {
      ADD_FAILURE() << "NextFrame: " << n.status();
      return std::nullopt;
    }
    if (*n == 0) continue;
    if (const auto* c = std::get_if<transport::ControlPayload>(&f[0].frame.payload);
        c != nullptr && c->op == transport::ControlPayload::Op::kPing) {
      continue;
    }
    return f[0];
  }
  return std::nullopt;
}

inline transport::Frame GsiFrame(uint32_t gsi, bool level) {
  transport::Frame f;
  f.type = transport::FrameType::kInterrupt;
  transport::InterruptPayload p;
  p.kind = transport::InterruptPayload::Kind::kGsiLevel;
  p.gsi = Gsi(gsi);
  p.level = level ? 1 : 0;
  f.payload = p;
  return f;
}

/// One rising edge in one frame (level InterruptPayload::kLevelEdge), as a node's RaiseEdge sends it.
inline transport::Frame GsiEdgeFrame(uint32_t gsi) {
  transport::Frame f = GsiFrame(gsi, true);
  std::get<transport::InterruptPayload>(f.payload).level = transport::InterruptPayload::kLevelEdge;
  return f;
}

inline transport::Frame EoiFrame(uint32_t vcpu, uint8_t vector, uint32_t gsi) {
  transport::Frame f;
  f.type = transport::FrameType::kEoi;
  f.payload = transport::EoiPayload{.vcpu = VcpuIndex(vcpu), .vector = Vector(vector), .gsi = Gsi(gsi)};
  return f;
}

inline transport::Frame IoFrame(uint32_t vcpu, uint64_t port, bool write, uint8_t size, uint64_t data = 0,
                                transport::IoRequestPayload::Space space = transport::IoRequestPayload::Space::kPio) {
  transport::Frame f;
  f.type = transport::FrameType::kIoRequest;
  transport::IoRequestPayload p;
  p.space = space;
  p.is_write = write ? 1 : 0;
  p.size = size;
  p.vcpu = VcpuIndex(vcpu);
  p.address = port;
  p.data = write ? data : 0;
  f.payload = p;
  return f;
}

}  // namespace aggvm::testing
