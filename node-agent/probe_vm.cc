#include "node-agent/probe_vm.h"

#include <linux/kvm.h>
#include <sys/ioctl.h>

#include <cerrno>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <span>
#include <variant>

#include <fmt/format.h>

#include "common/clock.h"
#include "vcpu/elf_loader.h"
#include "vcpu/errno_status.h"
#include "vcpu/long_mode.h"

namespace aggvm::agent {

using vcpu::VcpuThread;
using Action = VcpuThread::ExitAction;

namespace {

constexpr uint32_t kIoapicPins = 24;
constexpr uint64_t kUnmappedHole = 0xC0000000;  // the unmapped workload reads here: no memslot may cover it
constexpr size_t kMaxLineChars = 240;
constexpr size_t kMaxConsoleLines = 10000;

/// At most `capacity` items, allocated once; one writer (the vCPU's thread), any number of readers, no lock. The writer
/// fills slot n and then publishes size n + 1 (release); a reader loads the size (acquire) and copies the slots below
/// it, which the writer never touches again. Items beyond the capacity are counted, not stored.
template <typename T>
class BoundedLog {
 public:
  // for_overwrite: no zeroing, so a large capacity costs address space, not memory, until the guest fills it.
  explicit BoundedLog(size_t capacity) : slots_(std::make_unique_for_overwrite<T[]>(capacity)), capacity_(capacity) {}

  /// Writer thread only. No allocation.
  void Append(const T& item) {
    const size_t n = size_.load(std::memory_order_relaxed);
    if (n == capacity_) {
      dropped_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    slots_[n] = item;
    size_.store(n + 1, std::memory_order_release);
  }
  [[nodiscard]] std::vector<T> Snapshot() const {
    const size_t n = size_.load(std::memory_order_acquire);
    return std::vector<T>(slots_.get(), slots_.get() + n);
  }
  [[nodiscard]] uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }

