/*
 * The proxy vCPU stub (proxy_vcpu.h, docs/proxy.md): ring-0 code a proxy vCPU runs instead of guest code. Every
 * instruction here is emulated on these hosts (~0.65 µs each), so each path is a handful of instructions.
 *
 * Register contract of the 64-bit part: after `entry`, ECX = 0x80B (x2APIC EOI MSR) and EDX = 0 for good; handlers
 * clobber only EAX (the NMI handler saves it: an NMI may arrive between an IRQ handler's `xor` and its `wrmsr`).
 * Built without the project's flags (see vcpu/CMakeLists.txt) and embedded into aggvm_vcpu as bytes.
 */
#include "proxy_stub_abi.h"

#define X2APIC_MSR_TPR 0x808
#define X2APIC_MSR_EOI 0x80B
#define X2APIC_MSR_SVR 0x80F

  .text
  .code64
stub_start:

/* 256 vector handlers, AGGVM_PROXY_HANDLER_STRIDE bytes apart: AL = vector, then the path of its class. */
  .set vec, 0
  .rept 256
  .balign AGGVM_PROXY_HANDLER_STRIDE, 0xcc
  .if vec == 2
  jmp nmi
  .else
  mov $vec, %al
  .if vec < 32
  jmp fault
  .else
  jmp irq
  .endif
  .endif
  .set vec, vec + 1
  .endr

/* Start (and restart) of a proxy: software-enable the x2APIC (SVR bit 8, spurious vector 0xFF), TPR 0, then halt
   with interrupts on; report ready (OUT 0) once. SDM vol. 3, 11.4.7.2 "Local APIC State After It Has Been Software Disabled", 11.8.3.1. */
  .org AGGVM_PROXY_ENTRY_OFFSET, 0xcc
entry:
  mov $X2APIC_MSR_SVR, %ecx
  mov $0x1FF, %eax
  xor %edx, %edx
  wrmsr
  mov $X2APIC_MSR_TPR, %ecx
  xor %eax, %eax
  wrmsr
  out %al, $AGGVM_PROXY_PORT_EVENT  /* 0 = ready */
  mov $X2APIC_MSR_EOI, %ecx
  sti                        /* the STI shadow covers the HLT: no wake-up is lost */
idle:
  hlt
  jmp idle

/* A fixed (or lowest-priority) interrupt: report, EOI, return to the halt loop. The OUT exits to the proxy thread
   while the vector is in service, so the EOI happens after the agent took it. */
irq:
  out %al, $AGGVM_PROXY_PORT_EVENT
  xor %eax, %eax
  wrmsr
  iretq

nmi:
  push %rax
  mov $2, %al
  out %al, $AGGVM_PROXY_PORT_EVENT
  pop %rax
  iretq

/* An exception in the stub: report it and stop here; the proxy thread restores the stub. */
fault:
  out %al, $AGGVM_PROXY_PORT_FAULT
  cli
1:
  hlt
  jmp 1b

/* After INIT, a vCPU whose APIC base has the BSP flag starts at CS base 0xFFFF0000, IP 0xFFF0 in real mode
   (SDM vol. 3, 10.1.4). One instruction tells the proxy thread; it never returns here. */
  .org AGGVM_PROXY_RESET_OFFSET, 0xcc
  .code16
reset:
  out %al, $AGGVM_PROXY_PORT_INIT
2:
  hlt
  jmp 2b
  .org AGGVM_PROXY_CODE_SIZE, 0xcc
