/*
 * The probe guest's paravirtual ABI: the one header shared by the guest (freestanding C) and the VMM (C++).
 *
 * Boot: the VMM puts every vCPU in 64-bit long mode at CPL0 (identity-mapped first 4 GiB), RIP = ELF entry,
 * RDI = vCPU index, RSI = guest-physical address of the BootInfo page. Interrupts are disabled; the guest builds its
 * own IDT and stack.
 *
 * Reporting: the guest writes to the ports below. A record is written into guest memory (any 8-byte aligned address
 * below 4 GiB) and its address OUT'd as a dword to AGGVM_PORT_RECORD; the VMM reads and validates it during that exit.
 * Any other port access ends the VM with an error ("unknown port").
 */
#ifndef AGGVM_GUEST_ABI_H
#define AGGVM_GUEST_ABI_H

#include <stdint.h>

#ifdef __cplusplus
#define AGGVM_STATIC_ASSERT(c, m) static_assert(c, m)
namespace aggvm::guest {
#else
#define AGGVM_STATIC_ASSERT(c, m) _Static_assert(c, m)
#endif

/* Guest-physical layout fixed by the VMM. */
#define AGGVM_BOOTINFO_GPA 0x6000u     /* BootInfo page */
#define AGGVM_GDT_GPA 0x7000u
#define AGGVM_TSS_GPA 0x7800u
#define AGGVM_PML4_GPA 0x9000u         /* page tables: PML4, PDPT, 4 PDs (2 MiB pages) up to 0xEFFF */
#define AGGVM_IMAGE_MIN_GPA 0x100000u  /* the ELF's loadable segments must lie at or above 1 MiB */
#define AGGVM_STATUS_GPA 0x5000u       /* status page: u64 heartbeat counter per vCPU (spin workload) */
#define AGGVM_MAX_VCPUS 64u

/* GDT selectors set up by the VMM. */
#define AGGVM_SEL_CODE64 0x08u
#define AGGVM_SEL_DATA 0x10u
#define AGGVM_SEL_TSS 0x18u

/* Ports (all 8-bit OUT unless noted). */
#define AGGVM_PORT_CONSOLE 0x0a60u     /* OUT byte: one console character of this vCPU ('\n' ends a line) */
#define AGGVM_PORT_RECORD 0x0a61u      /* OUT dword: GPA of a struct aggvm_record */
#define AGGVM_PORT_DONE 0x0a62u        /* OUT dword: this vCPU finished its workload; value = status (0 = ok) */
#define AGGVM_PORT_NOP 0x0a63u         /* OUT dword: ignored by the VMM (a bare exit round trip, for benchmarks) */

/* Workloads, chosen by the VMM in BootInfo.workload. */
enum aggvm_workload {
  AGGVM_WORKLOAD_HELLO = 1,        /* every vCPU reports in with a HELLO record, then DONE */
  AGGVM_WORKLOAD_IPI_PINGPONG = 2, /* ping_vcpu and pong_vcpu exchange `ipi_vector` IPIs `iterations` times */
  AGGVM_WORKLOAD_IRQ_SINK = 3,     /* HELLO once ready (IDT + LAPIC up), then halt; record vector + rdtsc of every
                                      interrupt, then EOI; never DONE */
  AGGVM_WORKLOAD_SPIN = 4,         /* HELLO once ready, then loop forever (interrupts on) incrementing this vCPU's
                                      u64 at AGGVM_STATUS_GPA + 8*index */
  AGGVM_WORKLOAD_EXIT_LOOP = 5,    /* `iterations` times: rdtsc, OUT to AGGVM_PORT_NOP, rdtsc -> EXIT_ROUND record */
  /* Misbehaving guests, for the VMM's error handling tests. */
  AGGVM_WORKLOAD_BAD_PORT = 100,     /* OUT to port 0x1234 */
  AGGVM_WORKLOAD_UNMAPPED = 101,     /* read from guest-physical 0xC0000000 (mapped by the page tables, no memslot) */
  AGGVM_WORKLOAD_TRIPLE_FAULT = 102  /* load an empty IDT and raise #UD: #UD -> #DF -> triple fault (shutdown) */
};
/* Workloads other than these run on every vCPU; ipi-pingpong runs on ping_vcpu and pong_vcpu, the other vCPUs
   report DONE at once. A misbehaving workload the VMM lets continue prints a console line and reports DONE 0.
   DONE status: 0 = ok, else the enum aggvm_guest_error of the ERROR record sent just before. After DONE a vCPU
   halts with interrupts enabled (still recording IRQs), or with interrupts off after an error. */

#define AGGVM_BOOTINFO_MAGIC 0x41474756u /* "VGGA" */
#define AGGVM_BOOTINFO_VERSION 1u
#define AGGVM_BOOT_X2APIC 0x1u           /* flags: enable the LAPIC in x2APIC mode (else xAPIC MMIO at 0xFEE00000) */
#define AGGVM_BOOT_UART_CONSOLE 0x2u     /* flags: console text goes to the 16550 UART at AGGVM_UART_BASE (the VM's one
                                            console, on the master) instead of AGGVM_PORT_CONSOLE */