 private:
  std::unique_ptr<T[]> slots_;
  size_t capacity_;
  std::atomic<size_t> size_{0};
  std::atomic<uint64_t> dropped_{0};
};

}  // namespace

struct ProbeVm::VcpuLog {
  VcpuLog(size_t record_capacity, size_t eoi_capacity) : records(record_capacity), eois(eoi_capacity) {}
  BoundedLog<Record> records;
  BoundedLog<Vector> eois;
  std::atomic<uint64_t> nop_exits{0};
  // Valid records received per type, stored or dropped (WaitForRecords counts these). Index = aggvm_record_type.
  std::array<std::atomic<uint64_t>, guest::AGGVM_REC_LAST + 1> received{};
};

namespace {

std::string GuestErrorText(const Record& r) {
  switch (r.a) {
    case guest::AGGVM_GERR_BAD_BOOTINFO:
      return fmt::format("rejected its boot info (details {:#x}, {:#x})", r.b, r.c);
    case guest::AGGVM_GERR_BAD_WORKLOAD:
      return fmt::format("rejected its workload (details {:#x}, {:#x})", r.b, r.c);
    case guest::AGGVM_GERR_EXCEPTION:
      return fmt::format("took exception vector {} at RIP {:#x}", r.b, r.c);
    case guest::AGGVM_GERR_NO_APIC:
      return fmt::format("found no usable local APIC (details {:#x}, {:#x})", r.b, r.c);
    case guest::AGGVM_GERR_TIMEOUT:
      return fmt::format("timed out in step {} (1 = warm-up handshake, 2 = round answers, 3 = AP bring-up) still "
                         "missing {:#x} (bitmask of vCPUs / answers)",
                         r.c, r.b);
    default:
      return fmt::format("reported error code {} (details {:#x}, {:#x})", r.a, r.b, r.c);
  }
}

}  // namespace

absl::StatusOr<guest::aggvm_workload> ParseWorkload(std::string_view name) {
  static constexpr std::pair<std::string_view, guest::aggvm_workload> kNames[] = {
      {"hello", guest::AGGVM_WORKLOAD_HELLO},
      {"ipi-pingpong", guest::AGGVM_WORKLOAD_IPI_PINGPONG},
      {"irq-sink", guest::AGGVM_WORKLOAD_IRQ_SINK},
      {"spin", guest::AGGVM_WORKLOAD_SPIN},
      {"exit-loop", guest::AGGVM_WORKLOAD_EXIT_LOOP},
      {"ipi-broadcast", guest::AGGVM_WORKLOAD_IPI_BROADCAST},
      {"nmi", guest::AGGVM_WORKLOAD_NMI},
      {"ipi-nowhere", guest::AGGVM_WORKLOAD_IPI_NOWHERE},
      {"lowest-priority", guest::AGGVM_WORKLOAD_LOWEST_PRIORITY},
      {"ap-bringup", guest::AGGVM_WORKLOAD_AP_BRINGUP},
      {"bad-port", guest::AGGVM_WORKLOAD_BAD_PORT},
      {"unmapped", guest::AGGVM_WORKLOAD_UNMAPPED},
      {"triple-fault", guest::AGGVM_WORKLOAD_TRIPLE_FAULT},
  };
  for (const auto& [n, w] : kNames) {
    if (n == name) return w;
  }
  return absl::InvalidArgumentError(fmt::format(
      "unknown workload '{}' (hello, ipi-pingpong, irq-sink, spin, exit-loop, ipi-broadcast, nmi, ipi-nowhere, "
      "lowest-priority, ap-bringup, bad-port, unmapped, triple-fault)",
      name));
}

absl::StatusOr<guest::aggvm_dest_kind> ParseDestKind(std::string_view name) {
  static constexpr std::pair<std::string_view, guest::aggvm_dest_kind> kNames[] = {
      {"all-excluding-self", guest::AGGVM_DEST_ALL_EXCLUDING_SELF},
      {"all-including-self", guest::AGGVM_DEST_ALL_INCLUDING_SELF},
      {"physical-broadcast", guest::AGGVM_DEST_PHYSICAL_BROADCAST},
      {"x2apic-logical", guest::AGGVM_DEST_X2APIC_LOGICAL},
  };
  for (const auto& [n, k] : kNames) {
    if (n == name) return k;
  }
  return absl::InvalidArgumentError(fmt::format(
      "unknown destination kind '{}' (all-excluding-self, all-including-self, physical-broadcast, x2apic-logical)",
      name));
}

std::vector<VcpuIndex> ExpectedRecipients(const ProbeVmConfig& config) {
  std::vector<VcpuIndex> out;
  for (uint32_t i = 0; i < config.num_vcpus; ++i) {
    bool hit = false;
    switch (config.dest_kind) {
      case guest::AGGVM_DEST_ALL_EXCLUDING_SELF:
        hit = i != config.ping_vcpu.value();
        break;
      case guest::AGGVM_DEST_ALL_INCLUDING_SELF:
      case guest::AGGVM_DEST_PHYSICAL_BROADCAST:
        hit = true;
        break;
      case guest::AGGVM_DEST_X2APIC_LOGICAL:
        hit = (i >> 4) == (config.dest >> 16) && ((config.dest & 0xFFFF) >> (i & 0xF) & 1) != 0;
        break;
    }
    if (hit) out.push_back(VcpuIndex(i));
  }
  return out;
}

namespace {

bool IsHandshakeVector(uint32_t v, uint32_t num_vcpus) {
  return v == AGGVM_VEC_WARMUP || v == AGGVM_VEC_TIMER || (v >= AGGVM_VEC_READY_BASE && v < AGGVM_VEC_READY_BASE + num_vcpus) ||
         (v >= AGGVM_VEC_ANSWER_BASE && v < AGGVM_VEC_ANSWER_BASE + num_vcpus);
}

/// The workload-specific fields of `config` (the guest checks the same and would stop with BAD_WORKLOAD).
absl::Status ValidateWorkload(const ProbeVmConfig& config) {
  const uint32_t n = config.num_vcpus;
  const uint32_t ping = config.ping_vcpu.value();
  const uint32_t vector = config.ipi_vector.value();
  switch (config.workload) {
    case guest::AGGVM_WORKLOAD_IPI_PINGPONG:
    case guest::AGGVM_WORKLOAD_NMI:
      if (n < 2 || ping >= n || config.pong_vcpu.value() >= n || config.ping_vcpu == config.pong_vcpu) {
        return absl::InvalidArgumentError(
            fmt::format("{} needs two distinct vCPUs below num_vcpus = {} (ping {}, pong {})",
                        config.workload == guest::AGGVM_WORKLOAD_NMI ? "nmi" : "ipi-pingpong", n, config.ping_vcpu,
                        config.pong_vcpu));
      }
      break;
    case guest::AGGVM_WORKLOAD_IPI_BROADCAST:
    case guest::AGGVM_WORKLOAD_LOWEST_PRIORITY: {
      const bool lowest = config.workload == guest::AGGVM_WORKLOAD_LOWEST_PRIORITY;
      if (ping >= n || n > AGGVM_MAX_ANSWER_VCPUS) {
        return absl::InvalidArgumentError(fmt::format(
            "ipi-broadcast / lowest-priority: sender (ping_vcpu) {} must be below num_vcpus = {}, which must be at "
            "most {}",
            ping, n, AGGVM_MAX_ANSWER_VCPUS));
      }
      if (config.dest_kind == guest::AGGVM_DEST_X2APIC_LOGICAL && !config.x2apic) {
        return absl::InvalidArgumentError("dest_kind x2apic-logical needs x2apic = true (xAPIC logical mode would need "
                                          "LDR/DFR set up by the guest; use physical-broadcast or a shorthand)");
      }
      if (lowest && (config.dest_kind != guest::AGGVM_DEST_X2APIC_LOGICAL || !config.x2apic)) {
        return absl::InvalidArgumentError(fmt::format(
            "lowest-priority: dest_kind {} is not supported: use x2apic-logical with x2apic = true (KVM delivers a "
            "lowest-priority physical broadcast to every vCPU; shorthands with lowest priority are model specific, SDM "
            "Vol. 3A 11.6.1)",
            static_cast<int>(config.dest_kind)));
      }
      if (config.dest_kind < guest::AGGVM_DEST_ALL_EXCLUDING_SELF || config.dest_kind > guest::AGGVM_DEST_X2APIC_LOGICAL) {
        return absl::InvalidArgumentError(fmt::format("dest_kind {} is unknown", static_cast<int>(config.dest_kind)));
      }
      if (config.expected_answers && *config.expected_answers > n) {
        return absl::InvalidArgumentError(fmt::format("expected_answers = {} exceeds num_vcpus = {}",
                                                      *config.expected_answers, n));
      }
      if (config.tpr.size() > n) {
        return absl::InvalidArgumentError(fmt::format("tpr has {} entries for {} vCPUs", config.tpr.size(), n));
      }
      for (size_t i = 0; i < config.tpr.size(); ++i) {
        if ((config.tpr[i] >> 4) >= (vector >> 4)) {
          return absl::InvalidArgumentError(fmt::format(
              "tpr[{}] = {:#x} would block ipi_vector {:#x} (its priority class must be below the vector's, SDM Vol. "
              "3A 11.8.3.1)",
              i, config.tpr[i], vector));
        }
      }
      break;
    }
    case guest::AGGVM_WORKLOAD_IPI_NOWHERE:
      if (ping >= n || config.nowhere_apic_id < n || (!config.x2apic && config.nowhere_apic_id >= 0xFF)) {
        return absl::InvalidArgumentError(fmt::format(
            "ipi-nowhere: nowhere_apic_id {} must be an APIC ID no vCPU has (>= num_vcpus = {}; xAPIC: < 0xFF, the "
            "broadcast ID), sender {}",
            config.nowhere_apic_id, n, ping));
      }
      break;
    default:
      break;
  }
  const bool uses_vector = config.workload == guest::AGGVM_WORKLOAD_IPI_PINGPONG ||
                           config.workload == guest::AGGVM_WORKLOAD_NMI ||
                           config.workload == guest::AGGVM_WORKLOAD_IPI_BROADCAST ||
                           config.workload == guest::AGGVM_WORKLOAD_LOWEST_PRIORITY ||
                           config.workload == guest::AGGVM_WORKLOAD_IPI_NOWHERE;
  if (uses_vector && (vector < 32 || vector > 254 || IsHandshakeVector(vector, n))) {
    return absl::InvalidArgumentError(fmt::format(
        "ipi_vector {:#x} must be in 0x20..0xfe and differ from the handshake vectors ({:#x}, {:#x}.., {:#x}..)",
        vector, AGGVM_VEC_WARMUP, AGGVM_VEC_READY_BASE, AGGVM_VEC_ANSWER_BASE));
  }
  return absl::OkStatus();
}

/// Copies the AP trampoline named by the image header at entry + AGGVM_IMAGE_HEADER_OFFSET to AGGVM_TRAMPOLINE_GPA.
/// An image without the header gets none (NotFound).
absl::Status InstallTrampoline(vcpu::GuestMemory& mem, uint64_t entry) {
  struct Header {
    uint32_t magic, gpa, size, reserved;
  };
  auto h = mem.ReadObject<Header>(GuestAddress(entry + AGGVM_IMAGE_HEADER_OFFSET));
  if (!h.ok() || h->magic != AGGVM_IMAGE_HEADER_MAGIC) {
    return absl::NotFoundError(fmt::format("the guest image has no header at entry {:#x} + {} (no AP trampoline)",
                                           entry, AGGVM_IMAGE_HEADER_OFFSET));
  }
  if (h->size == 0 || h->size > AGGVM_TRAMPOLINE_MAX || h->gpa < AGGVM_IMAGE_MIN_GPA) {
    return absl::InvalidArgumentError(fmt::format(
        "the guest image's AP trampoline at GPA {:#x}, {} bytes, is not inside the image or larger than {} bytes",
        h->gpa, h->size, AGGVM_TRAMPOLINE_MAX));
  }
  auto bytes = mem.Slice(GuestAddress(h->gpa), h->size);
  if (!bytes.ok()) return bytes.status();
  const std::vector<uint8_t> copy(bytes->begin(), bytes->end());
  return mem.Write(GuestAddress(AGGVM_TRAMPOLINE_GPA), copy);
}

}  // namespace

ProbeVm::ProbeVm(ProbeVmConfig config, vcpu::Kvm kvm, vcpu::Vm vm, vcpu::GuestMemory mem)
    : config_(std::move(config)), kvm_(std::move(kvm)), vm_(std::move(vm)), mem_(std::move(mem)) {
  console_lines_.resize(config_.num_vcpus);
  done_status_.resize(config_.num_vcpus);
  partial_lines_.resize(config_.num_vcpus);
  slot_of_.assign(config_.num_vcpus, -1);
  logs_.resize(config_.num_vcpus);
  if (config_.local_vcpus.empty()) {
    for (uint32_t i = 0; i < config_.num_vcpus; ++i) config_.local_vcpus.push_back(VcpuIndex(i));
  }
  local_ = config_.local_vcpus;
  for (size_t s = 0; s < local_.size(); ++s) {
    slot_of_[local_[s].value()] = static_cast<int>(s);
    logs_[local_[s].value()] = std::make_unique<VcpuLog>(config_.max_records_per_vcpu, config_.max_eois_per_vcpu);
  }
}

ProbeVm::~ProbeVm() {
  Stop();
  threads_.clear();  // joins
}

absl::StatusOr<std::unique_ptr<ProbeVm>> ProbeVm::Create(ProbeVmConfig config) {
  if (config.num_vcpus == 0 || config.num_vcpus > AGGVM_MAX_VCPUS) {
    return absl::InvalidArgumentError(
        fmt::format("num_vcpus = {}: the probe guest supports 1..{} vCPUs", config.num_vcpus, AGGVM_MAX_VCPUS));
  }
  if (config.memory_bytes < (4ull << 20) || config.memory_bytes > kUnmappedHole || config.memory_bytes % 4096) {
    return absl::InvalidArgumentError(fmt::format(
        "memory_bytes = {}: need a multiple of 4096 between 4 MiB and 3 GiB (0xC0000000 must stay unmapped)",
        config.memory_bytes));
  }
  if (auto s = ValidateWorkload(config); !s.ok()) return s;
  if (config.workload == guest::AGGVM_WORKLOAD_AP_BRINGUP) config.ap_startup = ApStartup::kSipi;
  for (const VcpuIndex h : config.held_vcpus) {
    if (h.value() >= config.num_vcpus) {
      return absl::InvalidArgumentError(fmt::format("held_vcpus: {} is not below num_vcpus = {}", h, config.num_vcpus));
    }
  }
  for (size_t i = 0; i < config.local_vcpus.size(); ++i) {
    const uint32_t v = config.local_vcpus[i].value();
    if (v >= config.num_vcpus || (i > 0 && v <= config.local_vcpus[i - 1].value())) {
      return absl::InvalidArgumentError(fmt::format(
          "local_vcpus[{}] = {}: the local vCPUs must be ascending, distinct and below num_vcpus = {}", i, v,
          config.num_vcpus));
    }
  }
  if (config.max_records_per_vcpu > kMaxReportCapacity || config.max_eois_per_vcpu > kMaxReportCapacity) {
    return absl::InvalidArgumentError(fmt::format(
        "max_records_per_vcpu = {}, max_eois_per_vcpu = {}: each must be at most {} (the store is allocated up front)",
        config.max_records_per_vcpu, config.max_eois_per_vcpu, kMaxReportCapacity));
  }
  if ((!config.forwarded_ports.empty() || !config.forwarded_mmio.empty()) && !config.forward_io) {
    return absl::InvalidArgumentError("forwarded port / MMIO windows are set but forward_io is empty");
  }
  auto image_bytes = vcpu::ReadWholeFile(config.guest_elf);
  if (!image_bytes.ok()) return image_bytes.status();
  auto image = vcpu::ParseElf(*image_bytes, GuestAddress(AGGVM_IMAGE_MIN_GPA), GuestAddress(config.memory_bytes));
  if (!image.ok()) {
    return absl::InvalidArgumentError(fmt::format("guest image {}: {}", config.guest_elf, std::string(image.status().message())));
  }

  auto kvm = vcpu::Kvm::Open();
  if (!kvm.ok()) return kvm.status();
  const bool user = config.irqchip == vcpu::IrqchipMode::kUser;
  using Cap = std::pair<long, const char*>;
  static constexpr Cap kCommonCaps[] = {{KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"},
                                        {KVM_CAP_SYNC_REGS, "KVM_CAP_SYNC_REGS"}};
  static constexpr Cap kKernelCaps[] = {{KVM_CAP_SPLIT_IRQCHIP, "KVM_CAP_SPLIT_IRQCHIP"},
                                        {KVM_CAP_SIGNAL_MSI, "KVM_CAP_SIGNAL_MSI"},
                                        {KVM_CAP_IRQFD, "KVM_CAP_IRQFD"},
                                        {KVM_CAP_IRQ_ROUTING, "KVM_CAP_IRQ_ROUTING"},
                                        {KVM_CAP_X2APIC_API, "KVM_CAP_X2APIC_API"}};
  static constexpr Cap kUserCaps[] = {{KVM_CAP_X86_USER_SPACE_MSR, "KVM_CAP_X86_USER_SPACE_MSR"},
                                      {KVM_CAP_X86_MSR_FILTER, "KVM_CAP_X86_MSR_FILTER"}};
  for (auto [cap, name] : kCommonCaps) {
    if (auto s = kvm->RequireExtension(cap, name); !s.ok()) return s;
  }
  for (auto [cap, name] : user ? std::span<const Cap>(kUserCaps) : std::span<const Cap>(kKernelCaps)) {
    if (auto s = kvm->RequireExtension(cap, name); !s.ok()) {
      return absl::FailedPreconditionError(fmt::format("irqchip mode '{}': {}", vcpu::IrqchipModeName(config.irqchip),
                                                       std::string(s.message())));
    }
  }
  auto vm = kvm->CreateVm();
  if (!vm.ok()) return vm.status();
  if (user) {
    // No KVM_CREATE_IRQCHIP / split irqchip: LAPIC accesses and HLT exit to userspace.
    if (auto s = vcpu::UserIrqchip::ConfigureVm(*vm); !s.ok()) return s;
  } else {
    if (auto s = vm->EnableSplitIrqchip(kIoapicPins); !s.ok()) return s;
    if (auto s = vm->EnableX2apicApi(KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK);
        !s.ok()) {
      return s;
    }
  }
  auto mem = vcpu::GuestMemory::Create(*vm, 0, GuestAddress(0), config.memory_bytes);
  if (!mem.ok()) return mem.status();
  if (auto s = vcpu::WriteLongModeTables(*mem); !s.ok()) return s;
  if (auto s = vcpu::LoadElf(*image, *image_bytes, *mem); !s.ok()) return s;
  const uint64_t entry = image->entry;
  // Every node installs the trampoline itself: guest memory is not coherent across nodes.
  if (auto s = InstallTrampoline(*mem, entry); !s.ok() && config.ap_startup == ApStartup::kSipi) {
    return absl::InvalidArgumentError(fmt::format("guest image {}: {}", config.guest_elf, std::string(s.message())));
  }
  std::unique_ptr<ProbeVm> pvm(new ProbeVm(std::move(config), *std::move(kvm), *std::move(vm), *std::move(mem)));
  if (auto s = pvm->SetUpVcpus(); !s.ok()) return s;
  if (user) {
    pvm->injector_ = std::make_unique<vcpu::UserIrqchipInjector>(*pvm->user_irqchip_);
  } else {
    pvm->injector_ = std::make_unique<vcpu::KernelIrqchipInjector>(pvm->vm_);
  }

  // BootInfo last: it carries the TSC frequency read from a vCPU.
  guest::aggvm_boot_info bi{};
  bi.magic = AGGVM_BOOTINFO_MAGIC;
  bi.version = AGGVM_BOOTINFO_VERSION;
  bi.num_vcpus = pvm->config_.num_vcpus;
  bi.workload = pvm->config_.workload;
  bi.flags = (pvm->config_.x2apic ? AGGVM_BOOT_X2APIC : 0) | (pvm->config_.uart_console ? AGGVM_BOOT_UART_CONSOLE : 0);
  bi.iterations = pvm->config_.iterations;
  bi.ping_vcpu = pvm->config_.ping_vcpu.value();
  bi.pong_vcpu = pvm->config_.pong_vcpu.value();
  bi.ipi_vector = pvm->config_.ipi_vector.value();
  bi.tsc_khz = pvm->tsc_khz_;
  for (uint32_t i = 0; i < bi.num_vcpus; ++i) bi.apic_ids[i] = pvm->apic_id(VcpuIndex(i)).value();
  const ProbeVmConfig& c = pvm->config_;
  bi.dest_kind = c.dest_kind;
  bi.dest = c.dest;
  if (c.workload == guest::AGGVM_WORKLOAD_LOWEST_PRIORITY) {
    bi.expected_answers = c.expected_answers.value_or(1);
  } else {
    bi.expected_answers = c.expected_answers.value_or(static_cast<uint32_t>(ExpectedRecipients(c).size()));
  }
  bi.nowhere_apic_id = c.nowhere_apic_id;
  bi.timeout_ms = c.timeout_ms;
  for (size_t i = 0; i < c.tpr.size(); ++i) bi.tpr[i] = c.tpr[i];
  if (auto s = pvm->mem_.WriteObject(GuestAddress(AGGVM_BOOTINFO_GPA), bi); !s.ok()) return s;

  for (size_t s = 0; s < pvm->local_.size(); ++s) {
    pvm->vcpus_[s].StageRegs(vcpu::BootRegs(entry, pvm->local_[s], GuestAddress(AGGVM_BOOTINFO_GPA)));
  }
  return pvm;
}

absl::Status ProbeVm::SetUpVcpus() {
  auto cpuid = kvm_.SupportedCpuid();
  if (!cpuid.ok()) return cpuid.status();
  const bool user = config_.irqchip == vcpu::IrqchipMode::kUser;
  vcpus_.reserve(local_.size());
  for (const VcpuIndex index : local_) {
    const uint32_t i = index.value();
    auto v = vm_.CreateVcpu(apic_id(index));
    if (!v.ok()) return v.status();
    std::vector<kvm_cpuid_entry2> cpuid_entries = vcpu::CpuidForVcpu(*cpuid, v->id());
    if (user) {
      // CPUID.1:ECX bit 21 x2APIC (the model has it), bit 24 TSC-deadline (the user irqchip does not arm it).
      for (auto& e : cpuid_entries) {
        if (e.function == 1) e.ecx = (e.ecx | (1u << 21)) & ~(1u << 24);
      }
    }
    if (auto s = v->SetCpuid(cpuid_entries); !s.ok()) return s;
    auto sregs = v->GetSregs();
    if (!sregs.ok()) return sregs.status();
    if (auto s = v->SetSregs(vcpu::LongModeSregs(*sregs)); !s.ok()) return s;
    // With the in-kernel LAPIC every vCPU but the BSP (KVM vCPU id 0) waits for INIT/SIPI
    // (KVM_MP_STATE_UNINITIALIZED, arch/x86/kvm/x86.c kvm_arch_vcpu_create); start them directly, or (kSipi) say
    // so explicitly and let the guest's INIT-SIPI-SIPI start them. Without one (user mode) KVM makes every vCPU
    // runnable; the user irqchip holds the APs (below).
    if (i != 0 && !user) {
      const bool sipi = config_.ap_startup == ApStartup::kSipi;
      if (auto s = v->SetMpState(sipi ? KVM_MP_STATE_UNINITIALIZED : KVM_MP_STATE_RUNNABLE); !s.ok()) return s;
    }
    v->EnableSyncRegs();
    vcpus_.push_back(*std::move(v));
  }
  auto khz = vcpus_[0].TscKhz();
  tsc_khz_ = khz.ok() ? *khz : 0;
  // Guest TSC - host TSC, read once before the vCPUs run (IA32_TIME_STAMP_COUNTER, MSR 0x10; SDM vol. 3, 17.17).
  // The ioctl takes a few microseconds: the offset is exact to about that.
  const uint64_t host_before = ReadTsc();
  auto guest_tsc = vcpus_[0].GetMsr(0x10);
  const uint64_t host_after = ReadTsc();
  if (guest_tsc.ok()) {
    tsc_offset_ = static_cast<int64_t>(*guest_tsc - (host_before + (host_after - host_before) / 2));
  }
  if (user) {
    std::vector<ApicId> ids;
    for (const VcpuIndex index : local_) ids.push_back(apic_id(index));
    user_irqchip_ = std::make_unique<vcpu::UserIrqchip>(ids, vcpu::UserIrqchip::Options{tsc_khz_});
  }
  threads_.reserve(local_.size());
  for (size_t s = 0; s < local_.size(); ++s) {
    const uint32_t i = local_[s].value();
    const VcpuIndex slot(static_cast<uint32_t>(s));  // the user irqchip knows only the local vCPUs
    vcpu::VcpuInterruptHooks* hooks = user ? &user_irqchip_->hooks(slot) : nullptr;
    threads_.push_back(std::make_unique<VcpuThread>(
        vcpus_[s], [this, i](vcpu::VcpuExit& exit) { return HandleExit(i, exit); }, hooks));
    if (user) user_irqchip_->Attach(slot, vcpus_[s], *threads_.back());
    // User mode, kSipi: the AP waits for INIT-SIPI in the userspace LAPIC model (its thread does not enter the guest).
    if (user && i != 0 && config_.ap_startup == ApStartup::kSipi) user_irqchip_->HoldUntilSipi(slot);
  }
  return absl::OkStatus();
}

absl::Status ProbeVm::Start() {
  for (size_t s = 0; s < threads_.size(); ++s) {
    const bool held = std::find(config_.held_vcpus.begin(), config_.held_vcpus.end(), local_[s]) !=
                      config_.held_vcpus.end();
    if (held || threads_[s]->started()) continue;
    if (auto st = threads_[s]->Start(); !st.ok()) {
      Stop();
      return st;
    }
  }
  return absl::OkStatus();
}

absl::Status ProbeVm::PinVcpus(const std::vector<int>& cpus) {
  if (cpus.empty()) return absl::OkStatus();
  for (auto& t : threads_) {
    if (!t->started()) continue;
    if (auto s = t->Pin(cpus); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status ProbeVm::StartVcpu(VcpuIndex index) {
  if (!is_local(index)) return absl::InvalidArgumentError(fmt::format("vCPU {} does not run on this node", index));
  VcpuThread& t = *threads_[Slot(index.value())];
  if (t.started()) return absl::FailedPreconditionError(fmt::format("vCPU {} already started", index));
  return t.Start();
}

absl::StatusOr<uint32_t> ProbeVm::MpState(VcpuIndex index) const {
  if (!is_local(index)) return absl::InvalidArgumentError(fmt::format("vCPU {} does not run on this node", index));
  kvm_mp_state mp{};
  if (::ioctl(vcpus_[Slot(index.value())].fd(), KVM_GET_MP_STATE, &mp) < 0) {
    return vcpu::ErrnoStatus(errno, fmt::format("KVM_GET_MP_STATE on vCPU {}", index));
  }
  return mp.mp_state;
}

absl::Status ProbeVm::Pause(absl::Duration timeout) {
  for (auto& t : threads_) t->Pause();
  for (size_t s = 0; s < threads_.size(); ++s) {
    if (!threads_[s]->started()) continue;
    if (!threads_[s]->WaitForState(VcpuThread::State::kPaused, timeout)) {
      const absl::Status err = error();
      return absl::FailedPreconditionError(fmt::format("vCPU {} did not pause within {}{}", local_[s],
                                                       absl::FormatDuration(timeout),
                                                       err.ok() ? "" : fmt::format(" (the VM failed: {})", std::string(err.message()))));
    }
  }
  return absl::OkStatus();
}

void ProbeVm::Resume() {
  for (auto& t : threads_) t->Resume();
}

uint64_t ProbeVm::exits() const {
  uint64_t n = 0;
  for (const auto& t : threads_) n += t->exits();
  return n;
}

void ProbeVm::Stop() {
  for (auto& t : threads_) t->Stop();
  for (auto& t : threads_) {
    if (t->started()) (void)t->WaitStopped(absl::Seconds(10));
  }
}

absl::Status ProbeVm::error() const {
  std::lock_guard l(mu_);
  return error_;
}

VcpuReport ProbeVm::report(VcpuIndex index) const {
  VcpuReport r;
  {
    std::lock_guard l(mu_);
    r.console_lines = console_lines_.at(index.value());
    r.done_status = done_status_.at(index.value());
  }
  if (const VcpuLog* log = logs_.at(index.value()).get()) {
    r.records = log->records.Snapshot();
    r.ioapic_eois = log->eois.Snapshot();
    r.nop_exits = log->nop_exits.load(std::memory_order_relaxed);
    r.dropped_records = log->records.dropped();
    r.dropped_eois = log->eois.dropped();
  }
  return r;
}

uint64_t ProbeVm::dropped_records() const {
  uint64_t n = 0;
  for (const auto& log : logs_) n += log ? log->records.dropped() : 0;
  return n;
}

uint64_t ProbeVm::dropped_eois() const {
  uint64_t n = 0;
  for (const auto& log : logs_) n += log ? log->eois.dropped() : 0;
  return n;
}

uint64_t ProbeVm::Heartbeat(VcpuIndex index) {
  auto s = mem_.Slice(GuestAddress(AGGVM_STATUS_GPA + 8ull * index.value()), 8);
  if (!s.ok()) return 0;
  return std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(s->data())).load(std::memory_order_relaxed);
}

absl::Status ProbeVm::WaitDone(absl::Duration timeout) {
  std::unique_lock l(mu_);
  const bool ok = cv_.wait_for(l, absl::ToChronoNanoseconds(timeout),
                               [&] { return !error_.ok() || done_count_ == local_.size(); });
  if (!error_.ok()) return error_;
  if (!ok) {
    return absl::DeadlineExceededError(fmt::format("{} of {} local vCPUs reported DONE within {}", done_count_,
                                                   local_.size(), absl::FormatDuration(timeout)));
  }
  return absl::OkStatus();
}

absl::Status ProbeVm::WaitForRecords(VcpuIndex index, guest::aggvm_record_type type, size_t count,
                                     absl::Duration timeout) {
  if (!is_local(index)) {
    return absl::InvalidArgumentError(fmt::format("vCPU {} does not run on this node", index));
  }
  if (type < guest::AGGVM_REC_HELLO || type > guest::AGGVM_REC_LAST) {
    return absl::InvalidArgumentError(fmt::format("record type {} is not a probe record type", static_cast<int>(type)));
  }
  const std::atomic<uint64_t>& received = logs_.at(index.value())->received[type];
  // seq_cst with HandleRecord's store + load of record_waiters_: either it sees this waiter and notifies under mu_, or
  // this waiter's check below sees its record.
  const auto have = [&] { return received.load(std::memory_order_seq_cst); };
  std::unique_lock l(mu_);
  record_waiters_.fetch_add(1, std::memory_order_seq_cst);
  const bool ok = cv_.wait_for(l, absl::ToChronoNanoseconds(timeout), [&] { return !error_.ok() || have() >= count; });
  record_waiters_.fetch_sub(1, std::memory_order_relaxed);
  if (!error_.ok()) return error_;
  if (!ok) {
    return absl::DeadlineExceededError(fmt::format("vCPU {} sent {} of {} records of type {} within {}", index, have(),
                                                   count, static_cast<int>(type), absl::FormatDuration(timeout)));
  }
  return absl::OkStatus();
}

Action ProbeVm::Fail(uint32_t index, absl::Status status) {
  bool first = false;
  {
    std::lock_guard l(mu_);
    if (error_.ok()) {
      error_ = status;
      first = true;
    }
  }
  cv_.notify_all();
  if (first && config_.on_error) config_.on_error(status);
  // End the whole VM: the other vCPUs are kicked out (non-blocking); this one finishes by returning.
  for (size_t s = 0; s < threads_.size(); ++s) {
    if (local_[s].value() != index) threads_[s]->Stop();
  }
  return Action::Finish(std::move(status));
}

Action ProbeVm::HandleRecord(uint32_t index, uint32_t gpa) {
  const uint64_t rip = vcpus_[Slot(index)].regs().rip;
  if (gpa % 8 != 0) {
    return Fail(index, absl::InvalidArgumentError(fmt::format(
                           "vCPU {} sent a record at unaligned GPA {:#x} (RIP {:#x}); records must be 8-byte aligned",
                           index, gpa, rip)));
  }
  auto rec = mem_.ReadObject<Record>(GuestAddress(gpa));
  if (!rec.ok()) {
    return Fail(index, absl::InvalidArgumentError(
                           fmt::format("vCPU {} sent a record at GPA {:#x} outside guest memory (RIP {:#x}): {}", index,
                                       gpa, rip, std::string(rec.status().message()))));
  }
  if (rec->magic != AGGVM_RECORD_MAGIC || rec->type < guest::AGGVM_REC_HELLO ||
      rec->type > guest::AGGVM_REC_LAST || rec->vcpu != index) {
    return Fail(index, absl::InvalidArgumentError(fmt::format(
                           "vCPU {} sent an invalid record at GPA {:#x}: magic {:#x} (want {:#x}), type {}, vcpu {}",
                           index, gpa, rec->magic, AGGVM_RECORD_MAGIC, rec->type, rec->vcpu)));
  }
  if (rec->type == guest::AGGVM_REC_ERROR) {
    return Fail(index, absl::AbortedError(fmt::format("guest vCPU {} {}", index, GuestErrorText(*rec))));
  }
  if (config_.on_record) config_.on_record(VcpuIndex(index), *rec);
  // No lock and no allocation here: the store is this vCPU's own, and mu_ is taken only when someone waits.
  VcpuLog& log = *logs_[index];
  log.records.Append(*rec);
  auto& received = log.received[rec->type];
  received.store(received.load(std::memory_order_relaxed) + 1, std::memory_order_seq_cst);  // single writer
  if (record_waiters_.load(std::memory_order_seq_cst) != 0) {
    { std::lock_guard l(mu_); }  // a waiter that missed the count above is inside cv_.wait now
    cv_.notify_all();
  }
  return Action::Continue();
}

std::optional<Action> ProbeVm::MaybeForward(uint32_t index, vcpu::VcpuExit& exit) {
  if (!config_.forward_io) return std::nullopt;
  ForwardedAccess a;
  std::span<uint8_t> read_into;
  const auto in_ports = [&](uint64_t port) {
    for (auto [first, last] : config_.forwarded_ports) {
      if (port >= first && port <= last) return true;
    }
    return false;
  };
  const auto in_mmio = [&](uint64_t gpa) {
    for (auto [first, last] : config_.forwarded_mmio) {
      if (gpa >= first && gpa <= last) return true;
    }
    return false;
  };
  if (auto* out = std::get_if<vcpu::IoOut>(&exit)) {
    if (!in_ports(out->port) || out->count != 1) return std::nullopt;
    a = {.mmio = false, .is_write = true, .size = out->size, .address = out->port, .data = out->Value()};
  } else if (auto* in = std::get_if<vcpu::IoIn>(&exit)) {
    if (!in_ports(in->port) || in->count != 1) return std::nullopt;
    a = {.mmio = false, .is_write = false, .size = in->size, .address = in->port, .data = 0};
    read_into = in->data.first(in->size);
  } else if (auto* mr = std::get_if<vcpu::MmioRead>(&exit)) {
    if (!in_mmio(mr->gpa.raw()) || mr->data.size() > 8) return std::nullopt;
    a = {.mmio = true, .is_write = false, .size = static_cast<uint8_t>(mr->data.size()), .address = mr->gpa.raw()};
    read_into = mr->data;
  } else if (auto* mw = std::get_if<vcpu::MmioWrite>(&exit)) {
    if (!in_mmio(mw->gpa.raw()) || mw->data.size() > 8) return std::nullopt;
    uint64_t v = 0;
    std::memcpy(&v, mw->data.data(), mw->data.size());
    a = {.mmio = true, .is_write = true, .size = static_cast<uint8_t>(mw->data.size()), .address = mw->gpa.raw(),
         .data = v};
  } else {
    return std::nullopt;
  }
  forwarded_.fetch_add(1, std::memory_order_relaxed);
  auto r = config_.forward_io(VcpuIndex(index), a);
  if (!r.ok()) {
    return Fail(index, absl::Status(r.status().code(),
                                    fmt::format("vCPU {}: forwarded access ({}) failed: {}", index,
                                                vcpu::DescribeExit(exit), std::string(r.status().message()))));
  }
  if (!read_into.empty()) {
    const uint64_t v = *r;
    std::memcpy(read_into.data(), &v, std::min(read_into.size(), sizeof v));  // x86 is little-endian
  }
  return Action::Continue();
}

Action ProbeVm::HandleExit(uint32_t index, vcpu::VcpuExit& exit) {
  const uint64_t rip = vcpus_[Slot(index)].regs().rip;
  if (auto forwarded = MaybeForward(index, exit)) return *std::move(forwarded);
  if (auto* out = std::get_if<vcpu::IoOut>(&exit)) {
    if (out->count != 1) {
      return Fail(index, absl::InvalidArgumentError(fmt::format(
                             "vCPU {} used a string OUT ({}) at RIP {:#x}; the probe ports take single OUTs", index,
                             vcpu::DescribeExit(exit), rip)));
    }
    switch (out->port) {
      case AGGVM_PORT_CONSOLE: {
        std::string& line = partial_lines_[index];
        const char c = static_cast<char>(out->Value() & 0xFF);
        if (c != '\n') line.push_back(c);
        if (c == '\n' || line.size() >= kMaxLineChars) {
          if (config_.on_console_line) config_.on_console_line(VcpuIndex(index), line);
          {
            std::lock_guard l(mu_);
            auto& lines = console_lines_[index];
            if (lines.size() < kMaxConsoleLines) lines.push_back(std::move(line));
          }
          line.clear();
          cv_.notify_all();
        }
        return Action::Continue();
      }
      case AGGVM_PORT_RECORD:
        if (out->size != 4) break;
        return HandleRecord(index, out->Value());
      case AGGVM_PORT_DONE: {
        if (out->size != 4) break;
        const uint32_t status = out->Value();
        if (status != 0) {
          return Fail(index, absl::AbortedError(fmt::format("guest vCPU {} finished with status {}", index, status)));
        }
        {
          std::lock_guard l(mu_);
          if (!done_status_[index]) ++done_count_;
          done_status_[index] = status;
        }
        cv_.notify_all();
        return Action::Continue();  // the guest idles; Stop() ends it
      }
      case AGGVM_PORT_NOP: {
        auto& n = logs_[index]->nop_exits;
        n.store(n.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);  // single writer
        return Action::Continue();
      }
      default:
        break;
    }
    return Fail(index, absl::InvalidArgumentError(fmt::format(
                           "vCPU {} accessed unknown port: {} at RIP {:#x} (probe ports are {:#x}..{:#x})", index,
                           vcpu::DescribeExit(exit), rip, AGGVM_PORT_CONSOLE, AGGVM_PORT_NOP)));
  }
  if (auto* eoi = std::get_if<vcpu::IoapicEoi>(&exit)) {
    if (config_.on_ioapic_eoi) config_.on_ioapic_eoi(VcpuIndex(index), eoi->vector);
    logs_[index]->eois.Append(eoi->vector);  // nobody waits on EOIs: no notify
    return Action::Continue();
  }
  if (std::holds_alternative<vcpu::IrqWindowOpen>(exit)) return Action::Continue();
  if (std::holds_alternative<vcpu::IoIn>(exit)) {
    return Fail(index, absl::InvalidArgumentError(fmt::format("vCPU {} accessed unknown port: {} at RIP {:#x}", index,
                                                              vcpu::DescribeExit(exit), rip)));
  }
  if (std::holds_alternative<vcpu::MmioRead>(exit) || std::holds_alternative<vcpu::MmioWrite>(exit)) {
    return Fail(index, absl::InvalidArgumentError(
                           fmt::format("vCPU {} accessed unmapped guest-physical memory: {} at RIP {:#x}", index,
                                       vcpu::DescribeExit(exit), rip)));
  }
  if (std::holds_alternative<vcpu::Shutdown>(exit)) {
    return Fail(index, absl::AbortedError(fmt::format(
                           "vCPU {} shut down (triple fault) near RIP {:#x}; the guest faulted while delivering a fault",
                           index, rip)));
  }
  return Fail(index, absl::InternalError(
                         fmt::format("vCPU {} stopped on {} at RIP {:#x}", index, vcpu::DescribeExit(exit), rip)));
}

}  // namespace aggvm::agent
