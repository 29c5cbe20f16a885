#include "transport/rdma/rdma_transport.h"

#include <fcntl.h>
#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <random>

#include "transport/rdma/cat.h"
#include "absl/strings/str_format.h"
#include "common/clock.h"

namespace aggvm::transport::rdma {
namespace {

// wr_id layout: bits 63..48 peer index, bit 47 receive flag, bits 46..0 send counter or receive slot.
constexpr int kPeerShift = 48;
constexpr uint64_t kRecvFlag = 1ull << 47;
constexpr uint64_t kLowMask = kRecvFlag - 1;

constexpr uint8_t kLossNone = 0, kLossWriting = 1, kLossSet = 2;

// Single-writer counter: a plain load and store, no locked read-modify-write on the frame path.
inline void Bump(std::atomic<uint64_t>& c, uint64_t n = 1) {
  c.store(c.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
}

std::string ErrnoText(int err) { return Cat(ErrnoName(err), " ", err, ": ", std::strerror(err)); }

}  // namespace

struct RdmaTransport::Peer {
  NodeId node{};
  uint16_t index = 0;
  uint8_t* recv_slots = nullptr;  // kRecvDepth * kFrameSize, inside mr_
  uint8_t* send_slots = nullptr;  // kSendDepth * kFrameSize, inside mr_
  uint32_t send_psn = 0;
  bool inline_sends = false;
  // Verbs objects of this peer, in creation order (the QP is destroyed before its send CQ).
  CompletionQueue send_cq;
  QueuePair qp;

  // Owned by the (serialised) sender of this peer.
  uint32_t last_sequence = 0;  // the first frame carries NextSequence(0) = 1
  absl::Status queue_full;     // prebuilt RESOURCE_EXHAUSTED: returning a copy does not allocate
  uint64_t posted = 0;     // sends posted
  uint64_t completed = 0;  // sends known complete (a signalled completion covers every earlier send)
  std::atomic<uint64_t> frames_sent{0};
  std::atomic<uint64_t> send_errors{0};

  // Loss: set once by whichever thread sees the failed completion first (sender or poller).
  std::atomic<uint8_t> loss{kLossNone};
  bool loss_reported = false;  // poller only: Poll reports a loss once
  char loss_reason[320] = {};
  absl::Status losing;         // prebuilt: the loss seen by another thread whose reason is still being written

  // Owned by the poller.
  SequenceChecker recv_sequence;  // expects 1 first
  FrameError last_bad_frame;      // why the last refused receive from this peer was refused

