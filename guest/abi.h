/*
 * The probe guest's paravirtual ABI: the one header shared by the guest (freestanding C) and the VMM (C++).
 *
 * Boot: the VMM puts every vCPU in 64-bit long mode at CPL0 (identity-mapped first 4 GiB), RIP = ELF entry,
 * RDI = vCPU index, RSI = guest-physical address of the BootInfo page. Interrupts are disabled; the guest builds its
 * own IDT and stack. Workload ap-bringup: only vCPU 0 starts so; the APs wait for INIT-SIPI-SIPI and enter through
 * the trampoline at AGGVM_TRAMPOLINE_GPA (docs/guest.md), which reaches the same entry with the same registers.
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
#define AGGVM_TRAMPOLINE_GPA 0x8000u   /* AP start-up trampoline page (ap-bringup): SIPI vector 0x08. Every node's
                                          VMM copies it there from the image (see AGGVM_IMAGE_HEADER_*) */
#define AGGVM_TRAMPOLINE_MAX 4096u
#define AGGVM_MAX_VCPUS 64u

/* GDT selectors set up by the VMM. */
#define AGGVM_SEL_CODE64 0x08u
#define AGGVM_SEL_DATA 0x10u
#define AGGVM_SEL_TSS 0x18u

/* Image header: the ELF entry point starts with a 2-byte jump over this header at entry + 8 (u32 words): magic,
   GPA of the AP trampoline inside the loaded image, its size. The trampoline is assembled to run at
   AGGVM_TRAMPOLINE_GPA; the VMM copies it there on every node (guest memory is not coherent across nodes). */
#define AGGVM_IMAGE_HEADER_OFFSET 8u
#define AGGVM_IMAGE_HEADER_MAGIC 0x48494741u /* "AGIH" */

/* Fixed vectors of the IPI handshakes (ipi-pingpong, ipi-broadcast, nmi, lowest-priority, ap-bringup). A workload's
   `ipi_vector` must differ from all of them. Every interrupt a vCPU takes is also recorded (IRQ record), so the
   handshakes show up in the records: tests filter on the vector. */
#define AGGVM_VEC_TIMER 0x7eu        /* the sender's LAPIC timer: wakes its `hlt` to re-send / time out */
#define AGGVM_VEC_WARMUP 0x7fu       /* sender -> peer: "are you ready?" (re-sent every ~1 ms until answered) */
#define AGGVM_VEC_READY_BASE 0x80u   /* peer j -> sender: "ready" = 0x80 + j; ap-bringup: AP j -> vCPU 0 "I'm up" */
#define AGGVM_VEC_ANSWER_BASE 0xc0u  /* recipient j -> sender: "got this round's IPI" = 0xC0 + j (j <= 62) */
#define AGGVM_MAX_ANSWER_VCPUS 63u   /* vCPUs of workloads that answer on AGGVM_VEC_ANSWER_BASE + j */

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
  AGGVM_WORKLOAD_IPI_BROADCAST = 6, /* ping_vcpu handshakes with every other vCPU, then `iterations` rounds: one
                                       `ipi_vector` IPI to `dest_kind`/`dest`; each recipient answers with
                                       ANSWER_BASE + its index; the sender waits for `expected_answers` -> BCAST_ROUND */
  AGGVM_WORKLOAD_NMI = 7,           /* ping_vcpu handshakes with pong_vcpu, then `iterations` rounds: NMI to pong,
                                       whose NMI handler records NMI and answers `ipi_vector` -> PING_ROUND */
  AGGVM_WORKLOAD_IPI_NOWHERE = 8,   /* ping_vcpu sends `iterations` fixed IPIs to `nowhere_apic_id`, then DONE 0 */
  AGGVM_WORKLOAD_LOWEST_PRIORITY = 9, /* every vCPU sets its TPR to tpr[index]; then as ipi-broadcast with
                                         lowest-priority delivery to the logical destination `dest` */
  AGGVM_WORKLOAD_AP_BRINGUP = 10,   /* only vCPU 0 is started by the VMM; it sends INIT, SIPI, SIPI to every AP and
                                       waits for each AP's "I'm up" IPI -> AP_UP record; the APs say HELLO */
  /* Misbehaving guests, for the VMM's error handling tests. */
  AGGVM_WORKLOAD_BAD_PORT = 100,     /* OUT to port 0x1234 */
  AGGVM_WORKLOAD_UNMAPPED = 101,     /* read from guest-physical 0xC0000000 (mapped by the page tables, no memslot) */
  AGGVM_WORKLOAD_TRIPLE_FAULT = 102  /* load an empty IDT and raise #UD: #UD -> #DF -> triple fault (shutdown) */
};
/* Workloads other than these run on every vCPU; ipi-pingpong and nmi run on ping_vcpu and pong_vcpu, the other
   vCPUs report DONE at once. Responders (pong, broadcast recipients) report DONE once ready (nmi, ipi-broadcast,
   lowest-priority) or after `iterations` pings (ipi-pingpong) and keep answering afterwards. Nothing relies on one
   vCPU seeing another's memory writes: vCPUs coordinate only by IPIs (nodes keep separate copies of guest RAM). A misbehaving workload the VMM lets continue prints a console line and reports DONE 0.
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
  /* Appended for issue 6 (same version: an older guest ignores them). */
  uint32_t dest_kind;        /* ipi-broadcast / lowest-priority: enum aggvm_dest_kind */
  uint32_t dest;             /* AGGVM_DEST_X2APIC_LOGICAL: x2APIC logical ID (cluster << 16 | bitmask of 16) */
  uint32_t expected_answers; /* ipi-broadcast / lowest-priority: answers per round (computed by the VMM) */
  uint32_t nowhere_apic_id;  /* ipi-nowhere: an APIC ID no vCPU has (xAPIC: < 0xFF) */
  uint32_t timeout_ms;       /* handshakes, rounds, AP bring-up: ERROR TIMEOUT after this (0 = 10000) */
  uint32_t reserved1;
  uint64_t reserved2;
  uint8_t tpr[AGGVM_MAX_VCPUS]; /* lowest-priority: TPR of each vCPU (class below ipi_vector's) */
};
AGGVM_STATIC_ASSERT(sizeof(struct aggvm_boot_info) <= 4096, "boot info fits one page");

