#include "transport/rdma/verbs.h"

#include <cerrno>
#include <algorithm>
#include <cstring>

#include "transport/rdma/cat.h"
#include "absl/strings/str_format.h"

namespace aggvm::transport::rdma {

const char* ErrnoName(int err) {
  switch (err) {
    case ENOSYS: return "ENOSYS";
    case ENODEV: return "ENODEV";
    case ENOENT: return "ENOENT";
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case ENOMEM: return "ENOMEM";
    case EINVAL: return "EINVAL";
    case EAGAIN: return "EAGAIN";
    case EBUSY: return "EBUSY";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case 0: return "no errno";
    default: return "errno";
  }
}

namespace {

std::string ErrnoText(int err) { return Cat(ErrnoName(err), " ", err, ": ", std::strerror(err)); }

bool GidIsZero(const ibv_gid& g) {
  for (uint8_t b : g.raw) {
    if (b != 0) return false;
  }
  return true;
}

bool GidIsIpv4Mapped(const ibv_gid& g) {
  for (int i = 0; i < 10; ++i) {
    if (g.raw[i] != 0) return false;
  }
  return g.raw[10] == 0xff && g.raw[11] == 0xff;
}

struct DeviceListDeleter {
  void operator()(ibv_device** l) const { ibv_free_device_list(l); }
};

// Picks the GID for RoCE: the requested index, or the first RoCE v2 IPv4-mapped entry (routable, what rxe's
// `ibv_rc_pingpong -g 1` uses), or the first non-zero entry.
absl::StatusOr<int> ChooseGid(ibv_context* ctx, uint8_t port, int table_len, int requested, ibv_gid& out) {
  if (requested >= 0) {
    if (requested >= table_len) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "GID index %d out of range: port %d of %s has %d GID entries; pass a smaller --rdma-gid-index", requested,
          port, ibv_get_device_name(ctx->device), table_len));
    }
    if (ibv_query_gid(ctx, port, requested, &out) != 0 || GidIsZero(out)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "GID index %d of %s port %d is empty (no address on the netdev?); list them with `ibv_devinfo -v` and pass "
          "another --rdma-gid-index",
          requested, ibv_get_device_name(ctx->device), port));
    }
    return requested;
  }
  int first_valid = -1;
  for (int i = 0; i < table_len; ++i) {
    ibv_gid_entry entry{};
    if (ibv_query_gid_ex(ctx, port, static_cast<uint32_t>(i), &entry, 0) != 0) continue;
    if (GidIsZero(entry.gid)) continue;
    if (first_valid < 0) first_valid = i;
    if (entry.gid_type == IBV_GID_TYPE_ROCE_V2 && GidIsIpv4Mapped(entry.gid)) {
      out = entry.gid;
      return i;
    }
  }
  if (first_valid < 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s port %d (RoCE) has no valid GID: give its netdev an IP address (ip addr add ... dev <netdev>)",
        ibv_get_device_name(ctx->device), port));
  }
  if (ibv_query_gid(ctx, port, first_valid, &out) != 0) {
    return absl::InternalError(Cat("ibv_query_gid failed: ", ErrnoText(errno)));
  }
  return first_valid;
}

}  // namespace

CompletionQueue& CompletionQueue::operator=(CompletionQueue&& o) noexcept {
  if (this != &o) {
    reset();
    cq_ = o.cq_;
    unacked_events_ = o.unacked_events_;
    o.cq_ = nullptr;
    o.unacked_events_ = 0;
  }
  return *this;
}

void CompletionQueue::CountEvent() {
  if (++unacked_events_ >= kAckBatch) {
    ibv_ack_cq_events(cq_, unacked_events_);
    unacked_events_ = 0;
  }
}

void CompletionQueue::reset() {
  if (cq_ == nullptr) return;
  if (unacked_events_ != 0) ibv_ack_cq_events(cq_, unacked_events_);
  ibv_destroy_cq(cq_);
  cq_ = nullptr;
  unacked_events_ = 0;
}

namespace {
// What to do without an RDMA device. The switch is the VM spec's `transport` field (proto/aggvm.proto, TransportKind).
constexpr char kNoDeviceFix[] =
    "set `transport: TRANSPORT_KIND_TCP` in the VM spec, or load rdma_rxe (rdma link add rxe0 type rxe netdev "
    "<netdev>)";
}  // namespace