/* The 16550 UART used with AGGVM_BOOT_UART_CONSOLE (PC16550D datasheet, "Registers"): the guest waits for LSR.THRE
   (bit 5) before each write to THR. */
#define AGGVM_UART_BASE 0x3f8u
#define AGGVM_UART_THR 0u  /* offset: transmitter holding register (write, DLAB = 0) */
#define AGGVM_UART_LSR 5u  /* offset: line status register (read) */
#define AGGVM_UART_LSR_THRE 0x20u

struct aggvm_boot_info {
  uint32_t magic;
  uint32_t version;
  uint32_t num_vcpus;
  uint32_t workload;        /* enum aggvm_workload */
  uint32_t flags;           /* AGGVM_BOOT_* */
  uint32_t iterations;      /* ipi-pingpong rounds; exit-loop iterations */
  uint32_t ping_vcpu;       /* ipi-pingpong: the vCPU that starts and times each round */
  uint32_t pong_vcpu;       /* ipi-pingpong: the vCPU that answers */
  uint32_t ipi_vector;      /* ipi-pingpong: vector used both ways (32..254; 255 is the spurious vector) */
  uint32_t reserved0;
  uint64_t tsc_khz;         /* guest TSC frequency as KVM reports it (0 if unknown) */
  uint32_t apic_ids[AGGVM_MAX_VCPUS]; /* APIC ID of each vCPU index */
};
AGGVM_STATIC_ASSERT(sizeof(struct aggvm_boot_info) <= 4096, "boot info fits one page");

enum aggvm_record_type {
  AGGVM_REC_HELLO = 1,      /* a = APIC ID read from the LAPIC, b = rdtsc */
  AGGVM_REC_IRQ = 2,        /* a = vector, b = rdtsc at handler entry, c = per-vCPU sequence number */
  AGGVM_REC_PING_ROUND = 3, /* a = round, b = rdtsc before the IPI, c = rdtsc when the answer's handler ran */
  AGGVM_REC_ERROR = 4,      /* a = error code (enum aggvm_guest_error), b/c = details */
  AGGVM_REC_EXIT_ROUND = 5  /* a = iteration, b = rdtsc before the OUT, c = rdtsc after it */
};

enum aggvm_guest_error {
  AGGVM_GERR_BAD_BOOTINFO = 1,
  AGGVM_GERR_BAD_WORKLOAD = 2,
  AGGVM_GERR_EXCEPTION = 3,  /* b = exception vector, c = faulting RIP */
  AGGVM_GERR_NO_APIC = 4
};

#define AGGVM_RECORD_MAGIC 0x5245u /* "ER" */
struct aggvm_record {
  uint16_t magic;   /* AGGVM_RECORD_MAGIC */
  uint16_t type;    /* enum aggvm_record_type */
  uint32_t vcpu;    /* the writing vCPU's index */
  uint64_t a;
  uint64_t b;
  uint64_t c;
};
AGGVM_STATIC_ASSERT(sizeof(struct aggvm_record) == 32, "record layout");

#ifdef __cplusplus
}  // namespace aggvm::guest
#endif
#endif /* AGGVM_GUEST_ABI_H */