/* Destinations of the ipi-broadcast / lowest-priority IPI (SDM Vol. 3A 11.6.1 ICR, 11.6.2, 11.12.9/10). */
enum aggvm_dest_kind {
  AGGVM_DEST_ALL_EXCLUDING_SELF = 1, /* shorthand 11b */
  AGGVM_DEST_ALL_INCLUDING_SELF = 2, /* shorthand 10b */
  AGGVM_DEST_PHYSICAL_BROADCAST = 3, /* physical destination 0xFF (xAPIC) / 0xFFFFFFFF (x2APIC) */
  AGGVM_DEST_X2APIC_LOGICAL = 4      /* logical destination `dest` (x2APIC mode only) */
};

enum aggvm_record_type {
  AGGVM_REC_HELLO = 1,      /* a = APIC ID read from the LAPIC, b = rdtsc */
  AGGVM_REC_IRQ = 2,        /* a = vector, b = rdtsc at handler entry, c = per-vCPU sequence number */
  AGGVM_REC_PING_ROUND = 3, /* a = round, b = rdtsc before the IPI, c = rdtsc when the answer's handler ran */
  AGGVM_REC_ERROR = 4,      /* a = error code (enum aggvm_guest_error), b/c = details */
  AGGVM_REC_EXIT_ROUND = 5,  /* a = iteration, b = rdtsc before the OUT, c = rdtsc after it */
  AGGVM_REC_BCAST_ROUND = 6, /* a = round, b = rdtsc before the IPI, c = rdtsc when the last expected answer came */
  AGGVM_REC_NMI = 7,         /* a = per-vCPU NMI sequence number, b = rdtsc at NMI handler entry */
  AGGVM_REC_AP_UP = 8,       /* vCPU 0: a = bitmask of vCPU indexes that said "I'm up" (bit 0 = itself),
                                b = rdtsc before the first INIT, c = rdtsc when the last AP answered (or gave up) */
  AGGVM_REC_LAST = AGGVM_REC_AP_UP
};

enum aggvm_guest_error {
  AGGVM_GERR_BAD_BOOTINFO = 1,
  AGGVM_GERR_BAD_WORKLOAD = 2,
  AGGVM_GERR_EXCEPTION = 3,  /* b = exception vector, c = faulting RIP */
  AGGVM_GERR_NO_APIC = 4,
  AGGVM_GERR_TIMEOUT = 5     /* b = what was awaited (bitmask of vCPUs / answers missing), c = step */
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
