#include "vcpu/proxy_vcpu.h"

#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>
#include <variant>

#include "absl/strings/str_cat.h"
#include "common/thread.h"
#include "vcpu/errno_status.h"
#include "vcpu/kvm.h"
#include "vcpu/long_mode.h"
#include "vcpu/proxy_stub_abi.h"
#include "vcpu/vcpu.h"
#include "vcpu/vcpu_thread.h"
#include "vcpu/vm.h"

namespace aggvm::vcpu {

// The assembled proxy_stub.S (generated proxy_stub_bin.cc).
extern const unsigned char kProxyStub[];
extern const std::size_t kProxyStub_size;

namespace {

constexpr uint64_t kRoGpa = AGGVM_PROXY_RO_GPA;
constexpr uint64_t kRwGpa = AGGVM_PROXY_RW_GPA;
constexpr uint64_t kMaxProxies = AGGVM_PROXY_RW_SIZE / AGGVM_PROXY_STACK_BYTES;
static_assert(kRwGpa + AGGVM_PROXY_RW_SIZE == kRoGpa && kRoGpa + AGGVM_PROXY_RO_SIZE == (1ull << 32),
              "the stub's memslots end at 4 GiB, where the reset vector is");
static_assert(uint64_t{AGGVM_PROXY_CODE_GPA} + AGGVM_PROXY_CODE_SIZE == (1ull << 32));
static_assert(AGGVM_PROXY_CODE_GPA + AGGVM_PROXY_RESET_OFFSET == 0xFFFFFFF0ull, "SDM vol. 3, 10.1.4");
static_assert(kMaxProxies >= 64);

constexpr uint64_t kApicBaseDefault = 0xFEE00000;
constexpr uint64_t kApicBaseBsp = 1u << 8;     // SDM vol. 3, 11.4.4 "Local APIC Status and Location"
constexpr uint64_t kApicBaseX2apic = 1u << 10;  // EXTD
constexpr uint64_t kApicBaseEnable = 1u << 11;  // EN
constexpr uint64_t kResetCsBase = 0xFFFF0000;   // CS base after INIT/RESET (SDM vol. 3, table 10-1)
constexpr uint32_t kTssLimit = 0x67;

// Page-table entry bits (SDM vol. 3, 4.5): present, writable, accessed, dirty, page size. A and D are preset so the
// walker never writes the read-only tables.
constexpr uint64_t kPteTable = 0x1 | 0x2 | 0x20;
constexpr uint64_t kPteLarge = kPteTable | 0x40 | 0x80;

// One memslot with its own anonymous mapping (GuestMemory has no flags; this one may be KVM_MEM_READONLY).
class Slot {
 public:
  static absl::StatusOr<Slot> Create(Vm& vm, uint32_t slot, uint64_t gpa, uint64_t size, bool read_only,
                                     std::span<const uint8_t> contents) {
    void* host = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (host == MAP_FAILED) return ErrnoStatus(errno, absl::StrCat("mmap of ", size, " bytes for the proxy stub"));
    Slot s(static_cast<uint8_t*>(host), size);
    if (!contents.empty()) std::memcpy(s.host_, contents.data(), std::min<size_t>(contents.size(), size));
    kvm_userspace_memory_region region{};
    region.slot = slot;
    region.flags = read_only ? KVM_MEM_READONLY : 0;
    region.guest_phys_addr = gpa;
    region.memory_size = size;
    region.userspace_addr = reinterpret_cast<uint64_t>(host);
    if (::ioctl(vm.fd(), KVM_SET_USER_MEMORY_REGION, &region) != 0) {
      return ErrnoStatus(errno, absl::StrCat("KVM_SET_USER_MEMORY_REGION(slot ", slot, ", gpa ", absl::Hex(gpa), ", ",
                                             size, " bytes) for the proxy stub"),
                         "pick ProxyConfig slots the VM does not use; the VM must not map the top 128 KiB below 4 GiB");
    }
    s.vm_fd_ = vm.fd();
    s.slot_ = slot;
    return s;
  }
  Slot(Slot&& o) noexcept
      : host_(std::exchange(o.host_, nullptr)), size_(o.size_), vm_fd_(std::exchange(o.vm_fd_, -1)), slot_(o.slot_) {}
  Slot& operator=(Slot&&) = delete;
  ~Slot() {
    if (vm_fd_ >= 0) {
      kvm_userspace_memory_region region{};
      region.slot = slot_;
      ::ioctl(vm_fd_, KVM_SET_USER_MEMORY_REGION, &region);  // size 0 deletes the slot
    }
    if (host_ != nullptr) ::munmap(host_, size_);
  }

