// Proxy vCPUs (`kernel` irqchip mode, issue 6; docs/proxy.md): in this node's VM, a placeholder KVM vCPU for every
// vCPU that runs on another node. It owns that vCPU's APIC ID, so KVM's own in-kernel destination logic (physical,
// logical, broadcast, shorthands; SDM vol. 3, 11.6.2 "Determining IPI Destination") decides which remote vCPUs a
// guest IPI is meant for. An IPI to an APIC ID with no vCPU would be dropped silently (../shared/FACTS.md).
//
// A proxy never runs guest code. It runs a stub (proxy_stub.S, layout in proxy_stub_abi.h) that lives in two
// memslots just below 4 GiB — read-only code and tables, plus one small stack per proxy — and never touches guest
// RAM. The stub enables its x2APIC, halts with interrupts on; each handler OUTs its vector and EOIs; the NMI handler
// OUTs 2. The proxy's thread turns these exits into ProxySink calls.
//
// INIT and SIPI (SDM vol. 3, 11.6.1 "Interrupt Command Register", 10.4 "Multiple-Processor (MP) Initialization"):
// KVM handles both in the kernel with no exit, and a SIPI would start the vCPU at guest code (vector << 12). The
// proxy therefore carries the BSP flag in its APIC base MSR: on INIT KVM resets it and, as for a BSP, makes it
// runnable at the reset vector 0xFFFFFFF0 — inside the proxy's read-only memslot — whose single instruction OUTs to
// AGGVM_PROXY_PORT_INIT. The thread reports OnRemoteInit, puts the proxy into KVM_MP_STATE_INIT_RECEIVED and stops
// calling KVM_RUN: it polls KVM_GET_MP_STATE instead, which accepts a pending SIPI (CS = vector << 8, RIP = 0)
// without executing anything. It reports OnRemoteSipi(vector) and restores the stub (SREGS, REGS, RUNNABLE).
// Limit: a SIPI that reaches the proxy while it runs the one reset-vector instruction (after INIT was accepted and
// before the thread reached INIT_RECEIVED's poll) is dropped by KVM as a SIPI to a running BSP; docs/proxy.md.
//
// Threading: one thread per proxy, started by Start(); ProxySink is called on those threads (keep it short, no
// blocking). Stop() (also the destructor) ends them, bounded.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "common/types.h"

namespace aggvm::vcpu {

class Kvm;
class Vm;

/// Where the proxies hand what they caught. Called on the proxy's thread.
class ProxySink {
 public:
  virtual ~ProxySink() = default;
  /// A fixed or lowest-priority interrupt with `vector` (32..255) was accepted by the proxy of `remote`.
  virtual void OnRemoteIpi(ApicId remote, Vector vector) = 0;
  virtual void OnRemoteNmi(ApicId remote) = 0;
  virtual void OnRemoteInit(ApicId remote) = 0;
  /// A Startup IPI: the remote vCPU should start in real mode at `vector` << 12.
  virtual void OnRemoteSipi(ApicId remote, uint8_t vector) = 0;
};

/// Counters of one proxy (relaxed atomics, any thread may read).
struct ProxyStats {
  uint64_t ipis = 0;
  uint64_t nmis = 0;
  uint64_t inits = 0;
  uint64_t sipis = 0;
  /// The stub took an exception, shut down, or exited unexpectedly: it was restored (each one is a bug or a guest
  /// that wrote the proxies' stack page).
  uint64_t restores = 0;
  /// KVM_GET_MP_STATE polls while waiting for a SIPI.
  uint64_t sipi_polls = 0;
  /// RIP when the last SIPI was caught: KVM sets 0 when it accepts a SIPI, so 0 proves no instruction at the SIPI
  /// address ran before the stub was restored. UINT64_MAX before the first SIPI.
  uint64_t last_sipi_rip = UINT64_MAX;
};

struct ProxyConfig {
  /// The APIC IDs of the vCPUs that run elsewhere (KVM vCPU id = APIC ID, as for the local vCPUs). At most
  /// AGGVM_PROXY_RW_SIZE / AGGVM_PROXY_STACK_BYTES (64).
  std::vector<ApicId> remote;
  /// Memslot numbers for the stub's read-only and read-write regions (unused by the VM's other memory).
  uint32_t ro_slot = 30;
  uint32_t rw_slot = 31;
};

class ProxySet {
 public:
  /// Maps the stub's memslots into `vm` and creates one proxy vCPU per remote APIC ID. The VM must use the split
  /// irqchip with KVM_X2APIC_API (as ProbeVm in kernel mode does) and must not map [AGGVM_PROXY_RW_GPA, 4 GiB).
  /// `vm` and `sink` must outlive the returned object.
  static absl::StatusOr<std::unique_ptr<ProxySet>> Create(const Kvm& kvm, Vm& vm, ProxyConfig config, ProxySink& sink);
  ~ProxySet();
  ProxySet(const ProxySet&) = delete;
  ProxySet& operator=(const ProxySet&) = delete;

  /// Starts every proxy's thread; returns once each has entered its stub's halt loop (or the error / timeout).
  absl::Status Start();
  /// Ends every proxy thread (kick + join). Idempotent.
  void Stop();
  /// Restricts every started proxy thread to `cpus` (common/thread.h).
  absl::Status Pin(const std::vector<int>& cpus);

  [[nodiscard]] size_t size() const;
  [[nodiscard]] ProxyStats stats(ApicId remote) const;
  /// Whether the stub memslot is read-only (KVM_CAP_READONLY_MEM present). False means a guest could overwrite it.
  [[nodiscard]] bool stub_read_only() const { return read_only_; }

  class Proxy;  // one proxy vCPU and its thread (proxy_vcpu.cc)

 private:
  ProxySet() = default;
  struct Slots;
  std::unique_ptr<Slots> slots_;
  std::vector<std::unique_ptr<Proxy>> proxies_;
  bool read_only_ = false;
};

}  // namespace aggvm::vcpu
