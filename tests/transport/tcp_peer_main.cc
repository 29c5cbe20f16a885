// A tcp transport node as its own process, for tests that kill a peer mid-stream. It connects to its peers, then
// streams numbered IPI frames to one of them until killed (or until --count frames), printing nothing on success.
//
//   aggvm_tcp_peer --node 2 --listen 10.77.0.2:7000 --peer 1=10.77.0.1:7000 [--peer ...] --send-to 1 [--count N]
//                  [--mode busy|epoll]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "transport/tcp_transport.h"

using namespace aggvm;
using namespace aggvm::transport;

int main(int argc, char** argv) {
  uint16_t node = 0, send_to = 0;
  uint64_t count = 0;  // 0: until killed
  TcpTransportOptions options;
  std::vector<PeerEndpoint> peers;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--node") {
      node = static_cast<uint16_t>(std::stoul(value));
    } else if (flag == "--listen") {
      options.listen_address = value;
    } else if (flag == "--peer") {
      const size_t eq = value.find('=');
      if (eq == std::string::npos) {
        std::fprintf(stderr, "--peer wants ID=HOST:PORT, got %s\n", value.c_str());
        return 2;
      }
      peers.push_back({NodeId(static_cast<uint16_t>(std::stoul(value.substr(0, eq)))), value.substr(eq + 1)});
    } else if (flag == "--send-to") {
      send_to = static_cast<uint16_t>(std::stoul(value));
    } else if (flag == "--count") {
      count = std::stoull(value);
    } else if (flag == "--mode") {
      options.wait_mode = value == "busy" ? WaitMode::kBusyPoll : WaitMode::kEvent;
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  auto t = TcpTransport::Create(NodeId(node), options);
  if (!t.ok()) {
    std::fprintf(stderr, "node %u: %s\n", node, std::string(t.status().message()).c_str());
    return 1;
  }
  if (auto s = (*t)->Connect(peers, absl::Seconds(20)); !s.ok()) {
    std::fprintf(stderr, "node %u: %s\n", node, std::string(s.message()).c_str());
    return 1;
  }
  for (uint64_t i = 0; count == 0 || i < count; ++i) {
    Frame f;
    f.type = FrameType::kIpi;
    IpiPayload p;
    p.source_vcpu = VcpuIndex(static_cast<uint32_t>(i));
    p.vector = Vector(0x40);
    f.payload = p;
    absl::Status s;
    while ((s = (*t)->Send(NodeId(send_to), f)).code() == absl::StatusCode::kResourceExhausted) {
      std::this_thread::yield();
    }
    if (!s.ok()) {
      std::fprintf(stderr, "node %u: %s\n", node, std::string(s.message()).c_str());
      return 1;
    }
  }
  return 0;
}