  absl::Status LossStatus() const {
    if (loss.load(std::memory_order_acquire) == kLossSet) return absl::UnavailableError(loss_reason);
    return losing;
  }
};

RdmaTransport::RdmaTransport(const RdmaOptions& options, std::unique_ptr<RdmaBootstrap> bootstrap,
                             OpenedDevice device)
    : options_(options), bootstrap_(std::move(bootstrap)), device_(std::move(device)) {}

RdmaTransport::~RdmaTransport() { Close(); }

absl::StatusOr<std::unique_ptr<RdmaTransport>> RdmaTransport::Create(const RdmaOptions& options,
                                                                     std::unique_ptr<RdmaBootstrap> bootstrap) {
  if (!bootstrap) return absl::InvalidArgumentError("RdmaTransport needs a bootstrap (got null)");
  auto dev = OpenDevice(options.device);
  if (!dev.ok()) return dev.status();
  std::unique_ptr<RdmaTransport> t(new RdmaTransport(options, std::move(bootstrap), std::move(*dev)));
  t->pd_.reset(ibv_alloc_pd(t->device_.context.get()));
  if (!t->pd_) {
    return absl::ResourceExhaustedError(
        Cat("ibv_alloc_pd on ", t->device_.port.device_name, " failed: ", ErrnoText(errno)));
  }
  if (options.wait_mode == WaitMode::kEvent) {
    t->channel_.reset(ibv_create_comp_channel(t->device_.context.get()));
    if (!t->channel_) {
      return absl::ResourceExhaustedError(Cat("ibv_create_comp_channel on ", t->device_.port.device_name,
                                                       " failed: ", ErrnoText(errno)));
    }
    if (absl::Status s = t->waker_.CanEndASleep(); !s.ok()) return s;
    // Non-blocking so that ibv_get_cq_event after a spurious wake-up returns instead of sleeping past the timeout.
    const int fl = fcntl(t->channel_->fd, F_GETFL);
    if (fl < 0 || fcntl(t->channel_->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
      return absl::InternalError(Cat("fcntl(O_NONBLOCK) on the completion channel: ", ErrnoText(errno)));
    }
  }
  return t;
}

RdmaTransport::Peer* RdmaTransport::FindPeer(NodeId node) {
  for (auto& p : peers_) {
    if (p->node == node) return p.get();
  }
  return nullptr;
}

absl::Status RdmaTransport::SetUpQueuePair(Peer& peer, size_t index) {
  ibv_context* ctx = device_.context.get();
  peer.send_cq = CompletionQueue(ibv_create_cq(ctx, kSendDepth, nullptr, nullptr, 0));
  if (!peer.send_cq) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("ibv_create_cq(%u entries) for node %d failed: %s", kSendDepth, peer.node.value(),
                        ErrnoText(errno)));
  }
  ibv_qp_init_attr init{};
  init.send_cq = peer.send_cq.get();
  init.recv_cq = recv_cq_.get();
  init.qp_type = IBV_QPT_RC;
  init.sq_sig_all = 0;  // selective signalling: only WRs with IBV_SEND_SIGNALED complete into the CQ
  init.cap.max_send_wr = kSendDepth;
  init.cap.max_recv_wr = kRecvDepth;
  init.cap.max_send_sge = 1;
  init.cap.max_recv_sge = 1;
  init.cap.max_inline_data = kFrameSize;
  peer.qp.reset(ibv_create_qp(pd_.get(), &init));
  if (!peer.qp) {
    init.cap.max_inline_data = 0;  // the device cannot inline a frame: send it from the registered slot instead
    peer.qp.reset(ibv_create_qp(pd_.get(), &init));
  }
  if (!peer.qp) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "ibv_create_qp(RC, %u send / %u receive WRs) for node %d failed: %s", kSendDepth, kRecvDepth,
        peer.node.value(), ErrnoText(errno)));
  }
  // ibv_create_qp writes back the capabilities actually granted.
  peer.inline_sends = init.cap.max_inline_data >= kFrameSize;
  device_.port.max_inline_data =
      index == 0 ? init.cap.max_inline_data : std::min(device_.port.max_inline_data, init.cap.max_inline_data);
  if (auto s = QpToInit(peer.qp.get(), device_.port.port); !s.ok()) return s;

  // Pre-post the whole receive ring (allowed in INIT), chained in batches.
  constexpr uint32_t kChain = 32;
  static_assert(kRecvDepth % kChain == 0);
  for (uint32_t base = 0; base < kRecvDepth; base += kChain) {
    ibv_sge sge[kChain];
    ibv_recv_wr wr[kChain];
    for (uint32_t i = 0; i < kChain; ++i) {
      const uint32_t slot = base + i;
      sge[i] = ibv_sge{reinterpret_cast<uintptr_t>(peer.recv_slots + slot * kFrameSize),
                       static_cast<uint32_t>(kFrameSize), mr_->lkey};
      wr[i] = ibv_recv_wr{};
      wr[i].wr_id = (static_cast<uint64_t>(peer.index) << kPeerShift) | kRecvFlag | slot;
      wr[i].sg_list = &sge[i];
      wr[i].num_sge = 1;
      wr[i].next = i + 1 < kChain ? &wr[i + 1] : nullptr;
    }
    ibv_recv_wr* bad = nullptr;
    if (int rc = ibv_post_recv(peer.qp.get(), wr, &bad); rc != 0) {
      return absl::InternalError(absl::StrFormat("ibv_post_recv (receive ring for node %d) failed: %s",
                                                 peer.node.value(), ErrnoText(rc)));
    }
  }
  return absl::OkStatus();
}

