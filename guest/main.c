/*
 * The probe guest: freestanding x86-64 C, entered from entry.S on every vCPU with its stack set.
 *
 * Boot sequence per vCPU: fill the record headers, build and load this vCPU's IDT, validate the BootInfo page,
 * enable the local APIC (x2APIC unless BootInfo.flags lacks AGGVM_BOOT_X2APIC), run the workload. Everything is
 * reported through the ports of abi.h. Guest CPL0 code is emulated on the target machines, so loops here are short
 * and waiting is `sti; hlt`.
 *
 * DONE status: 0 = ok, otherwise the enum aggvm_guest_error of the ERROR record sent just before.
 */
#include <stddef.h>
#include <stdint.h>

#include "abi.h"
#include "percpu.h"

_Static_assert(GUEST_PORT_RECORD == AGGVM_PORT_RECORD, "entry.S port copy");
_Static_assert(GUEST_MAX_VCPUS == AGGVM_MAX_VCPUS, "entry.S vCPU count copy");

struct percpu {
  struct aggvm_record main_rec;
  struct aggvm_record irq_rec;
  struct aggvm_record exc_rec;
  uint64_t reserved;
  volatile uint64_t ping_tsc;
  volatile uint32_t ping_flag;
  volatile uint32_t pong_count;
  uint32_t icr_lo;
  uint32_t icr_hi;
  uint32_t x2apic;
  uint32_t index;
  volatile uint32_t nmi_count;
  uint8_t pad0[PC_SEEN - 140];
  volatile uint64_t seen[4];
  struct aggvm_record nmi_rec;
};
_Static_assert(offsetof(struct percpu, main_rec) == PC_MAIN_REC, "percpu layout");
_Static_assert(offsetof(struct percpu, irq_rec) == PC_IRQ_REC, "percpu layout");
_Static_assert(offsetof(struct percpu, exc_rec) == PC_EXC_REC, "percpu layout");
_Static_assert(offsetof(struct percpu, ping_tsc) == PC_PING_TSC, "percpu layout");
_Static_assert(offsetof(struct percpu, ping_flag) == PC_PING_FLAG, "percpu layout");
_Static_assert(offsetof(struct percpu, pong_count) == PC_PONG_COUNT, "percpu layout");
_Static_assert(offsetof(struct percpu, icr_lo) == PC_ICR_LO, "percpu layout");
_Static_assert(offsetof(struct percpu, icr_hi) == PC_ICR_HI, "percpu layout");
_Static_assert(offsetof(struct percpu, x2apic) == PC_X2APIC, "percpu layout");
_Static_assert(offsetof(struct percpu, index) == PC_INDEX, "percpu layout");
_Static_assert(offsetof(struct percpu, nmi_count) == PC_NMI_COUNT, "percpu layout");
_Static_assert(offsetof(struct percpu, seen) == PC_SEEN, "percpu layout");
_Static_assert(offsetof(struct percpu, nmi_rec) == PC_NMI_REC, "percpu layout");
_Static_assert(GUEST_IMAGE_HEADER_OFFSET == AGGVM_IMAGE_HEADER_OFFSET, "entry.S copy");
_Static_assert(GUEST_IMAGE_HEADER_MAGIC == AGGVM_IMAGE_HEADER_MAGIC, "entry.S copy");
_Static_assert(GUEST_TRAMPOLINE_GPA == AGGVM_TRAMPOLINE_GPA, "entry.S copy");
_Static_assert(GUEST_BOOTINFO_GPA == AGGVM_BOOTINFO_GPA, "entry.S copy");
_Static_assert(GUEST_GDT_GPA == AGGVM_GDT_GPA, "entry.S copy");
_Static_assert(GUEST_PML4_GPA == AGGVM_PML4_GPA, "entry.S copy");
_Static_assert(GUEST_BI_NUM_VCPUS == offsetof(struct aggvm_boot_info, num_vcpus), "entry.S copy");
_Static_assert(GUEST_BI_APIC_IDS == offsetof(struct aggvm_boot_info, apic_ids), "entry.S copy");
_Static_assert(AGGVM_VEC_READY_BASE % 64 == 0 && AGGVM_VEC_ANSWER_BASE % 64 == 0, "one seen[] word per range");
_Static_assert(sizeof(struct percpu) == PC_SIZE, "percpu layout");

struct vcpu_area {
  struct percpu pc;
  uint8_t stack[AGGVM_AREA_SIZE - sizeof(struct percpu)];
};
_Static_assert(sizeof(struct vcpu_area) == AGGVM_AREA_SIZE, "area size");

/* One area per vCPU plus a spare one for a vCPU whose index is out of range (it only reports the error). The ELF
   loader zeroes .bss (p_memsz > p_filesz), so nothing here clears it: that would cost ~1 ms of emulated stores. */
struct vcpu_area aggvm_vcpu_areas[AGGVM_MAX_VCPUS + 1] __attribute__((aligned(AGGVM_AREA_SIZE)));

/* IDT gate descriptor, 64-bit mode (SDM Vol. 3A 6.14.1, figure 6-8). */
struct idt_gate {
  uint64_t lo; /* offset 15:0, selector, IST, type/DPL/P, offset 31:16 */
  uint64_t hi; /* offset 63:32, reserved */
};
struct idt_pointer {
  uint16_t limit;
  uint64_t base;
} __attribute__((packed));

