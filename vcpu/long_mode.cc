#include "vcpu/long_mode.h"

#include <array>

#include "guest/abi.h"
#include "vcpu/guest_memory.h"

namespace aggvm::vcpu {
namespace {

constexpr uint64_t kPdptGpa = AGGVM_PML4_GPA + 0x1000;
constexpr uint64_t kPdGpa = AGGVM_PML4_GPA + 0x2000;  // 4 page directories, one per GiB
constexpr uint64_t kPtePresentWrite = 0x3;
constexpr uint64_t kPtePageSize = 0x80;  // PS: 2 MiB page in a PDE
constexpr uint32_t kTssLimit = 0x67;     // 104-byte 64-bit TSS (SDM vol. 3, 8.7)

static_assert(kPdGpa + 4 * 0x1000 <= 0xF000, "page tables end below 0xF000 as guest/abi.h promises");
static_assert(AGGVM_GDT_GPA + 6 * 8 <= AGGVM_TSS_GPA);

// 64-bit code: L=1, D=0, P, DPL0, S, type execute/read; data: P, S, type read/write, G, D/B.
constexpr uint64_t kCodeDescriptor = 0x00AF9A000000FFFFull;
constexpr uint64_t kDataDescriptor = 0x00CF92000000FFFFull;

std::array<uint64_t, 2> TssDescriptor(uint64_t base, uint32_t limit) {
  // SDM vol. 3, 8.2.3 "TSS Descriptor in 64-bit mode": type 9 (available 64-bit TSS), P=1.
  uint64_t lo = (limit & 0xFFFFull) | ((base & 0xFFFFFFull) << 16) | (0x89ull << 40) |
                ((static_cast<uint64_t>(limit) >> 16 & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
  return {lo, base >> 32};
}

kvm_segment Segment(uint16_t selector, uint8_t type, bool code) {
  kvm_segment s{};
  s.base = 0;
  s.limit = 0xFFFFFFFF;
  s.selector = selector;
  s.type = type;
  s.present = 1;
  s.dpl = 0;
  s.db = code ? 0 : 1;
  s.s = 1;
  s.l = code ? 1 : 0;
  s.g = 1;
  return s;
}

}  // namespace

absl::Status WriteLongModeTables(GuestMemory& mem) {
  const std::array<uint64_t, 5> gdt = {0, kCodeDescriptor, kDataDescriptor, TssDescriptor(AGGVM_TSS_GPA, kTssLimit)[0],
                                       TssDescriptor(AGGVM_TSS_GPA, kTssLimit)[1]};
  if (auto s = mem.WriteObject(GuestAddress(AGGVM_GDT_GPA), gdt); !s.ok()) return s;
  std::array<uint8_t, kTssLimit + 1> tss{};
  tss[102] = kTssLimit + 1;  // I/O map base beyond the limit: no I/O permission bitmap
  if (auto s = mem.WriteObject(GuestAddress(AGGVM_TSS_GPA), tss); !s.ok()) return s;

  std::array<uint64_t, 512> table{};
  table[0] = kPdptGpa | kPtePresentWrite;
  if (auto s = mem.WriteObject(GuestAddress(AGGVM_PML4_GPA), table); !s.ok()) return s;
  table = {};
  for (uint64_t i = 0; i < 4; ++i) table[i] = (kPdGpa + i * 0x1000) | kPtePresentWrite;
  if (auto s = mem.WriteObject(GuestAddress(kPdptGpa), table); !s.ok()) return s;
  for (uint64_t gib = 0; gib < 4; ++gib) {
    for (uint64_t i = 0; i < 512; ++i) {
      table[i] = ((gib << 30) + (i << 21)) | kPtePresentWrite | kPtePageSize;
    }
    if (auto s = mem.WriteObject(GuestAddress(kPdGpa + gib * 0x1000), table); !s.ok()) return s;
  }
  return absl::OkStatus();
}

kvm_sregs LongModeSregs(const kvm_sregs& current) {
  kvm_sregs s = current;
  s.cs = Segment(AGGVM_SEL_CODE64, 0xB, true);  // execute/read, accessed
  s.ds = s.es = s.fs = s.gs = s.ss = Segment(AGGVM_SEL_DATA, 0x3, false);  // read/write, accessed
  s.tr = {};
  s.tr.base = AGGVM_TSS_GPA;
  s.tr.limit = kTssLimit;
  s.tr.selector = AGGVM_SEL_TSS;
  s.tr.type = 0xB;  // busy 64-bit TSS, as after LTR
  s.tr.present = 1;
  s.ldt = {};
  s.ldt.unusable = 1;
  s.gdt.base = AGGVM_GDT_GPA;
  s.gdt.limit = 5 * 8 - 1;
  s.idt.base = 0;
  s.idt.limit = 0;
  s.cr0 = kCr0LongMode;
  s.cr3 = AGGVM_PML4_GPA;
  s.cr4 = kCr4LongMode;
  s.efer = kEferLongMode;
  return s;
}

kvm_regs BootRegs(uint64_t entry, VcpuIndex index, GuestAddress boot_info) {
  kvm_regs r{};
  r.rip = entry;
  r.rdi = index.value();
  r.rsi = boot_info.raw();
  r.rflags = 0x2;
  return r;
}

std::vector<kvm_cpuid_entry2> CpuidForVcpu(std::span<const kvm_cpuid_entry2> supported, ApicId id) {
  std::vector<kvm_cpuid_entry2> out(supported.begin(), supported.end());
  for (auto& e : out) {
    if (e.function == 1) {
      e.ebx = (e.ebx & 0x00FFFFFFu) | ((id.value() & 0xFFu) << 24);
    } else if (e.function == 0xB || e.function == 0x1F) {
      e.edx = id.value();
    }
  }
  return out;
}

}  // namespace aggvm::vcpu