absl::Status RdmaTransport::Connect(std::span<const PeerEndpoint> peers, absl::Duration timeout) {
  if (closed_) return absl::FailedPreconditionError("rdma transport: Connect after Close");
  if (connected_ || !peers_.empty()) return absl::FailedPreconditionError("rdma transport: Connect called twice");
  if (peers.empty()) return absl::InvalidArgumentError("rdma transport: Connect needs at least one peer");
  if (peers.size() > 0xffff) return absl::InvalidArgumentError("rdma transport: more than 65535 peers");
  std::vector<PeerEndpoint> sorted(peers.begin(), peers.end());
  // Every node handles its peers in ascending id order: the pairwise bootstrap exchanges cannot deadlock.
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.node < b.node; });
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (sorted[i].node == options_.self) {
      return absl::InvalidArgumentError(
          absl::StrFormat("rdma transport: the peer list contains this node (%d)", options_.self.value()));
    }
    if (i > 0 && sorted[i].node == sorted[i - 1].node) {
      return absl::InvalidArgumentError(
          absl::StrFormat("rdma transport: node %d appears twice in the peer list", sorted[i].node.value()));
    }
  }
  auto fail = [this](absl::Status s) {
    Close();  // a failed Connect releases everything: the transport is closed
    return s;
  };

  // Frame buffers, registered once for the life of the connections.
  const size_t per_peer = static_cast<size_t>(kRecvDepth + kSendDepth) * kFrameSize;
  const size_t bytes = (per_peer * sorted.size() + 4095) / 4096 * 4096;
  buffer_.reset(static_cast<uint8_t*>(std::aligned_alloc(4096, bytes)));
  if (!buffer_) return fail(absl::ResourceExhaustedError(Cat("cannot allocate ", bytes, " frame bytes")));
  std::memset(buffer_.get(), 0, bytes);
  // (ibv_reg_mr): the function, not verbs.h's macro of that name, which mixes enum types (clang warns).
  mr_.reset((ibv_reg_mr)(pd_.get(), buffer_.get(), bytes, IBV_ACCESS_LOCAL_WRITE));
  if (!mr_) {
    return fail(absl::ResourceExhaustedError(absl::StrFormat(
        "ibv_reg_mr(%u bytes) failed: %s (locked-memory limit? raise `ulimit -l`)", bytes, ErrnoText(errno))));
  }
  const int cq_entries = static_cast<int>(kRecvDepth * sorted.size());
  recv_cq_ = CompletionQueue(ibv_create_cq(device_.context.get(), cq_entries, nullptr, channel_.get(), 0));
  if (!recv_cq_) {
    return fail(absl::ResourceExhaustedError(
        absl::StrFormat("ibv_create_cq(%d entries) failed: %s", cq_entries, ErrnoText(errno))));
  }

  std::random_device rd;
  for (size_t i = 0; i < sorted.size(); ++i) {
    auto p = std::make_unique<Peer>();
    p->node = sorted[i].node;
    p->index = static_cast<uint16_t>(i);
    p->recv_slots = buffer_.get() + i * per_peer;
    p->send_slots = p->recv_slots + static_cast<size_t>(kRecvDepth) * kFrameSize;
    p->send_psn = rd() & 0xffffff;
    p->queue_full = absl::ResourceExhaustedError(
        absl::StrFormat("rdma send queue to node %d is full (%u frames in flight); retry after polling",
                        p->node.value(), kSendDepth));
    p->losing = absl::UnavailableError(absl::StrFormat("rdma peer node %d lost", p->node.value()));
    peers_.push_back(std::move(p));
    if (auto s = SetUpQueuePair(*peers_.back(), i); !s.ok()) return fail(s);
  }
  inline_sends_ = std::all_of(peers_.begin(), peers_.end(), [](const auto& p) { return p->inline_sends; });

  const absl::Time deadline = absl::Now() + timeout;
  for (size_t i = 0; i < peers_.size(); ++i) {
    Peer& p = *peers_[i];
    RdmaConnInfo local;
    local.node = options_.self;
    local.qpn = p.qp->qp_num;
    local.psn = p.send_psn;
    local.lid = device_.port.lid;
    local.gid = device_.port.gid;
    local.mtu = static_cast<uint8_t>(device_.port.active_mtu);
    local.uses_grh = device_.port.gid_index >= 0 ? 1 : 0;
    auto remote = bootstrap_->Exchange(sorted[i], local, deadline);
    if (!remote.ok()) {
      return fail(absl::Status(remote.status().code(),
                               absl::StrFormat("rdma connect to node %d: %s", p.node.value(),
                                               remote.status().message())));
    }
    if (remote->uses_grh != local.uses_grh) {
      return fail(absl::FailedPreconditionError(absl::StrFormat(
          "rdma connect to node %d: it %s a GID but this node %s (mixed RoCE / InfiniBand?)", p.node.value(),
          remote->uses_grh ? "uses" : "does not use", local.uses_grh ? "does" : "does not")));
    }
    RemoteQp r{remote->qpn, remote->psn, remote->lid, remote->gid, static_cast<ibv_mtu>(remote->mtu)};
    if (auto s = QpToRtr(p.qp.get(), device_.port, r, options_.timing); !s.ok()) return fail(s);
    if (auto s = QpToRts(p.qp.get(), p.send_psn, options_.timing); !s.ok()) return fail(s);
  }
  for (size_t i = 0; i < peers_.size(); ++i) {
    if (auto s = bootstrap_->Ready(sorted[i], deadline); !s.ok()) {
      return fail(absl::Status(s.code(), absl::StrFormat("rdma connect to node %d: %s", sorted[i].node.value(),
                                                         s.message())));
    }
  }
  bootstrap_->Close();
  connected_ = true;
  return absl::OkStatus();
}

