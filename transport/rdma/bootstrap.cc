#include "transport/rdma/bootstrap.h"

#include <cstring>

#include "absl/strings/str_format.h"

namespace aggvm::transport::rdma {
namespace {

constexpr uint8_t kMagic[4] = {'A', 'G', 'R', 'B'};
constexpr uint8_t kVersion = 1;
constexpr uint8_t kFlagUsesGrh = 1;

void Put16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
void Put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint16_t Get16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t Get32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
         (static_cast<uint32_t>(p[3]) << 24);
}

}  // namespace

std::array<uint8_t, RdmaConnInfo::kWireSize> RdmaConnInfo::Encode() const {
  std::array<uint8_t, kWireSize> w{};
  std::memcpy(w.data(), kMagic, 4);
  w[4] = kVersion;
  w[5] = uses_grh ? kFlagUsesGrh : 0;
  w[6] = mtu;
  Put16(&w[8], node.value());
  Put16(&w[10], lid);
  Put32(&w[12], qpn);
  Put32(&w[16], psn);
  std::memcpy(&w[20], gid.data(), 16);
  return w;
}

absl::StatusOr<RdmaConnInfo> RdmaConnInfo::Decode(const uint8_t* data, size_t size) {
  if (size != kWireSize) {
    return absl::InvalidArgumentError(
        absl::StrFormat("rdma bootstrap message has %u bytes, expected %u", size, kWireSize));
  }
  if (std::memcmp(data, kMagic, 4) != 0) {
    return absl::InvalidArgumentError(
        "rdma bootstrap message has a bad magic (not an aggvm rdma bootstrap peer at that address?)");
  }
  if (data[4] != kVersion) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "rdma bootstrap version %u, this build speaks %u: run the same aggvm version on every node", data[4],
        kVersion));
  }
  if ((data[5] & ~kFlagUsesGrh) != 0 || data[7] != 0 || Get32(&data[36]) != 0) {
    return absl::InvalidArgumentError("rdma bootstrap message has unknown flags or non-zero reserved bytes");
  }
  RdmaConnInfo c;
  c.uses_grh = data[5] & kFlagUsesGrh;
  c.mtu = data[6];
  c.node = NodeId(Get16(&data[8]));
  c.lid = Get16(&data[10]);
  c.qpn = Get32(&data[12]);
  c.psn = Get32(&data[16]);
  std::memcpy(c.gid.data(), &data[20], 16);
  if (c.mtu < 1 || c.mtu > 5) {
    return absl::InvalidArgumentError(absl::StrFormat("rdma bootstrap: MTU code %u is not an ibv_mtu (1..5)", c.mtu));
  }
  if (c.qpn == 0 || c.qpn > 0xffffff || c.psn > 0xffffff) {
    return absl::InvalidArgumentError(
        absl::StrFormat("rdma bootstrap: QPN %#x / PSN %#x out of the 24-bit range", c.qpn, c.psn));
  }
  return c;
}

}  // namespace aggvm::transport::rdma