/* One IDT per vCPU: the ping-pong workload points its IPI vector at a different handler on each side. */
static struct idt_gate idts[AGGVM_MAX_VCPUS + 1][256] __attribute__((aligned(4096)));

extern char aggvm_isr_stubs[];
extern char aggvm_ping_handler[];
extern char aggvm_pong_handler[];
extern char aggvm_nmi_handler[];

/* ---- instructions ---- */

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline uint8_t inb(uint16_t port) {
  uint8_t v;
  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
  return v;
}
static inline uint64_t rdtsc(void) {
  uint32_t lo, hi;
  __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
  return ((uint64_t)hi << 32) | lo;
}
static inline uint64_t rdmsr(uint32_t msr) {
  uint32_t lo, hi;
  __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
  return ((uint64_t)hi << 32) | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v) {
  __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}
static inline void cpuid(uint32_t leaf, uint32_t *eax, uint32_t *ebx, uint32_t *ecx, uint32_t *edx) {
  __asm__ volatile("cpuid" : "=a"(*eax), "=b"(*ebx), "=c"(*ecx), "=d"(*edx) : "a"(leaf), "c"(0));
}
/* Wait for an interrupt with none lost: STI's one-instruction shadow makes `sti; hlt` atomic (SDM Vol. 2B STI),
   and the caller checks its condition with interrupts off. */
static inline void wait_for_interrupt(void) { __asm__ volatile("sti; hlt; cli" : : : "memory"); }
static inline void mmio_write32(uint32_t offset, uint32_t v) {
  *(volatile uint32_t *)(uintptr_t)(LAPIC_XAPIC_BASE + offset) = v;
}
static inline uint32_t mmio_read32(uint32_t offset) {
  return *(volatile uint32_t *)(uintptr_t)(LAPIC_XAPIC_BASE + offset);
}

/* gcc may emit calls to these even in freestanding code. */
void *memset(void *d, int c, size_t n) {
  unsigned char *p = d;
  while (n--) *p++ = (unsigned char)c;
  return d;
}
void *memcpy(void *d, const void *s, size_t n) {
  unsigned char *p = d;
  const unsigned char *q = s;
  while (n--) *p++ = *q++;
  return d;
}

/* ---- reporting ---- */

/* Set from BootInfo.flags by every vCPU (all write the same value): console through the UART (AGGVM_BOOT_UART_CONSOLE).
   Before the BootInfo is read (an early error) the paravirtual port is used. */
static volatile uint32_t uart_console;