void RdmaTransport::MarkLost(Peer& peer, const ibv_wc& wc) {
  uint8_t expected = kLossNone;
  if (!peer.loss.compare_exchange_strong(expected, kLossWriting, std::memory_order_acq_rel)) return;
  const bool recv = (wc.wr_id & kRecvFlag) != 0;
  const char* hint = "";
  switch (wc.status) {
    case IBV_WC_RETRY_EXC_ERR:
      hint = "; the peer stopped acknowledging (process gone, link down, or wrong GID)";
      break;
    case IBV_WC_RNR_RETRY_EXC_ERR: hint = "; the peer posts no receives"; break;
    case IBV_WC_WR_FLUSH_ERR:
      hint = "; the connection's queue pair entered the error state (the peer stopped acknowledging, or a local "
             "error)";
      break;
    case IBV_WC_LOC_LEN_ERR: hint = "; the peer sent a message larger than a frame"; break;
    default: break;
  }
  std::snprintf(peer.loss_reason, sizeof(peer.loss_reason),
                "rdma peer node %u lost: %s completion failed with %s (status %d, vendor error %#x)%s",
                static_cast<unsigned>(peer.node.value()), recv ? "receive" : "send", ibv_wc_status_str(wc.status),
                static_cast<int>(wc.status), wc.vendor_err, hint);
  peers_lost_.fetch_add(1, std::memory_order_relaxed);
  peer.loss.store(kLossSet, std::memory_order_release);
  waker_.Kick();  // a loss found by a sender's send CQ ends an untimed Wait in the polling thread (which reports it)
}

absl::Status RdmaTransport::ReapSends(Peer& peer) {
  ibv_wc wcs[kSendDepth / kSignalEvery];
  const int n = ibv_poll_cq(peer.send_cq.get(), static_cast<int>(std::size(wcs)), wcs);
  if (n < 0) return absl::InternalError(absl::StrFormat("ibv_poll_cq (send CQ of node %d) failed", peer.node.value()));
  for (int i = 0; i < n; ++i) {
    if (wcs[i].status == IBV_WC_SUCCESS) {
      // Send WRs of one QP complete in order: this completion covers every earlier unsignalled send.
      peer.completed = (wcs[i].wr_id & kLowMask) + 1;
    } else {
      MarkLost(peer, wcs[i]);
    }
  }
  if (peer.loss.load(std::memory_order_acquire) != kLossNone) return peer.LossStatus();
  return absl::OkStatus();
}

absl::Status RdmaTransport::Send(NodeId to, Frame& frame) {
  if (!connected_) {
    return absl::FailedPreconditionError(closed_ ? "rdma transport is closed" : "rdma transport: Send before Connect");
  }
  Peer* p = FindPeer(to);
  if (p == nullptr) return absl::NotFoundError(absl::StrFormat("rdma transport: node %d is not a peer", to.value()));
  if (p->loss.load(std::memory_order_acquire) != kLossNone) {
    Bump(p->send_errors);
    return p->LossStatus();
  }
  frame.source = options_.self;
  frame.sequence = NextSequence(p->last_sequence);
  if (auto s = ValidateFrame(frame); !s.ok()) {
    Bump(p->send_errors);
    return s;
  }
  if (p->posted - p->completed >= kSendDepth) {
    if (auto s = ReapSends(*p); !s.ok()) {
      Bump(p->send_errors);
      return s;
    }
    if (p->posted - p->completed >= kSendDepth) return p->queue_full;  // a copy: no allocation
  }
  const uint32_t slot = static_cast<uint32_t>(p->posted % kSendDepth);
  uint8_t* wire = p->send_slots + static_cast<size_t>(slot) * kFrameSize;
  WireFrame encoded;
  EncodeFrame(frame, encoded);
  ibv_sge sge{};
  sge.length = kFrameSize;
  ibv_send_wr wr{};
  if (p->inline_sends) {
    // IBV_SEND_INLINE copies the bytes into the WQE during ibv_post_send: the stack buffer may go right after.
    sge.addr = reinterpret_cast<uintptr_t>(encoded.data());
    wr.send_flags = IBV_SEND_INLINE;
  } else {
    // Sent by reference: the slot stays untouched until the send completes, which the kSendDepth bound guarantees.
    std::memcpy(wire, encoded.data(), kFrameSize);
    sge.addr = reinterpret_cast<uintptr_t>(wire);
    sge.lkey = mr_->lkey;
  }
  const bool signaled = p->posted % kSignalEvery == kSignalEvery - 1;
  if (signaled) wr.send_flags |= IBV_SEND_SIGNALED;
  wr.wr_id = (static_cast<uint64_t>(p->index) << kPeerShift) | (p->posted & kLowMask);
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  ibv_send_wr* bad = nullptr;
  if (int rc = ibv_post_send(p->qp.get(), &wr, &bad); rc != 0) {
    Bump(p->send_errors);
    if (p->loss.load(std::memory_order_acquire) != kLossNone) return p->LossStatus();
    return absl::UnavailableError(
        absl::StrFormat("ibv_post_send to node %d failed: %s", to.value(), ErrnoText(rc)));
  }
  ++p->posted;
  p->last_sequence = frame.sequence;
  Bump(p->frames_sent);
  // After each signalled window, take its completion: frees send slots and notices a lost peer early.
  // This frame is posted either way; a loss seen here is returned by the next Send and by Poll.
  if (signaled) (void)ReapSends(*p);
  return absl::OkStatus();
}

