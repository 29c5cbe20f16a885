// Starting a vCPU directly in 64-bit long mode at CPL0 (SDM vol. 3, 9.8.5 "Initializing IA-32e Mode"), with the
// layout fixed by guest/abi.h: GDT at AGGVM_GDT_GPA (null, 64-bit code 0x08, data 0x10, TSS 0x18), a 64-bit TSS at
// AGGVM_TSS_GPA, and identity page tables at AGGVM_PML4_GPA mapping the first 4 GiB with 2 MiB pages
// (PML4 -> PDPT -> 4 page directories; SDM vol. 3, 4.5).
//
// Control registers as measured to work on these hosts (../shared/FACTS.md): CR0 = PE|MP|ET|NE|WP|AM|PG,
// CR4 = PAE|OSFXSR|OSXMMEXCPT (no PCIDE: PVM refuses it), EFER = SCE|LME|LMA|NXE.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "common/types.h"

namespace aggvm::vcpu {

class GuestMemory;

inline constexpr uint64_t kCr0LongMode = 0x80050033;  // PG | AM | WP | NE | ET | MP | PE
inline constexpr uint64_t kCr4LongMode = 0x620;       // OSXMMEXCPT | OSFXSR | PAE
inline constexpr uint64_t kEferLongMode = 0xD01;      // NXE | LMA | LME | SCE

/// Writes the GDT, the TSS and the identity page tables into guest memory (which must cover them).
absl::Status WriteLongModeTables(GuestMemory& mem);

/// `current` (from KVM_GET_SREGS, which keeps the APIC base and other fields) switched to long mode with the
/// segments of the fixed GDT. Interrupts stay disabled (RFLAGS.IF = 0 in BootRegs) until the guest enables them.
kvm_sregs LongModeSregs(const kvm_sregs& current);

/// RIP = entry, RDI = vCPU index, RSI = boot info GPA, RFLAGS = 0x2 (reserved bit 1 only).
kvm_regs BootRegs(uint64_t entry, VcpuIndex index, GuestAddress boot_info);

/// KVM's supported CPUID with the APIC ID of this vCPU in leaf 1 EBX[31:24] and leaves 0xB / 0x1F EDX (the x2APIC
/// ID), so the guest reads the ID it is addressed by.
std::vector<kvm_cpuid_entry2> CpuidForVcpu(std::span<const kvm_cpuid_entry2> supported, ApicId id);

}  // namespace aggvm::vcpu
