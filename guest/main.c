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
  uint8_t pad[PC_SIZE - 136];
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

/* ipi-pingpong: set by the pong vCPU once its LAPIC and handler are ready, so the first ping is not dropped by a
   still software-disabled APIC (SDM Vol. 3A 11.4.7.2). */
static volatile uint32_t pong_ready;

extern char aggvm_isr_stubs[];
extern char aggvm_ping_handler[];
extern char aggvm_pong_handler[];

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

/* Fixed IPI, physical destination, edge (SDM Vol. 3A 11.6.1); the handlers and send_ipi share these ICR values. */
static void prepare_ipi(struct percpu *pc, uint32_t dest_apic_id, uint32_t vector) {
  pc->icr_lo = vector | (1u << 14) /* level = assert */;
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

/* ---- workloads ---- */

static void say_hello(struct percpu *pc, uint32_t apic_id) {
  send_record(&pc->main_rec, AGGVM_REC_HELLO, apic_id, rdtsc(), 0);
}

static __attribute__((noreturn)) void run_pingpong(struct percpu *pc, const struct aggvm_boot_info *bi) {
  uint32_t iterations = bi->iterations;
  if (pc->index == bi->pong_vcpu) {
    prepare_ipi(pc, bi->apic_ids[bi->ping_vcpu], bi->ipi_vector);
    pong_ready = 1;
    while (pc->pong_count < iterations) wait_for_interrupt();
    done(0);
    idle_forever();
  }
  prepare_ipi(pc, bi->apic_ids[bi->pong_vcpu], bi->ipi_vector);
  while (!pong_ready) __asm__ volatile("pause" : : : "memory");
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

static int valid_workload(uint32_t w) {
  switch (w) {
    case AGGVM_WORKLOAD_HELLO:
    case AGGVM_WORKLOAD_IPI_PINGPONG:
    case AGGVM_WORKLOAD_IRQ_SINK:
    case AGGVM_WORKLOAD_SPIN:
    case AGGVM_WORKLOAD_EXIT_LOOP:
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
  struct aggvm_record *recs[3] = {&pc->main_rec, &pc->irq_rec, &pc->exc_rec};
  for (int i = 0; i < 3; ++i) {
    recs[i]->magic = AGGVM_RECORD_MAGIC;
    recs[i]->vcpu = (uint32_t)index;
  }
  pc->irq_rec.type = AGGVM_REC_IRQ; /* irq_common fills a and b, and increments c (the sequence number) */
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
  if (workload == AGGVM_WORKLOAD_IPI_PINGPONG) {
    /* 0xFF is the spurious vector (its stub does no EOI), so the IPI vector is 32..254. */
    if (bi->ping_vcpu >= bi->num_vcpus || bi->pong_vcpu >= bi->num_vcpus || bi->ping_vcpu == bi->pong_vcpu)
      fail(pc, AGGVM_GERR_BAD_WORKLOAD, workload, ((uint64_t)bi->ping_vcpu << 32) | bi->pong_vcpu);
    if (bi->ipi_vector < 32 || bi->ipi_vector >= AGGVM_SPURIOUS_VECTOR)
      fail(pc, AGGVM_GERR_BAD_WORKLOAD, workload, bi->ipi_vector);
  }

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