absl::StatusOr<size_t> RdmaTransport::Poll(std::span<ReceivedFrame> out) {
  if (!connected_) {
    return absl::FailedPreconditionError(closed_ ? "rdma transport is closed" : "rdma transport: Poll before Connect");
  }
  ibv_wc wcs[kPollBatch];
  const int want = static_cast<int>(std::min<size_t>(out.size(), kPollBatch));
  if (want == 0) return 0;
  const int n = ibv_poll_cq(recv_cq_.get(), want, wcs);
  if (n < 0) return absl::InternalError("ibv_poll_cq on the receive CQ failed");
  size_t k = 0;
  uint64_t bad_frames = 0;
  uint64_t sequence_errors = 0;
  for (int i = 0; i < n; ++i) {
    const ibv_wc& wc = wcs[i];
    const size_t index = wc.wr_id >> kPeerShift;
    if (index >= peers_.size()) continue;  // not ours: cannot happen, ignore rather than crash
    Peer& p = *peers_[index];
    if (wc.status != IBV_WC_SUCCESS) {
      MarkLost(p, wc);  // a flushed or failed receive: the QP is in the error state, the slot stays unposted
      continue;
    }
    const uint32_t slot = static_cast<uint32_t>(wc.wr_id & kLowMask);
    uint8_t* buf = p.recv_slots + static_cast<size_t>(slot) * kFrameSize;
    FrameError e;
    if (wc.opcode != IBV_WC_RECV) {
      e.code = FrameErrorCode::kNotASend;
      e.value = wc.opcode;
    } else {
      // Decoded in place into out[k] (no allocation, also for a bad frame); out[k] counts only once k moves on.
      e = DecodeFrameRaw(buf, wc.byte_len, out[k].frame);
      if (e.ok() && out[k].frame.source != p.node) {  // a frame must come from the node at the other end of the QP
        e.code = FrameErrorCode::kWrongSource;
        e.field = FrameField::kSource;
        e.type = static_cast<uint8_t>(out[k].frame.type);
        e.value = out[k].frame.source.value();
      }
    }
    if (e.ok()) {
      if (!p.recv_sequence.Accept(out[k].frame.sequence)) ++sequence_errors;
      out[k].from = p.node;
      ++k;
    } else {
      p.last_bad_frame = e;
      ++bad_frames;
    }
    // The frame was copied out by DecodeFrameRaw: give the slot back to the receive ring at once.
    ibv_sge sge{reinterpret_cast<uintptr_t>(buf), static_cast<uint32_t>(kFrameSize), mr_->lkey};
    ibv_recv_wr wr{};
    wr.wr_id = wc.wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    ibv_recv_wr* bad = nullptr;
    if (ibv_post_recv(p.qp.get(), &wr, &bad) != 0) {
      ibv_wc failed = wc;
      failed.status = IBV_WC_LOC_QP_OP_ERR;  // the receive ring cannot be refilled: treat the peer as lost
      MarkLost(p, failed);
    }
  }
  if (k > 0) Bump(frames_received_, k);
  if (bad_frames > 0) Bump(bad_frames_, bad_frames);
  if (sequence_errors > 0) Bump(sequence_errors_, sequence_errors);
  // A loss not yet reported (one relaxed load while nothing is wrong, so empty busy-polls stay short).
  if (k == 0 && peers_lost_.load(std::memory_order_relaxed) != losses_reported_) {
    for (auto& p : peers_) {
      if (!p->loss_reported && p->loss.load(std::memory_order_acquire) == kLossSet) {
        p->loss_reported = true;
        ++losses_reported_;
        return p->LossStatus();
      }
    }
  }
  return k;
}

