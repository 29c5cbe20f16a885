// Host tests of RdmaTransport that need no RDMA device. The verbs data path is tested inside the rdma_rxe VM
// (tests/rdma/).
#include "transport/rdma/rdma_transport.h"

#include <infiniband/verbs.h>

#include <cerrno>

#include <gtest/gtest.h>

#include "transport/rdma/tcp_bootstrap.h"

namespace aggvm::transport::rdma {
namespace {

// What ibv_get_device_list reports on this machine: -1 with its errno when it returns NULL, else the device count.
int DeviceCount(int* err) {
  int num = 0;
  errno = 0;
  ibv_device** list = ibv_get_device_list(&num);
  *err = errno;
  if (list == nullptr) return -1;
  ibv_free_device_list(list);
  return num;
}

// The fix names the real switch: the VM spec's `transport` field (proto/aggvm.proto), not a command-line flag.
constexpr char kFix[] =
    "set `transport: TRANSPORT_KIND_TCP` in the VM spec, or load rdma_rxe (rdma link add rxe0 type rxe netdev "
    "<netdev>)";

TEST(RdmaTransport, WithoutDeviceCreateNamesTheFix) {
  int err = 0;
  const int count = DeviceCount(&err);
  if (count > 0) GTEST_SKIP() << "this host has " << count << " RDMA device(s); the no-device path is not reachable";
  auto boot = TcpBootstrap::Listen(NodeId(1), "127.0.0.1:0");
  ASSERT_TRUE(boot.ok()) << boot.status();
  RdmaOptions opt;
  opt.self = NodeId(1);
  auto t = RdmaTransport::Create(opt, std::move(*boot));
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kUnavailable);
  if (count < 0) {
    EXPECT_EQ(t.status().message(), std::string("no RDMA device found (ibv_get_device_list: ") +
                                        ErrnoName(err) + "); " + kFix);
    if (err == ENOSYS) {  // this project's build machines (FACTS.md): no kernel InfiniBand at all
      EXPECT_EQ(t.status().message(),
                "no RDMA device found (ibv_get_device_list: ENOSYS); set `transport: TRANSPORT_KIND_TCP` in the VM "
                "spec, or load rdma_rxe (rdma link add rxe0 type rxe netdev <netdev>)");
    }
  } else {
    EXPECT_NE(t.status().message().find("empty list"), std::string_view::npos) << t.status();
  }
}

TEST(RdmaTransport, CreateRejectsNullBootstrap) {
  RdmaOptions opt;
  auto t = RdmaTransport::Create(opt, nullptr);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RdmaTransport, UnknownDeviceOrNoDeviceIsAClearError) {
  int err = 0;
  const int count = DeviceCount(&err);
  RdmaOptions opt;
  opt.device.device = "no_such_hca9";
  auto boot = TcpBootstrap::Listen(NodeId(1), "127.0.0.1:0");
  ASSERT_TRUE(boot.ok()) << boot.status();
  auto t = RdmaTransport::Create(opt, std::move(*boot));
  ASSERT_FALSE(t.ok());
  if (count > 0) {
    EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
    EXPECT_NE(t.status().message().find("'no_such_hca9' not found"), std::string_view::npos) << t.status();
  } else {
    EXPECT_NE(t.status().message().find(kFix), std::string_view::npos) << t.status();
  }
}

}  // namespace
}  // namespace aggvm::transport::rdma