 private:
  Slot(uint8_t* host, uint64_t size) : host_(host), size_(size) {}
  uint8_t* host_ = nullptr;
  uint64_t size_ = 0;
  int vm_fd_ = -1;
  uint32_t slot_ = 0;
};

template <typename T>
void Put(std::vector<uint8_t>& image, uint64_t gpa, const T& v) {
  std::memcpy(image.data() + (gpa - kRoGpa), &v, sizeof(T));
}

// GDT + TSS, IDT, page tables and the stub code: the read-only slot's contents.
std::vector<uint8_t> BuildReadOnlyImage() {
  std::vector<uint8_t> image(AGGVM_PROXY_RO_SIZE, 0);
  // Code/data descriptors with the accessed bit preset (no descriptor write on segment load); TSS busy (type 0xB)
  // as after LTR. SDM vol. 3, 3.4.5 and 8.2.3.
  const uint64_t tss = AGGVM_PROXY_TSS_GPA;
  const std::array<uint64_t, 5> gdt = {
      0, 0x00AF9B000000FFFFull, 0x00CF93000000FFFFull,
      (kTssLimit & 0xFFFFull) | ((tss & 0xFFFFFFull) << 16) | (0x8Bull << 40) | (((tss >> 24) & 0xFF) << 56),
      tss >> 32};
  Put(image, AGGVM_PROXY_GDT_GPA, gdt);
  std::array<uint8_t, kTssLimit + 1> tss_bytes{};
  tss_bytes[102] = kTssLimit + 1;  // no I/O permission bitmap
  Put(image, AGGVM_PROXY_TSS_GPA, tss_bytes);
  // 64-bit interrupt gates (SDM vol. 3, 6.14.1): selector 0x08, IST 0, type 0xE, DPL 0, present.
  for (uint64_t v = 0; v < 256; ++v) {
    const uint64_t handler = AGGVM_PROXY_CODE_GPA + v * AGGVM_PROXY_HANDLER_STRIDE;
    const std::array<uint64_t, 2> gate = {
        (handler & 0xFFFF) | (uint64_t{0x08} << 16) | (0x8Eull << 40) | ((handler >> 16 & 0xFFFF) << 48),
        handler >> 32};
    Put(image, AGGVM_PROXY_IDT_GPA + v * 16, gate);
  }
  const uint64_t pdpt = AGGVM_PROXY_PML4_GPA + 0x1000;
  const uint64_t pd = AGGVM_PROXY_PML4_GPA + 0x2000;
  Put(image, AGGVM_PROXY_PML4_GPA, pdpt | kPteTable);           // PML4[0]: 0..512 GiB
  Put(image, pdpt + 3 * 8, pd | kPteTable);                      // PDPT[3]: 3..4 GiB
  Put(image, pd + 511 * 8, uint64_t{0xFFE00000} | kPteLarge);    // PD[511]: the last 2 MiB below 4 GiB
  std::memcpy(image.data() + (AGGVM_PROXY_CODE_GPA - kRoGpa), kProxyStub, AGGVM_PROXY_CODE_SIZE);
  return image;
}

kvm_segment FlatSegment(uint16_t selector, uint8_t type, bool code) {
  kvm_segment s{};
  s.limit = 0xFFFFFFFF;
  s.selector = selector;
  s.type = type;
  s.present = 1;
  s.db = code ? 0 : 1;
  s.s = 1;
  s.l = code ? 1 : 0;
  s.g = 1;
  return s;
}

// The stub's long-mode system state on top of `current` (from KVM_GET_SREGS).
kvm_sregs StubSregs(const kvm_sregs& current) {
  kvm_sregs s = current;
  s.cs = FlatSegment(0x08, 0xB, true);
  s.ds = s.es = s.fs = s.gs = s.ss = FlatSegment(0x10, 0x3, false);
  s.tr = {};
  s.tr.base = AGGVM_PROXY_TSS_GPA;
  s.tr.limit = kTssLimit;
  s.tr.selector = 0x18;
  s.tr.type = 0xB;
  s.tr.present = 1;
  s.ldt = {};
  s.ldt.unusable = 1;
  s.gdt.base = AGGVM_PROXY_GDT_GPA;
  s.gdt.limit = 5 * 8 - 1;
  s.idt.base = AGGVM_PROXY_IDT_GPA;
  s.idt.limit = 256 * 16 - 1;
  s.cr0 = kCr0LongMode;
  s.cr3 = AGGVM_PROXY_PML4_GPA;
  s.cr4 = kCr4LongMode;
  s.efer = kEferLongMode;
  // x2APIC enabled, and the BSP flag: on INIT KVM makes a BSP runnable at the reset vector (our stub) instead of
  // leaving it waiting for a SIPI that would start it in guest code.
  s.apic_base = kApicBaseDefault | kApicBaseEnable | kApicBaseX2apic | kApicBaseBsp;
  std::memset(s.interrupt_bitmap, 0, sizeof s.interrupt_bitmap);
  return s;
}

absl::Status InstallNoopKickHandler() {
  // VcpuThread installs the same no-op handler; install it here too when nobody has yet (SIG_DFL would kill us).
  static const absl::Status installed = [] {
    struct sigaction old {};
    if (::sigaction(KickSignal(), nullptr, &old) != 0) return ErrnoStatus(errno, "sigaction(SIGRTMIN) query");
    if (old.sa_handler != SIG_DFL) return absl::OkStatus();
    struct sigaction sa {};
    sa.sa_handler = [](int) {};  // no SA_RESTART: the point is to interrupt KVM_RUN
    sigemptyset(&sa.sa_mask);
    if (::sigaction(KickSignal(), &sa, nullptr) != 0) return ErrnoStatus(errno, "sigaction(SIGRTMIN)");
    return absl::OkStatus();
  }();
  return installed;
}

}  // namespace

struct ProxySet::Slots {
  Slot ro;
  Slot rw;
};

class ProxySet::Proxy {
 public:
  Proxy(Vcpu vcpu, uint32_t stack_index, kvm_sregs sregs, ProxySink& sink)
      : vcpu_(std::move(vcpu)), sregs_(sregs), sink_(sink) {
    entry_regs_.rip = AGGVM_PROXY_CODE_GPA + AGGVM_PROXY_ENTRY_OFFSET;
    entry_regs_.rsp = AGGVM_PROXY_RW_GPA + uint64_t{stack_index + 1} * AGGVM_PROXY_STACK_BYTES;
    entry_regs_.rflags = 0x2;
  }
  ~Proxy() { Stop(); }