absl::StatusOr<size_t> RdmaTransport::Wait(std::span<ReceivedFrame> out, absl::Duration timeout) {
  const uint64_t start = MonotonicNanos();
  const bool forever = timeout == absl::InfiniteDuration();
  const uint64_t budget = static_cast<uint64_t>(std::max<int64_t>(0, absl::ToInt64Nanoseconds(timeout)));
  for (;;) {
    auto r = Poll(out);
    if (!r.ok() || *r > 0) return r;
    if (waker_.pending() && waker_.Consume()) return 0;
    const uint64_t elapsed = MonotonicNanos() - start;
    if (!forever && elapsed >= budget) return 0;
    if (options_.wait_mode == WaitMode::kBusyPoll) continue;

    // Event mode: arm the CQ, then poll once more — a completion that arrived before arming raises no event.
    if (int rc = ibv_req_notify_cq(recv_cq_.get(), 0); rc != 0) {
      return absl::InternalError(Cat("ibv_req_notify_cq failed: ", ErrnoText(rc)));
    }
    r = Poll(out);
    if (!r.ok() || *r > 0) return r;
    if (waker_.pending() && waker_.Consume()) return 0;
    const uint64_t left = budget - std::min(budget, MonotonicNanos() - start);
    timespec ts{static_cast<time_t>(left / 1'000'000'000u), static_cast<long>(left % 1'000'000'000u)};
    pollfd pfd[2] = {{channel_->fd, POLLIN, 0}, {waker_.fd(), POLLIN, 0}};
    const int rc = ppoll(pfd, waker_.fd() >= 0 ? 2 : 1, forever ? nullptr : &ts, nullptr);  // untimed: no timer
    if (rc < 0 && errno != EINTR) return absl::InternalError(Cat("ppoll failed: ", ErrnoText(errno)));
    if (rc > 0 && (pfd[1].revents & POLLIN) != 0 && waker_.Consume()) return 0;
    if (rc > 0 && (pfd[0].revents & POLLIN) != 0) {
      ibv_cq* cq = nullptr;
      void* cq_context = nullptr;
      if (ibv_get_cq_event(channel_.get(), &cq, &cq_context) == 0) recv_cq_.CountEvent();
    }
  }
}

void RdmaTransport::Close() {
  if (closed_) return;
  closed_ = true;
  connected_ = false;
  if (bootstrap_) bootstrap_->Close();
  // Reverse order of creation: QPs (then each send CQ), the receive CQ, the MR, the buffer, the completion channel,
  // the PD, the device context.
  for (auto it = peers_.rbegin(); it != peers_.rend(); ++it) {
    retired_sent_ += (*it)->frames_sent.load(std::memory_order_relaxed);
    retired_send_errors_ += (*it)->send_errors.load(std::memory_order_relaxed);
    (*it)->qp.reset();
    (*it)->send_cq.reset();
  }
  peers_.clear();
  recv_cq_.reset();
  mr_.reset();
  buffer_.reset();
  channel_.reset();
  pd_.reset();
  device_.context.reset();
}

FrameError RdmaTransport::last_bad_frame(NodeId peer) const {
  for (const auto& p : peers_) {
    if (p->node == peer) return p->last_bad_frame;
  }
  return FrameError{};
}

TransportStats RdmaTransport::stats() const {
  TransportStats s;
  s.frames_sent = retired_sent_;
  s.send_errors = retired_send_errors_;
  for (const auto& p : peers_) {
    s.frames_sent += p->frames_sent.load(std::memory_order_relaxed);
    s.send_errors += p->send_errors.load(std::memory_order_relaxed);
  }
  s.frames_received = frames_received_.load(std::memory_order_relaxed);
  s.bad_frames = bad_frames_.load(std::memory_order_relaxed);
  s.sequence_errors = sequence_errors_.load(std::memory_order_relaxed);
  s.peers_lost = peers_lost_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace aggvm::transport::rdma
