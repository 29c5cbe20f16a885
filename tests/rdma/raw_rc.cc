#include "tests/rdma/raw_rc.h"

#include <cerrno>
#include <cstring>
#include <random>

#include <fmt/format.h>

namespace aggvm::testing {

using namespace transport::rdma;

absl::StatusOr<std::unique_ptr<RawRcEndpoint>> RawRcEndpoint::Create(const DeviceSelection& sel) {
  std::unique_ptr<RawRcEndpoint> e(new RawRcEndpoint());
  auto dev = OpenDevice(sel);
  if (!dev.ok()) return dev.status();
  e->dev_ = std::move(*dev);
  e->pd_.reset(ibv_alloc_pd(e->dev_.context.get()));
  if (!e->pd_) return absl::InternalError(fmt::format("ibv_alloc_pd: {}", std::strerror(errno)));
  const size_t bytes = 2ull * kDepth * kSlotSize;  // receive slots, then send slots
  e->buf_ = std::make_unique<uint8_t[]>(bytes);
  e->mr_.reset((ibv_reg_mr)(e->pd_.get(), e->buf_.get(), bytes, IBV_ACCESS_LOCAL_WRITE));
  if (!e->mr_) return absl::InternalError(fmt::format("ibv_reg_mr: {}", std::strerror(errno)));
  e->send_cq_ = CompletionQueue(ibv_create_cq(e->dev_.context.get(), kDepth, nullptr, nullptr, 0));
  e->recv_cq_ = CompletionQueue(ibv_create_cq(e->dev_.context.get(), kDepth, nullptr, nullptr, 0));
  if (!e->send_cq_ || !e->recv_cq_) return absl::InternalError(fmt::format("ibv_create_cq: {}", std::strerror(errno)));
  ibv_qp_init_attr init{};
  init.send_cq = e->send_cq_.get();
  init.recv_cq = e->recv_cq_.get();
  init.qp_type = IBV_QPT_RC;
  init.cap = {kDepth, kDepth, 1, 1, 64};
  e->qp_.reset(ibv_create_qp(e->pd_.get(), &init));
  if (!e->qp_) return absl::InternalError(fmt::format("ibv_create_qp: {}", std::strerror(errno)));
  e->max_inline_ = init.cap.max_inline_data;
  if (auto s = QpToInit(e->qp_.get(), e->dev_.port.port); !s.ok()) return s;
  for (uint64_t slot = 0; slot < kDepth; ++slot) e->Repost(slot);
  e->psn_ = std::random_device{}() & 0xffffff;
  return e;
}

RawRcEndpoint::~RawRcEndpoint() {
  qp_.reset();
  recv_cq_.reset();
  send_cq_.reset();
  mr_.reset();
  buf_.reset();
  pd_.reset();
}

RdmaConnInfo RawRcEndpoint::LocalInfo(NodeId node) const {
  RdmaConnInfo c;
  c.node = node;
  c.qpn = qp_->qp_num;
  c.psn = psn_;
  c.lid = dev_.port.lid;
  c.gid = dev_.port.gid;
  c.mtu = static_cast<uint8_t>(dev_.port.active_mtu);
  c.uses_grh = dev_.port.gid_index >= 0 ? 1 : 0;
  return c;
}

absl::Status RawRcEndpoint::Connect(const RdmaConnInfo& remote) {
  RcTiming timing;
  RemoteQp r{remote.qpn, remote.psn, remote.lid, remote.gid, static_cast<ibv_mtu>(remote.mtu)};
  if (auto s = QpToRtr(qp_.get(), dev_.port, r, timing); !s.ok()) return s;
  return QpToRts(qp_.get(), psn_, timing);
}

void RawRcEndpoint::Repost(uint64_t slot) {
  ibv_sge sge{reinterpret_cast<uintptr_t>(buf_.get() + slot * kSlotSize), kSlotSize, mr_->lkey};
  ibv_recv_wr wr{};
  wr.wr_id = slot;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  if (ibv_post_recv(qp_.get(), &wr, &bad) != 0) failed_ = true;
}

bool RawRcEndpoint::Reap() {
  ibv_wc wc[kDepth / kSignalEvery];
  const int n = ibv_poll_cq(send_cq_.get(), static_cast<int>(kDepth / kSignalEvery), wc);
  for (int i = 0; i < n; ++i) {
    if (wc[i].status != IBV_WC_SUCCESS) {
      failed_ = true;
      return false;
    }
    completed_ = wc[i].wr_id + 1;
  }
  return n >= 0;
}

bool RawRcEndpoint::Send(const void* data, uint32_t len) {
  if (failed_ || len > kSlotSize) return false;
  if (posted_ - completed_ >= kDepth && (!Reap() || posted_ - completed_ >= kDepth)) return false;
  ibv_sge sge{reinterpret_cast<uintptr_t>(data), len, 0};
  ibv_send_wr wr{};
  if (len <= max_inline_) {
    wr.send_flags = IBV_SEND_INLINE;
  } else {
    uint8_t* slot = buf_.get() + (kDepth + posted_ % kDepth) * kSlotSize;
    std::memcpy(slot, data, len);
    sge.addr = reinterpret_cast<uintptr_t>(slot);
    sge.lkey = mr_->lkey;
  }
  const bool signaled = posted_ % kSignalEvery == kSignalEvery - 1;
  if (signaled) wr.send_flags |= IBV_SEND_SIGNALED;
  wr.wr_id = posted_;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  ibv_send_wr* bad = nullptr;
  if (ibv_post_send(qp_.get(), &wr, &bad) != 0) return false;
  ++posted_;
  if (signaled) Reap();
  return true;
}

}  // namespace aggvm::testing