static void put_char(char c) {
  if (uart_console) {
    /* A forwarded UART answers LSR at once; a real 16550 may be busy shifting out the previous character. */
    while (!(inb(AGGVM_UART_BASE + AGGVM_UART_LSR) & AGGVM_UART_LSR_THRE)) __asm__ volatile("pause");
    outb(AGGVM_UART_BASE + AGGVM_UART_THR, (uint8_t)c);
  } else {
    outb(AGGVM_PORT_CONSOLE, (uint8_t)c);
  }
}
static void put_str(const char *s) {
  while (*s) put_char(*s++);
}
static void put_dec(uint64_t v) {
  char buf[21];
  int i = 20;
  buf[i] = 0;
  do {
    buf[--i] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  put_str(&buf[i]);
}
static void put_hex(uint64_t v) {
  char buf[19];
  int i = 18;
  buf[i] = 0;
  do {
    buf[--i] = "0123456789abcdef"[v & 15];
    v >>= 4;
  } while (v);
  buf[--i] = 'x';
  buf[--i] = '0';
  put_str(&buf[i]);
}

static void send_record(struct aggvm_record *r, uint16_t type, uint64_t a, uint64_t b, uint64_t c) {
  r->type = type;
  r->a = a;
  r->b = b;
  r->c = c;
  outl(AGGVM_PORT_RECORD, (uint32_t)(uintptr_t)r); /* "memory" clobber: the stores above happen first */
}
static void done(uint32_t status) { outl(AGGVM_PORT_DONE, status); }

static __attribute__((noreturn)) void halt_forever(void) {
  for (;;) __asm__ volatile("cli; hlt");
}
/* After DONE: keep answering interrupts (each still yields an IRQ record) until the VMM stops this vCPU. */
static __attribute__((noreturn)) void idle_forever(void) {
  for (;;) __asm__ volatile("sti; hlt" : : : "memory");
}

static __attribute__((noreturn)) void fail(struct percpu *pc, uint32_t error, uint64_t b, uint64_t c) {
  send_record(&pc->main_rec, AGGVM_REC_ERROR, error, b, c);
  done(error);
  halt_forever();
}

/* ---- exceptions (cold path, called from exc_common) ---- */

/* frame: vector, error code (0 when the CPU pushes none), RIP, CS, RFLAGS, RSP, SS. */
void __attribute__((noreturn)) guest_exception(const uint64_t *frame) {
  uintptr_t sp = (uintptr_t)__builtin_frame_address(0);
  struct percpu *pc = (struct percpu *)(sp & ~(uintptr_t)(AGGVM_AREA_SIZE - 1));
  put_str("exception ");
  put_dec(frame[0]);
  put_str(" error ");
  put_hex(frame[1]);
  put_str(" at rip ");
  put_hex(frame[2]);
  put_str("\n");
  send_record(&pc->exc_rec, AGGVM_REC_ERROR, AGGVM_GERR_EXCEPTION, frame[0], frame[2]);
  done(AGGVM_GERR_EXCEPTION);
  halt_forever();
}

/* ---- IDT and LAPIC ---- */

static uint64_t gate_lo(uintptr_t handler) {
  return (handler & 0xffffu) | ((uint64_t)AGGVM_SEL_CODE64 << 16) | (0x8eull << 40) /* P, DPL 0, 64-bit intr */ |
         ((uint64_t)((handler >> 16) & 0xffffu) << 48);
}

static void set_gate(struct idt_gate *idt, unsigned vector, uintptr_t handler) {
  idt[vector].lo = gate_lo(handler);
  idt[vector].hi = handler >> 32;
}

/* Interrupt gates (IF cleared on entry), so handlers never nest. The stub block shares bits 16..63 of its address
   (linker script ASSERT), hence gate v = gate 0 + 16 * v: about four emulated instructions per gate. */
static void load_idt(struct idt_gate *idt) {
  uint64_t lo = gate_lo((uintptr_t)aggvm_isr_stubs);
  for (unsigned v = 0; v < 256; ++v, lo += 16) idt[v].lo = lo; /* .hi stays 0: the stubs lie below 4 GiB */
  struct idt_pointer p = {.limit = sizeof(idts[0]) - 1, .base = (uintptr_t)idt};
  __asm__ volatile("lidt %0" : : "m"(p) : "memory");
}

#define MSR_APIC_BASE 0x1b
#define APIC_BASE_EXTD (1u << 10) /* x2APIC mode (SDM Vol. 3A 11.12.1) */
#define APIC_BASE_EN (1u << 11)   /* APIC global enable */
#define MSR_X2APIC_ID 0x802
#define MSR_X2APIC_SVR 0x80f
#define LAPIC_XAPIC_ID 0x20
#define LAPIC_XAPIC_SVR 0xf0
#define SVR_ENABLE (1u << 8)

/* Enables the LAPIC in the requested mode with spurious vector 0xFF; returns its APIC ID. */
static uint32_t lapic_enable(struct percpu *pc, int x2apic) {
  uint32_t eax, ebx, ecx, edx;
  cpuid(1, &eax, &ebx, &ecx, &edx);
  uint64_t base = rdmsr(MSR_APIC_BASE);
  if (!(edx & (1u << 9))) fail(pc, AGGVM_GERR_NO_APIC, edx, base);              /* CPUID.1:EDX.APIC */
  if (x2apic) {
    if (!(ecx & (1u << 21))) fail(pc, AGGVM_GERR_NO_APIC, ecx, base);           /* CPUID.1:ECX.x2APIC */
    /* Disabled -> x2APIC directly is an invalid transition (SDM Vol. 3A 11.12.5): enable xAPIC first. */
    if (!(base & APIC_BASE_EN)) wrmsr(MSR_APIC_BASE, base |= APIC_BASE_EN);
    if (!(base & APIC_BASE_EXTD)) wrmsr(MSR_APIC_BASE, base | APIC_BASE_EXTD);
    wrmsr(MSR_X2APIC_SVR, SVR_ENABLE | AGGVM_SPURIOUS_VECTOR);
    pc->x2apic = 1;
    return (uint32_t)rdmsr(MSR_X2APIC_ID);
  }
  if ((base & APIC_BASE_EXTD) || (base & ~0xfffull & 0xffffffffffull) != LAPIC_XAPIC_BASE)
    fail(pc, AGGVM_GERR_NO_APIC, ecx, base); /* leaving x2APIC needs a reset; a moved base is not supported */
  if (!(base & APIC_BASE_EN)) wrmsr(MSR_APIC_BASE, base | APIC_BASE_EN);
  mmio_write32(LAPIC_XAPIC_SVR, SVR_ENABLE | AGGVM_SPURIOUS_VECTOR);
  pc->x2apic = 0;
  return mmio_read32(LAPIC_XAPIC_ID) >> 24;
}

/* ICR low dword (SDM Vol. 3A 11.6.1, figure 11-12): vector 7:0, delivery mode 10:8, destination mode 11, level 14,
   trigger mode 15 (0 = edge), destination shorthand 19:18. The destination is ICR[63:56] in xAPIC mode (11.6.1) and
   ICR[63:32] in x2APIC mode (11.12.9). */
#define ICR_LOWEST (1u << 8)
#define ICR_NMI (4u << 8)
#define ICR_INIT (5u << 8)
#define ICR_STARTUP (6u << 8)
#define ICR_LOGICAL (1u << 11)
#define ICR_ASSERT (1u << 14)
#define ICR_TRIGGER_LEVEL (1u << 15)
#define ICR_ALL_INCLUDING_SELF (2u << 18)
#define ICR_ALL_EXCLUDING_SELF (3u << 18)
#define MSR_X2APIC_TPR 0x808
#define LAPIC_XAPIC_TPR 0x80

/* Fixed IPI, physical destination, edge; the handlers and send_ipi share these ICR values. */
static void prepare_ipi(struct percpu *pc, uint32_t dest_apic_id, uint32_t vector) {
  pc->icr_lo = vector | ICR_ASSERT;
  pc->icr_hi = pc->x2apic ? dest_apic_id : dest_apic_id << 24;
}
static void send_ipi(const struct percpu *pc) {
  if (pc->x2apic) {
    wrmsr(LAPIC_X2APIC_MSR_ICR, ((uint64_t)pc->icr_hi << 32) | pc->icr_lo);
  } else {
    mmio_write32(LAPIC_XAPIC_ICR_HI, pc->icr_hi);
    mmio_write32(LAPIC_XAPIC_ICR_LO, pc->icr_lo);
  }
}
/* Any IPI from the main line (interrupts off). xAPIC: ICR high first, the write of ICR low sends. */
static void send_icr(const struct percpu *pc, uint32_t lo, uint32_t dest) {
  if (pc->x2apic) {
    wrmsr(LAPIC_X2APIC_MSR_ICR, ((uint64_t)dest << 32) | lo);
  } else {
    mmio_write32(LAPIC_XAPIC_ICR_HI, dest << 24);
    mmio_write32(LAPIC_XAPIC_ICR_LO, lo);
  }
}
static void send_fixed(const struct percpu *pc, uint32_t dest_apic_id, uint32_t vector) {
  send_icr(pc, vector | ICR_ASSERT, dest_apic_id);
}
static void set_tpr(const struct percpu *pc, uint32_t tpr) {
  if (pc->x2apic) {
    wrmsr(MSR_X2APIC_TPR, tpr);
  } else {
    mmio_write32(LAPIC_XAPIC_TPR, tpr);
  }
}

/* ---- waiting and the warm-up handshake ---- */

/* The main line runs with interrupts off; irq_common sets bit v of pc->seen for every vector v it takes. */
static int seen(const struct percpu *pc, uint32_t v) { return (int)((pc->seen[v / 64] >> (v % 64)) & 1); }
static void clear_seen(struct percpu *pc, uint32_t v) { pc->seen[v / 64] &= ~(1ull << (v % 64)); }
static uint32_t popcount64(uint64_t x) {
  uint32_t n = 0;
  for (; x; x &= x - 1) ++n; /* no libgcc here: __builtin_popcountll would call __popcountdi2 */
  return n;
}

static uint64_t ticks_per_ms(const struct aggvm_boot_info *bi) { return bi->tsc_khz ? bi->tsc_khz : 2000000; }
static uint64_t deadline_after_timeout(const struct aggvm_boot_info *bi) {
  return rdtsc() + (uint64_t)(bi->timeout_ms ? bi->timeout_ms : 10000) * ticks_per_ms(bi);
}

/* LAPIC timer (SDM Vol. 3A 11.5.4): one-shot, divide by 1. KVM's APIC bus and the user irqchip's both tick once per
   nanosecond, so the initial count is in ns. Waiting is `sti; hlt` woken by the answer or by this timer: a busy
   `sti; pause; cli` loop does not let interrupts in reliably here (the emulated CPL0 code rarely exits while the
   one-instruction IF window is open). */
#define LAPIC_XAPIC_LVT_TIMER 0x320
#define LAPIC_XAPIC_TMICT 0x380
#define LAPIC_XAPIC_TDCR 0x3e0
static void lapic_write(const struct percpu *pc, uint32_t xapic_offset, uint32_t v) {
  if (pc->x2apic) {
    wrmsr(0x800 + (xapic_offset >> 4), v); /* x2APIC MSR = 0x800 + offset / 16 (SDM Vol. 3A 11.12.1.2) */
  } else {
    mmio_write32(xapic_offset, v);
  }
}
static void timer_setup(const struct percpu *pc) {
  lapic_write(pc, LAPIC_XAPIC_TDCR, 0xb); /* divide by 1 */
  lapic_write(pc, LAPIC_XAPIC_LVT_TIMER, AGGVM_VEC_TIMER); /* one-shot, not masked */
}
/* Arms the one-shot timer to fire at about `deadline` (rdtsc), at most ~`max_ns` from now. */
static void arm_timer(const struct percpu *pc, const struct aggvm_boot_info *bi, uint64_t deadline, uint64_t max_ns) {
  const uint64_t now = rdtsc();
  uint64_t ns = now >= deadline ? 0 : (deadline - now) * 1000000ull / ticks_per_ms(bi);
  if (ns > max_ns) ns = max_ns;
  lapic_write(pc, LAPIC_XAPIC_TMICT, (uint32_t)ns + 1);
}
static void disarm_timer(const struct percpu *pc) { lapic_write(pc, LAPIC_XAPIC_TMICT, 0); }
/* Sleeps until any interrupt or until `deadline` (rdtsc), at most ~1 ms. Interrupts off before and after. A timer
   interrupt that fires later is only an IRQ record of AGGVM_VEC_TIMER. */
static void nap_until(const struct percpu *pc, const struct aggvm_boot_info *bi, uint64_t deadline) {
  if (rdtsc() >= deadline) return;
  arm_timer(pc, bi, deadline, 1000000);
  wait_for_interrupt();
}
static void delay_ticks(const struct percpu *pc, const struct aggvm_boot_info *bi, uint64_t ticks) {
  const uint64_t end = rdtsc() + ticks;
  while (rdtsc() < end) nap_until(pc, bi, end);
}

static uint64_t vcpu_mask(uint32_t n) { return n >= 64 ? ~0ull : (1ull << n) - 1; }

/* Sender side: until every vCPU j in `peers` answered with AGGVM_VEC_READY_BASE + j, send AGGVM_VEC_WARMUP to the
   ones still missing every ~1 ms. A peer whose vCPU has not started yet (another node, seconds later) has a
   software-disabled LAPIC, which drops the warm-up (SDM Vol. 3A 11.4.7.2); a later one gets through. Late and
   duplicate READY answers only set the same seen[] bit again: they never count for anything else. */
static void handshake(struct percpu *pc, const struct aggvm_boot_info *bi, uint64_t peers) {
  const uint64_t give_up = deadline_after_timeout(bi);
  const uint64_t period = ticks_per_ms(bi);
  for (;;) {
    const uint64_t missing = peers & ~pc->seen[AGGVM_VEC_READY_BASE / 64];
    if (!missing) {
      disarm_timer(pc); /* no stray timer interrupt in the first timed round */
      return;
    }
    const uint64_t now = rdtsc();
    if (now > give_up) fail(pc, AGGVM_GERR_TIMEOUT, missing, 1);
    for (uint32_t j = 0; j < bi->num_vcpus; ++j) {
      if ((missing >> j) & 1) send_fixed(pc, bi->apic_ids[j], AGGVM_VEC_WARMUP);
    }
    while ((peers & ~pc->seen[AGGVM_VEC_READY_BASE / 64]) && rdtsc() < now + period) nap_until(pc, bi, now + period);
  }
}

/* Responder side: a warm-up came (irq_common recorded it): answer READY_BASE + own index. Interrupts off. */
static void answer_warmup(struct percpu *pc, uint32_t sender_apic_id) {
  if (seen(pc, AGGVM_VEC_WARMUP)) {
    clear_seen(pc, AGGVM_VEC_WARMUP);
    send_fixed(pc, sender_apic_id, AGGVM_VEC_READY_BASE + pc->index);
  }
}

/* ---- workloads ---- */

static void say_hello(struct percpu *pc, uint32_t apic_id) {
  send_record(&pc->main_rec, AGGVM_REC_HELLO, apic_id, rdtsc(), 0);
}

/* ipi-pingpong. The pong answers pings from its handler (aggvm_pong_handler) and warm-ups from its main line; the
   ping first completes the warm-up handshake, so no round starts before the pong can answer it. */
static __attribute__((noreturn)) void run_pingpong(struct percpu *pc, const struct aggvm_boot_info *bi) {
  uint32_t iterations = bi->iterations;
  const uint32_t ping_apic = bi->apic_ids[bi->ping_vcpu];
  if (pc->index == bi->pong_vcpu) {
    prepare_ipi(pc, ping_apic, bi->ipi_vector);
    for (;;) {
      answer_warmup(pc, ping_apic);
      if (pc->pong_count >= iterations) break;
      wait_for_interrupt();
    }
    done(0);
    idle_forever();
  }
  prepare_ipi(pc, bi->apic_ids[bi->pong_vcpu], bi->ipi_vector);
  timer_setup(pc);
  handshake(pc, bi, 1ull << bi->pong_vcpu);
  for (uint32_t round = 0; round < iterations; ++round) {
    pc->ping_flag = 0;
    uint64_t sent = rdtsc();
    send_ipi(pc);
    while (!pc->ping_flag) wait_for_interrupt();
    send_record(&pc->main_rec, AGGVM_REC_PING_ROUND, round, sent, pc->ping_tsc);
  }
  done(0);
  idle_forever();
}

/* nmi: as ipi-pingpong with an NMI as the ping; the pong's NMI handler (aggvm_nmi_handler) records and answers. */
static __attribute__((noreturn)) void run_nmi(struct percpu *pc, const struct aggvm_boot_info *bi, uint32_t apic_id) {
  const uint32_t ping_apic = bi->apic_ids[bi->ping_vcpu];
  const uint32_t pong_apic = bi->apic_ids[bi->pong_vcpu];
  if (pc->index == bi->pong_vcpu) {
    prepare_ipi(pc, ping_apic, bi->ipi_vector); /* the NMI handler's answer */
    say_hello(pc, apic_id);
    done(0); /* ready; the NMI records follow */
    for (;;) {
      answer_warmup(pc, ping_apic);
      wait_for_interrupt();
    }
  }
  timer_setup(pc);
  handshake(pc, bi, 1ull << bi->pong_vcpu);
  for (uint32_t round = 0; round < bi->iterations; ++round) {
    pc->ping_flag = 0;
    uint64_t sent = rdtsc();
    send_icr(pc, ICR_NMI | ICR_ASSERT, pong_apic);
    while (!pc->ping_flag) wait_for_interrupt();
    send_record(&pc->main_rec, AGGVM_REC_PING_ROUND, round, sent, pc->ping_tsc);
  }
  done(0);
  idle_forever();
}

/* ipi-broadcast and lowest-priority: recipients answer ANSWER_BASE + index; the sender counts distinct answers. */
static __attribute__((noreturn)) void run_broadcast(struct percpu *pc, const struct aggvm_boot_info *bi,
                                                    uint32_t apic_id, int lowest) {
  const uint32_t sender = bi->ping_vcpu;
  const uint32_t sender_apic = bi->apic_ids[sender];
  const uint32_t vector = bi->ipi_vector;
  if (lowest) set_tpr(pc, bi->tpr[pc->index]);
  if (pc->index != sender) {
    say_hello(pc, apic_id);
    done(0); /* ready; keeps answering */
    for (;;) {
      answer_warmup(pc, sender_apic);
      if (seen(pc, vector)) {
        clear_seen(pc, vector);
        send_fixed(pc, sender_apic, AGGVM_VEC_ANSWER_BASE + pc->index);
      }
      wait_for_interrupt();
    }
  }
  uint32_t lo = vector | ICR_ASSERT | (lowest ? ICR_LOWEST : 0);
  uint32_t dest = 0;
  switch (bi->dest_kind) {
    case AGGVM_DEST_ALL_EXCLUDING_SELF:
      lo |= ICR_ALL_EXCLUDING_SELF;
      break;
    case AGGVM_DEST_ALL_INCLUDING_SELF:
      lo |= ICR_ALL_INCLUDING_SELF;
      break;
    case AGGVM_DEST_PHYSICAL_BROADCAST:
      dest = pc->x2apic ? 0xffffffffu : 0xffu;
      break;
    default: /* AGGVM_DEST_X2APIC_LOGICAL, checked in guest_main */
      lo |= ICR_LOGICAL;
      dest = bi->dest;
      break;
  }
  say_hello(pc, apic_id);
  timer_setup(pc);
  handshake(pc, bi, vcpu_mask(bi->num_vcpus) & ~(1ull << sender));
  const uint64_t answers_word = AGGVM_VEC_ANSWER_BASE / 64;
  for (uint32_t round = 0; round < bi->iterations; ++round) {
    pc->seen[answers_word] = 0;
    clear_seen(pc, AGGVM_VEC_TIMER);
    const uint64_t give_up = deadline_after_timeout(bi);
    /* One timer write per round (an exit in user mode), not one per wake-up: it only bounds a lost answer. */
    arm_timer(pc, bi, give_up, 0xfffffffeull);
    const uint64_t sent = rdtsc();
    send_icr(pc, lo, dest);
    while (popcount64(pc->seen[answers_word]) < bi->expected_answers) {
      if (seen(pc, vector)) { /* the sender is among the recipients: it answers itself */
        clear_seen(pc, vector);
        send_fixed(pc, apic_id, AGGVM_VEC_ANSWER_BASE + pc->index);
      }
      if (rdtsc() > give_up) fail(pc, AGGVM_GERR_TIMEOUT, pc->seen[answers_word], 2);
      if (seen(pc, AGGVM_VEC_TIMER)) {
        clear_seen(pc, AGGVM_VEC_TIMER);
        arm_timer(pc, bi, give_up, 0xfffffffeull);
      }
      wait_for_interrupt();
    }
    send_record(&pc->main_rec, AGGVM_REC_BCAST_ROUND, round, sent, rdtsc());
  }
  done(0);
  idle_forever();
}

/* ipi-nowhere: IPIs to an APIC ID no vCPU has; the VMM counts the drops. */
static __attribute__((noreturn)) void run_nowhere(struct percpu *pc, const struct aggvm_boot_info *bi) {
  if (pc->index == bi->ping_vcpu) {
    for (uint32_t i = 0; i < bi->iterations; ++i) send_fixed(pc, bi->nowhere_apic_id, bi->ipi_vector);
    put_str("sent ");
    put_dec(bi->iterations);
    put_str(" IPIs to APIC ID ");
    put_dec(bi->nowhere_apic_id);
    put_str("\n");
  }
  done(0);
  idle_forever();
}

/* ap-bringup, vCPU 0 (the BSP): INIT, ~10 ms, INIT level de-assert, SIPI, ~200 us, SIPI to every AP (SDM Vol. 3A
   9.4.4.1; the de-assert as Linux sends it, smpboot.c: it must reset nothing, SDM 11.6.1), then wait for each AP's
   "I'm up" IPI (READY_BASE + its index). */
static __attribute__((noreturn)) void run_bringup_bsp(struct percpu *pc, const struct aggvm_boot_info *bi) {
  const uint64_t aps = vcpu_mask(bi->num_vcpus) & ~1ull;
  const uint32_t sipi = ICR_STARTUP | (AGGVM_TRAMPOLINE_GPA >> 12);
  const uint64_t ms = ticks_per_ms(bi);
  timer_setup(pc);
  const uint64_t first_init = rdtsc();
  for (uint32_t j = 1; j < bi->num_vcpus; ++j) send_icr(pc, ICR_INIT | ICR_ASSERT, bi->apic_ids[j]);
  delay_ticks(pc, bi, 10 * ms);
  for (uint32_t j = 1; j < bi->num_vcpus; ++j) send_icr(pc, ICR_INIT | ICR_TRIGGER_LEVEL, bi->apic_ids[j]);
  for (uint32_t j = 1; j < bi->num_vcpus; ++j) send_icr(pc, sipi, bi->apic_ids[j]);
  delay_ticks(pc, bi, ms / 5);
  for (uint32_t j = 1; j < bi->num_vcpus; ++j) send_icr(pc, sipi, bi->apic_ids[j]);
  const uint64_t give_up = deadline_after_timeout(bi);
  while ((aps & ~pc->seen[AGGVM_VEC_READY_BASE / 64]) && rdtsc() < give_up) nap_until(pc, bi, give_up);
  disarm_timer(pc);
  const uint64_t up = aps & pc->seen[AGGVM_VEC_READY_BASE / 64];
  send_record(&pc->main_rec, AGGVM_REC_AP_UP, up | 1, first_init, rdtsc());
  if (up != aps) fail(pc, AGGVM_GERR_TIMEOUT, aps & ~up, 3);
  done(0);
  idle_forever();
}

static __attribute__((noreturn)) void run_exit_loop(struct percpu *pc, uint32_t iterations) {
  for (uint32_t i = 0; i < iterations; ++i) {
    uint64_t before = rdtsc();
    outl(AGGVM_PORT_NOP, i);
    uint64_t after = rdtsc();
    send_record(&pc->main_rec, AGGVM_REC_EXIT_ROUND, i, before, after);
  }
  done(0);
  idle_forever();
}

static __attribute__((noreturn)) void run_spin(uint32_t index) {
  volatile uint64_t *counter = (volatile uint64_t *)(uintptr_t)(AGGVM_STATUS_GPA + 8u * index);
  __asm__ volatile("sti" : : : "memory");
  for (;;) *counter += 1;
}

/* A misbehaving workload the VMM failed to stop: say so and finish, so a test sees DONE instead of an error. */
static __attribute__((noreturn)) void survived(const char *what) {
  put_str(what);
  put_str(": the VMM let the guest continue\n");
  done(0);
  halt_forever();
}

/* A vector a workload may use for its own IPIs: 32..254 (0xFF is the spurious vector, whose stub does no EOI) and
   none of the handshake vectors of the vCPUs taking part. */
static int valid_ipi_vector(uint32_t v, uint32_t num_vcpus) {
  if (v < 32 || v >= AGGVM_SPURIOUS_VECTOR || v == AGGVM_VEC_WARMUP || v == AGGVM_VEC_TIMER) return 0;
  if (v >= AGGVM_VEC_READY_BASE && v < AGGVM_VEC_READY_BASE + num_vcpus) return 0;
  if (v >= AGGVM_VEC_ANSWER_BASE && v < AGGVM_VEC_ANSWER_BASE + num_vcpus) return 0;
  return 1;
}

/* The BootInfo fields of the chosen workload. The VMM checks the same (node-agent/probe_vm.cc) with messages. */
static int valid_parameters(const struct aggvm_boot_info *bi) {
  const uint32_t n = bi->num_vcpus;
  const int x2apic = (bi->flags & AGGVM_BOOT_X2APIC) != 0;
  switch (bi->workload) {
    case AGGVM_WORKLOAD_IPI_PINGPONG:
    case AGGVM_WORKLOAD_NMI:
      return bi->ping_vcpu < n && bi->pong_vcpu < n && bi->ping_vcpu != bi->pong_vcpu &&
             valid_ipi_vector(bi->ipi_vector, n);
    case AGGVM_WORKLOAD_IPI_BROADCAST:
    case AGGVM_WORKLOAD_LOWEST_PRIORITY:
      if (bi->ping_vcpu >= n || n > AGGVM_MAX_ANSWER_VCPUS || !valid_ipi_vector(bi->ipi_vector, n)) return 0;
      if (bi->expected_answers > n) return 0;
      if (bi->workload == AGGVM_WORKLOAD_LOWEST_PRIORITY) {
        for (uint32_t i = 0; i < n; ++i) {
          if ((bi->tpr[i] >> 4) >= (bi->ipi_vector >> 4)) return 0; /* would block the IPI (SDM 11.8.3.1) */
        }
        return x2apic && bi->dest_kind == AGGVM_DEST_X2APIC_LOGICAL;
      }
      return (bi->dest_kind >= AGGVM_DEST_ALL_EXCLUDING_SELF && bi->dest_kind <= AGGVM_DEST_PHYSICAL_BROADCAST) ||
             (x2apic && bi->dest_kind == AGGVM_DEST_X2APIC_LOGICAL);
    case AGGVM_WORKLOAD_IPI_NOWHERE:
      for (uint32_t i = 0; i < n; ++i) {
        if (bi->apic_ids[i] == bi->nowhere_apic_id) return 0;
      }
      return bi->ping_vcpu < n && valid_ipi_vector(bi->ipi_vector, n) && (x2apic || bi->nowhere_apic_id < 0xff);
    case AGGVM_WORKLOAD_AP_BRINGUP:
      return 1;
    default:
      return 1;
  }
}

static int valid_workload(uint32_t w) {
  switch (w) {
    case AGGVM_WORKLOAD_HELLO:
    case AGGVM_WORKLOAD_IPI_PINGPONG:
    case AGGVM_WORKLOAD_IRQ_SINK:
    case AGGVM_WORKLOAD_SPIN:
    case AGGVM_WORKLOAD_EXIT_LOOP:
    case AGGVM_WORKLOAD_IPI_BROADCAST:
    case AGGVM_WORKLOAD_NMI:
    case AGGVM_WORKLOAD_IPI_NOWHERE:
    case AGGVM_WORKLOAD_LOWEST_PRIORITY:
    case AGGVM_WORKLOAD_AP_BRINGUP:
    case AGGVM_WORKLOAD_BAD_PORT:
    case AGGVM_WORKLOAD_UNMAPPED:
    case AGGVM_WORKLOAD_TRIPLE_FAULT:
      return 1;
    default:
      return 0;
  }
}

void __attribute__((noreturn)) guest_main(uint64_t index, uint64_t boot_info_gpa) {
  uint64_t slot = index < AGGVM_MAX_VCPUS ? index : AGGVM_MAX_VCPUS;
  struct percpu *pc = &aggvm_vcpu_areas[slot].pc;
  pc->index = (uint32_t)index;
  struct aggvm_record *recs[4] = {&pc->main_rec, &pc->irq_rec, &pc->exc_rec, &pc->nmi_rec};
  for (int i = 0; i < 4; ++i) {
    recs[i]->magic = AGGVM_RECORD_MAGIC;
    recs[i]->vcpu = (uint32_t)index;
  }
  pc->irq_rec.type = AGGVM_REC_IRQ; /* irq_common fills a and b, and increments c (the sequence number) */
  pc->nmi_rec.type = AGGVM_REC_NMI; /* aggvm_nmi_handler fills a and b */
  struct idt_gate *idt = idts[slot];
  load_idt(idt);

  if (slot != index || boot_info_gpa == 0 || boot_info_gpa > 0xffffffffull - 4096 || (boot_info_gpa & 7))
    fail(pc, AGGVM_GERR_BAD_BOOTINFO, index, boot_info_gpa);
  const struct aggvm_boot_info *bi = (const struct aggvm_boot_info *)(uintptr_t)boot_info_gpa;
  if (bi->magic != AGGVM_BOOTINFO_MAGIC || bi->version != AGGVM_BOOTINFO_VERSION)
    fail(pc, AGGVM_GERR_BAD_BOOTINFO, bi->magic, bi->version);
  if (bi->num_vcpus == 0 || bi->num_vcpus > AGGVM_MAX_VCPUS || index >= bi->num_vcpus)
    fail(pc, AGGVM_GERR_BAD_BOOTINFO, bi->num_vcpus, index);
  uart_console = (bi->flags & AGGVM_BOOT_UART_CONSOLE) != 0;
  uint32_t workload = bi->workload;
  if (!valid_workload(workload)) fail(pc, AGGVM_GERR_BAD_WORKLOAD, workload, 0);
  if (!valid_parameters(bi)) fail(pc, AGGVM_GERR_BAD_WORKLOAD, workload, ((uint64_t)bi->ping_vcpu << 32) | bi->pong_vcpu);

  switch (workload) {
    case AGGVM_WORKLOAD_BAD_PORT:
      outb(0x1234, 0);
      survived("bad-port");
    case AGGVM_WORKLOAD_UNMAPPED:
      (void)*(volatile uint32_t *)(uintptr_t)0xc0000000u;
      survived("unmapped");
    case AGGVM_WORKLOAD_TRIPLE_FAULT: {
      struct idt_pointer empty = {.limit = 0, .base = 0};
      __asm__ volatile("lidt %0; ud2" : : "m"(empty) : "memory");
      survived("triple-fault");
    }
    default:
      break;
  }

  uint32_t apic_id = lapic_enable(pc, (bi->flags & AGGVM_BOOT_X2APIC) != 0);

  switch (workload) {
    case AGGVM_WORKLOAD_HELLO:
      say_hello(pc, apic_id);
      put_str("hello from vcpu ");
      put_dec(index);
      put_str(" apic ");
      put_dec(apic_id);
      put_str("\n");
      done(0);
      idle_forever();
    case AGGVM_WORKLOAD_IPI_PINGPONG:
      if (index != bi->ping_vcpu && index != bi->pong_vcpu) {
        done(0);
        idle_forever();
      }
      set_gate(idt, bi->ipi_vector,
               (uintptr_t)(index == bi->ping_vcpu ? aggvm_ping_handler : aggvm_pong_handler));
      run_pingpong(pc, bi);
    case AGGVM_WORKLOAD_NMI:
      if (index != bi->ping_vcpu && index != bi->pong_vcpu) {
        done(0);
        idle_forever();
      }
      if (index == bi->ping_vcpu) {
        set_gate(idt, bi->ipi_vector, (uintptr_t)aggvm_ping_handler);
      } else {
        set_gate(idt, 2, (uintptr_t)aggvm_nmi_handler);
      }
      run_nmi(pc, bi, apic_id);
    case AGGVM_WORKLOAD_IPI_BROADCAST:
      run_broadcast(pc, bi, apic_id, 0);
    case AGGVM_WORKLOAD_LOWEST_PRIORITY:
      run_broadcast(pc, bi, apic_id, 1);
    case AGGVM_WORKLOAD_IPI_NOWHERE:
      run_nowhere(pc, bi);
    case AGGVM_WORKLOAD_AP_BRINGUP:
      say_hello(pc, apic_id);
      if (index == 0) run_bringup_bsp(pc, bi);
      send_fixed(pc, bi->apic_ids[0], AGGVM_VEC_READY_BASE + (uint32_t)index); /* "I'm up" */
      done(0);
      idle_forever();
    case AGGVM_WORKLOAD_IRQ_SINK:
      say_hello(pc, apic_id); /* ready: IDT loaded, LAPIC enabled */
      idle_forever();
    case AGGVM_WORKLOAD_SPIN:
      say_hello(pc, apic_id); /* ready, as for irq-sink */
      run_spin((uint32_t)index);
    case AGGVM_WORKLOAD_EXIT_LOOP:
      run_exit_loop(pc, bi->iterations);
    default:
      fail(pc, AGGVM_GERR_BAD_WORKLOAD, workload, 0);
  }
}