absl::StatusOr<OpenedDevice> OpenDevice(const DeviceSelection& sel) {
  int num = 0;
  errno = 0;
  std::unique_ptr<ibv_device*, DeviceListDeleter> list(ibv_get_device_list(&num));
  if (!list) {
    const int err = errno;
    return absl::UnavailableError(Cat("no RDMA device found (ibv_get_device_list: ", ErrnoName(err), "); ",
                                      kNoDeviceFix));
  }
  if (num == 0) {
    return absl::UnavailableError(
        Cat("no RDMA device found (ibv_get_device_list returned an empty list); ", kNoDeviceFix));
  }
  ibv_device* dev = nullptr;
  std::string names;
  for (int i = 0; i < num; ++i) {
    const char* name = ibv_get_device_name(list.get()[i]);
    absl::StrAppend(&names, i ? ", " : "", name);
    if (dev == nullptr && (sel.device.empty() || sel.device == name)) dev = list.get()[i];
  }
  if (dev == nullptr) {
    return absl::NotFoundError(Cat("RDMA device '", sel.device, "' not found; devices present: ", names,
                                            " (choose one with --rdma-device)"));
  }
  OpenedDevice out;
  out.port.device_name = ibv_get_device_name(dev);
  out.context.reset(ibv_open_device(dev));
  if (!out.context) {
    return absl::UnavailableError(Cat("ibv_open_device(", out.port.device_name, ") failed: ",
                                               ErrnoText(errno), " (is /dev/infiniband readable?)"));
  }
  ibv_port_attr pattr{};
  if (ibv_query_port(out.context.get(), sel.port, &pattr) != 0) {
    return absl::InvalidArgumentError(absl::StrFormat("ibv_query_port(%s, port %d) failed: %s; choose --rdma-port",
                                                      out.port.device_name, sel.port, ErrnoText(errno)));
  }
  if (pattr.state != IBV_PORT_ACTIVE) {
    return absl::UnavailableError(absl::StrFormat(
        "%s port %d is not active (state %s); bring its link up", out.port.device_name, sel.port,
        ibv_port_state_str(pattr.state)));
  }
  out.port.port = sel.port;
  out.port.lid = pattr.lid;
  out.port.active_mtu = pattr.active_mtu;
  out.port.ethernet = pattr.link_layer == IBV_LINK_LAYER_ETHERNET;
  if (out.port.ethernet || sel.gid_index >= 0) {
    ibv_gid gid{};
    auto idx = ChooseGid(out.context.get(), sel.port, pattr.gid_tbl_len, sel.gid_index, gid);
    if (!idx.ok()) return idx.status();
    out.port.gid_index = *idx;
    std::memcpy(out.port.gid.data(), gid.raw, 16);
  }
  return out;
}

absl::Status QpToInit(ibv_qp* qp, uint8_t port) {
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_INIT;
  attr.pkey_index = 0;
  attr.port_num = port;
  attr.qp_access_flags = 0;
  const int mask = IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
  if (int rc = ibv_modify_qp(qp, &attr, mask); rc != 0) {
    return absl::InternalError(Cat("ibv_modify_qp(QPN ", qp->qp_num, ", RESET->INIT) failed: ",
                                            ErrnoText(rc)));
  }
  return absl::OkStatus();
}

absl::Status QpToRtr(ibv_qp* qp, const PortInfo& local, const RemoteQp& remote, const RcTiming& timing) {
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_RTR;
  attr.path_mtu = std::min(local.active_mtu, remote.mtu);
  attr.dest_qp_num = remote.qpn;
  attr.rq_psn = remote.psn;
  attr.max_dest_rd_atomic = 1;
  attr.min_rnr_timer = timing.min_rnr_timer;
  attr.ah_attr.dlid = remote.lid;
  attr.ah_attr.sl = 0;
  attr.ah_attr.src_path_bits = 0;
  attr.ah_attr.port_num = local.port;
  if (local.gid_index >= 0) {
    attr.ah_attr.is_global = 1;
    std::memcpy(attr.ah_attr.grh.dgid.raw, remote.gid.data(), 16);
    attr.ah_attr.grh.sgid_index = static_cast<uint8_t>(local.gid_index);
    attr.ah_attr.grh.hop_limit = 1;
  }
  const int mask = IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                   IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
  if (int rc = ibv_modify_qp(qp, &attr, mask); rc != 0) {
    return absl::InternalError(absl::StrFormat(
        "ibv_modify_qp(QPN %u, INIT->RTR, remote QPN %u) failed: %s (wrong GID index or unreachable peer?)",
        qp->qp_num, remote.qpn, ErrnoText(rc)));
  }
  return absl::OkStatus();
}

absl::Status QpToRts(ibv_qp* qp, uint32_t send_psn, const RcTiming& timing) {
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_RTS;
  attr.timeout = timing.timeout;
  attr.retry_cnt = timing.retry_cnt;
  attr.rnr_retry = timing.rnr_retry;
  attr.sq_psn = send_psn;
  attr.max_rd_atomic = 1;
  const int mask = IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                   IBV_QP_MAX_QP_RD_ATOMIC;
  if (int rc = ibv_modify_qp(qp, &attr, mask); rc != 0) {
    return absl::InternalError(Cat("ibv_modify_qp(QPN ", qp->qp_num, ", RTR->RTS) failed: ",
                                            ErrnoText(rc)));
  }
  return absl::OkStatus();
}

}  // namespace aggvm::transport::rdma