  ApicId id() const { return vcpu_.id(); }

  absl::Status Prepare() {
    vcpu_.EnableSyncRegs();
    if (auto s = vcpu_.SetSregs(sregs_); !s.ok()) return s;
    vcpu_.StageRegs(entry_regs_);
    return vcpu_.SetMpState(KVM_MP_STATE_RUNNABLE);
  }

  void Start() {
    thread_ = std::thread([this] {
      NameThisThread(absl::StrCat("proxy-", id().value()));
      Loop();
    });
  }

  absl::Status Pin(const std::vector<int>& cpus) {
    // Under mu_ the thread cannot get past setting finished_, so it is alive for the call below (an exited thread's
    // handle would make glibc place the calling thread instead).
    std::lock_guard lock(mu_);
    if (!thread_.joinable() || finished_) return absl::OkStatus();  // not started, or ended: nothing to place
    if (auto s = PinThread(thread_.native_handle(), cpus); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("proxy for APIC ID ", id().value(), ": ", s.message()));
    }
    return absl::OkStatus();
  }

  bool WaitReady(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [this] { return ready_ || finished_; }) && ready_;
  }
  absl::Status error() const {
    std::lock_guard lock(mu_);
    return error_;
  }

  void Stop() {
    if (!thread_.joinable()) return;
    {
      std::lock_guard lock(mu_);
      stop_.store(true, std::memory_order_seq_cst);
    }
    cv_.notify_all();
    // immediate_exit catches a thread about to enter KVM_RUN, the signal one inside it (also while halted).
    vcpu_.SetImmediateExit(true);
    ::pthread_kill(thread_.native_handle(), KickSignal());
    thread_.join();
  }

  ProxyStats stats() const {
    ProxyStats s;
    s.ipis = ipis_.load(std::memory_order_relaxed);
    s.nmis = nmis_.load(std::memory_order_relaxed);
    s.inits = inits_.load(std::memory_order_relaxed);
    s.sipis = sipis_.load(std::memory_order_relaxed);
    s.restores = restores_.load(std::memory_order_relaxed);
    s.sipi_polls = sipi_polls_.load(std::memory_order_relaxed);
    s.last_sipi_rip = last_sipi_rip_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  enum class State : uint8_t { kStub, kWaitSipi };

  void Loop() {
    absl::Status status = RunLoop();
    std::lock_guard lock(mu_);
    if (!status.ok()) error_ = std::move(status);
    finished_ = true;
    cv_.notify_all();
  }

  absl::Status RunLoop() {
    State state = State::kStub;
    std::chrono::microseconds backoff{0};
    while (!stop_.load(std::memory_order_seq_cst)) {
      if (state == State::kWaitSipi) {
        auto next = PollSipi(backoff);
        if (!next.ok()) return next.status();
        state = *next;
        continue;
      }
      auto exit = vcpu_.Run();
      if (!exit.ok()) return exit.status();
      if (std::holds_alternative<Kicked>(*exit)) continue;
      if (const auto* out = std::get_if<IoOut>(&*exit); out != nullptr && out->size == 1 && out->count == 1) {
        const uint32_t value = out->Value();
        if (out->port == AGGVM_PROXY_PORT_EVENT) {
          if (value >= 32) {
            ipis_.fetch_add(1, std::memory_order_relaxed);
            sink_.OnRemoteIpi(id(), Vector(static_cast<uint8_t>(value)));
            continue;
          }
          if (value == 2) {
            nmis_.fetch_add(1, std::memory_order_relaxed);
            sink_.OnRemoteNmi(id());
            continue;
          }
          if (value == 0) {
            SetReady();
            continue;
          }
        } else if (out->port == AGGVM_PROXY_PORT_INIT) {
          // The reset vector ran: KVM accepted an INIT (and reset the vCPU as a BSP). Complete the OUT, then wait for
          // a SIPI in the wait-for-SIPI state without running the vCPU.
          inits_.fetch_add(1, std::memory_order_relaxed);
          sink_.OnRemoteInit(id());
          if (auto s = CompletePendingExit(); !s.ok()) return s;
          if (auto s = vcpu_.SetMpState(KVM_MP_STATE_INIT_RECEIVED); !s.ok()) return s;
          state = State::kWaitSipi;
          backoff = std::chrono::microseconds{0};
          continue;
        }
      }
      // An exception in the stub (port FAULT), a shutdown, or anything else: nothing the stub should do.
      restores_.fetch_add(1, std::memory_order_relaxed);
      if (auto s = CompletePendingExit(); !s.ok()) return s;
      if (auto s = Restore(); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  // Wait-for-SIPI: KVM_GET_MP_STATE runs KVM's acceptance of pending INIT/SIPI events (a SIPI loads CS = vector << 8,
  // base vector << 12, RIP 0 and makes the vCPU runnable) without entering the guest.
  absl::StatusOr<State> PollSipi(std::chrono::microseconds& backoff) {
    kvm_mp_state mp{};
    if (::ioctl(vcpu_.fd(), KVM_GET_MP_STATE, &mp) != 0) {
      return ErrnoStatus(errno, absl::StrCat("KVM_GET_MP_STATE on proxy vCPU ", id().value()));
    }
    sipi_polls_.fetch_add(1, std::memory_order_relaxed);
    if (mp.mp_state == KVM_MP_STATE_RUNNABLE) {
      auto sregs = vcpu_.GetSregs();
      if (!sregs.ok()) return sregs.status();
      if (sregs->cs.base == kResetCsBase) {
        // Another INIT (a BSP resets to the reset vector): report it and keep waiting.
        inits_.fetch_add(1, std::memory_order_relaxed);
        sink_.OnRemoteInit(id());
        if (auto s = vcpu_.SetMpState(KVM_MP_STATE_INIT_RECEIVED); !s.ok()) return s;
        return State::kWaitSipi;
      }
      kvm_regs regs{};
      if (::ioctl(vcpu_.fd(), KVM_GET_REGS, &regs) != 0) {
        return ErrnoStatus(errno, absl::StrCat("KVM_GET_REGS on proxy vCPU ", id().value()));
      }
      last_sipi_rip_.store(regs.rip, std::memory_order_relaxed);
      // Restore (LAPIC enabled again) before reporting: once the SIPI is known, IPIs to this vCPU must be caught.
      if (auto s = Restore(); !s.ok()) return s;
      sipis_.fetch_add(1, std::memory_order_relaxed);
      sink_.OnRemoteSipi(id(), static_cast<uint8_t>(sregs->cs.selector >> 8));
      return State::kStub;
    }
    // Still waiting: back off from 20 µs to 250 µs (~2% of a core at ~5 µs a poll). Bring-up is rare, and a guest
    // may INIT a CPU and never start it.
    backoff = std::clamp(backoff * 2, std::chrono::microseconds{20}, std::chrono::microseconds{250});
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, backoff, [this] { return stop_.load(std::memory_order_seq_cst); });
    return State::kWaitSipi;
  }

  // Re-enters KVM_RUN with immediate_exit so KVM completes the OUT it exited for (api.rst, "immediate_exit") before
  // the vCPU's state is replaced; otherwise completing it later would overwrite the restored RIP.
  absl::Status CompletePendingExit() {
    vcpu_.SetImmediateExit(true);
    auto exit = vcpu_.Run();
    // Stop() may have set immediate_exit meanwhile: the loop re-checks stop_ before the next KVM_RUN.
    vcpu_.SetImmediateExit(false);
    if (!exit.ok()) return exit.status();
    if (stop_.load(std::memory_order_seq_cst)) vcpu_.SetImmediateExit(true);
    return absl::OkStatus();
  }

  // Back to the stub's entry: long mode, x2APIC + BSP, runnable. INIT software-disabled the LAPIC (SVR = 0xFF), and
  // a disabled LAPIC drops fixed interrupts (SDM vol. 3, 11.4.7.2): enable it here with KVM_SET_LAPIC rather than
  // wait for the stub's entry to run, so no IPI sent right after the SIPI is lost. (The entry does it again.)
  absl::Status Restore() {
    if (auto s = vcpu_.SetSregs(sregs_); !s.ok()) return s;
    kvm_lapic_state lapic{};
    if (::ioctl(vcpu_.fd(), KVM_GET_LAPIC, &lapic) != 0) {
      return ErrnoStatus(errno, absl::StrCat("KVM_GET_LAPIC on proxy vCPU ", id().value()));
    }
    constexpr size_t kSvr = 0xF0;
    const uint32_t svr = 0x1FF;  // APIC software enable, spurious vector 0xFF
    std::memcpy(&lapic.regs[kSvr], &svr, sizeof svr);
    if (::ioctl(vcpu_.fd(), KVM_SET_LAPIC, &lapic) != 0) {
      return ErrnoStatus(errno, absl::StrCat("KVM_SET_LAPIC on proxy vCPU ", id().value()));
    }
    vcpu_.StageRegs(entry_regs_);
    return vcpu_.SetMpState(KVM_MP_STATE_RUNNABLE);
  }

  void SetReady() {
    std::lock_guard lock(mu_);
    ready_ = true;
    cv_.notify_all();
  }

  Vcpu vcpu_;
  kvm_sregs sregs_;
  kvm_regs entry_regs_{};
  ProxySink& sink_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool ready_ = false;     // guarded by mu_
  bool finished_ = false;  // guarded by mu_
  absl::Status error_;     // guarded by mu_
  std::atomic<uint64_t> ipis_{0}, nmis_{0}, inits_{0}, sipis_{0}, restores_{0}, sipi_polls_{0};
  std::atomic<uint64_t> last_sipi_rip_{UINT64_MAX};
};

absl::StatusOr<std::unique_ptr<ProxySet>> ProxySet::Create(const Kvm& kvm, Vm& vm, ProxyConfig config,
                                                           ProxySink& sink) {
  if (config.remote.size() > kMaxProxies) {
    return absl::InvalidArgumentError(
        absl::StrCat(config.remote.size(), " proxy vCPUs requested: at most ", kMaxProxies, " (one stack each)"));
  }
  if (config.ro_slot == config.rw_slot) {
    return absl::InvalidArgumentError(absl::StrCat("proxy memslots must differ (both ", config.ro_slot, ")"));
  }
  if (kProxyStub_size != AGGVM_PROXY_CODE_SIZE) {
    return absl::InternalError(absl::StrCat("proxy stub is ", kProxyStub_size, " bytes, expected ",
                                            AGGVM_PROXY_CODE_SIZE, ": rebuild (proxy_stub.S)"));
  }
  if (auto s = kvm.RequireExtension(KVM_CAP_X2APIC_API, "KVM_CAP_X2APIC_API"); !s.ok()) return s;
  auto cpuid = kvm.SupportedCpuid();
  if (!cpuid.ok()) return cpuid.status();

  std::unique_ptr<ProxySet> set(new ProxySet());
  set->read_only_ = kvm.CheckExtension(KVM_CAP_READONLY_MEM) > 0;
  const std::vector<uint8_t> image = BuildReadOnlyImage();
  auto ro = Slot::Create(vm, config.ro_slot, kRoGpa, AGGVM_PROXY_RO_SIZE, set->read_only_, image);
  if (!ro.ok()) return ro.status();
  auto rw = Slot::Create(vm, config.rw_slot, kRwGpa, AGGVM_PROXY_RW_SIZE, false, {});
  if (!rw.ok()) return rw.status();
  set->slots_ = std::make_unique<Slots>(Slots{*std::move(ro), *std::move(rw)});

  for (size_t i = 0; i < config.remote.size(); ++i) {
    const ApicId id = config.remote[i];
    auto v = vm.CreateVcpu(id);
    if (!v.ok()) return v.status();
    std::vector<kvm_cpuid_entry2> entries = CpuidForVcpu(*cpuid, id);
    for (auto& e : entries) {
      if (e.function == 1) e.ecx |= 1u << 21;  // x2APIC: KVM refuses APIC base EXTD without it
    }
    if (auto s = v->SetCpuid(entries); !s.ok()) return s;
    auto sregs = v->GetSregs();
    if (!sregs.ok()) return sregs.status();
    auto proxy = std::make_unique<Proxy>(*std::move(v), static_cast<uint32_t>(i), StubSregs(*sregs), sink);
    if (auto s = proxy->Prepare(); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("proxy vCPU for APIC ID ", id.value(), ": ", s.message()));
    }
    set->proxies_.push_back(std::move(proxy));
  }
  return set;
}

ProxySet::~ProxySet() { Stop(); }

absl::Status ProxySet::Start() {
  if (auto s = InstallNoopKickHandler(); !s.ok()) return s;
  for (auto& p : proxies_) p->Start();
  for (auto& p : proxies_) {
    if (!p->WaitReady(std::chrono::seconds(5))) {
      absl::Status err = p->error();
      return err.ok() ? absl::DeadlineExceededError(absl::StrCat("proxy vCPU for APIC ID ", p->id().value(),
                                                                 " did not reach its stub within 5 s"))
                      : err;
    }
  }
  return absl::OkStatus();
}

absl::Status ProxySet::Pin(const std::vector<int>& cpus) {
  for (auto& p : proxies_) {
    if (auto s = p->Pin(cpus); !s.ok()) return s;
  }
  return absl::OkStatus();
}

void ProxySet::Stop() {
  for (auto& p : proxies_) p->Stop();
}

size_t ProxySet::size() const { return proxies_.size(); }

ProxyStats ProxySet::stats(ApicId remote) const {
  for (const auto& p : proxies_) {
    if (p->id() == remote) return p->stats();
  }
  return {};
}

}  // namespace aggvm::vcpu
