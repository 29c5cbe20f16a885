/*
 * The probe guest's per-vCPU area, shared by entry.S and the C code (included from both; the assembler sees only
 * the #defines).
 *
 * Each vCPU owns one AGGVM_AREA_SIZE-aligned block of .bss: `struct percpu` at its bottom, the vCPU's stack above
 * it growing down from the top. Interrupt handlers run on the interrupted stack (CPL0 -> CPL0, no IST, SDM Vol. 3A
 * 6.12.1), so a handler finds its vCPU's data with `rsp & -AGGVM_AREA_SIZE`: two instructions, no MSR read. That
 * matters here because guest CPL0 code is emulated instruction by instruction.
 */
#ifndef AGGVM_GUEST_PERCPU_H
#define AGGVM_GUEST_PERCPU_H

#define AGGVM_AREA_SIZE 16384 /* per-vCPU block: struct percpu + stack */

/* Byte offsets inside struct percpu (checked against the C struct in main.c). */
#define PC_MAIN_REC 0      /* record used by the workload's main line */
#define PC_IRQ_REC 32      /* record used by interrupt handlers (header prefilled: magic, type IRQ, vcpu; c is the
                              per-vCPU IRQ sequence number, incremented after each OUT) */
#define PC_EXC_REC 64      /* record used by the exception path */
#define PC_PING_TSC 104    /* u64: rdtsc taken by the ping vCPU's handler */
#define PC_PING_FLAG 112   /* u32: set by the ping vCPU's handler */
#define PC_PONG_COUNT 116  /* u32: IPIs answered by the pong vCPU's handler */
#define PC_ICR_LO 120      /* u32: ICR low dword of this vCPU's ping-pong IPI (vector, fixed, physical) */
#define PC_ICR_HI 124      /* u32: x2APIC: destination APIC ID; xAPIC: destination << 24 */
#define PC_X2APIC 128      /* u32: 1 when the LAPIC is in x2APIC mode (EOI by MSR), 0 for xAPIC MMIO */
#define PC_INDEX 132       /* u32: vCPU index */
#define PC_NMI_COUNT 136   /* u32: NMIs taken (nmi workload, pong side) */
#define PC_SEEN 192        /* 256-bit bitmap: vectors taken by irq_common since the main line last cleared them */
#define PC_NMI_REC 224     /* record used by the NMI handler (header prefilled: magic, type NMI, vcpu) */
#define PC_SIZE 256

/* LAPIC registers (SDM Vol. 3A 11.4.1 table 11-1 for xAPIC offsets, 11.12.1.2 table 11-6 for x2APIC MSRs). */
#define LAPIC_XAPIC_BASE 0xfee00000
#define LAPIC_X2APIC_MSR_EOI 0x80b
#define LAPIC_X2APIC_MSR_ICR 0x830
#define LAPIC_XAPIC_EOI 0xb0
#define LAPIC_XAPIC_ICR_LO 0x300
#define LAPIC_XAPIC_ICR_HI 0x310

#define AGGVM_SPURIOUS_VECTOR 0xff

/* Copies of abi.h values for entry.S (abi.h is C only); main.c checks that they match. */
#define GUEST_PORT_RECORD 0x0a61
#define GUEST_MAX_VCPUS 64
#define GUEST_IMAGE_HEADER_OFFSET 8
#define GUEST_IMAGE_HEADER_MAGIC 0x48494741
#define GUEST_TRAMPOLINE_GPA 0x8000
#define GUEST_BOOTINFO_GPA 0x6000
#define GUEST_GDT_GPA 0x7000
#define GUEST_PML4_GPA 0x9000
#define GUEST_BI_NUM_VCPUS 8   /* offsetof(struct aggvm_boot_info, num_vcpus) */
#define GUEST_BI_APIC_IDS 48   /* offsetof(struct aggvm_boot_info, apic_ids) */

#endif /* AGGVM_GUEST_PERCPU_H */
